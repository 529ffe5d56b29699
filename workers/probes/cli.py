"""``python -m workers.probes <command> ...``: the probe library's command line (a public contract).

Every probe kind is a command, derived from its declaration (``workers/probes/commands/kind.py``):
its name (or the ``command`` it declares), its help, one option per parameter. Commands that are
not probe kinds live in ``workers/probes/commands/<name>.py``, define
``configure(parser: argparse.ArgumentParser) -> None`` and ``run(args) -> int``, and are listed in
``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from workers.probes.allocator import tune_malloc
from workers.probes.errors import ProbeInputError

# Commands that are not probe kinds: name -> one-line help
COMMANDS: dict[str, str] = {
    "explain": "write one heatmap overlaid on an image",
    "attribute": "generate a caption and attribute each token (generative VLMs)",
}


def build_parser() -> argparse.ArgumentParser:
    from workers.probes import kinds
    from workers.probes.commands import kind as kind_command

    parser = argparse.ArgumentParser(prog="python -m workers.probes", description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for spec in kinds.all_kinds():
        kind_command.configure(sub.add_parser(spec.command, help=spec.help, description=spec.help), spec)
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"workers.probes.commands.{name}")
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def check_output_folders(args: argparse.Namespace) -> None:
    """Refuse a ``--figures`` folder that does not exist before the command starts: an evaluation
    can run for many minutes, and its results must not be lost to a typo in where the figures go."""
    folder = getattr(args, "figures", None)
    if folder is not None:
        from workers.probes.commands.common import output_folder

        output_folder(folder)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tune_malloc()  # a process of our own: keep freed tensor memory (allocator.py says why)
    try:
        check_output_folders(args)
        return int(args._run(args) or 0)
    except ProbeInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
