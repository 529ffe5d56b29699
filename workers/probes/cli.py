"""``python -m workers.probes <command> ...``: the probe library's command line (a public contract).

Each command lives in ``workers/probes/commands/<name>.py`` and defines
``configure(parser: argparse.ArgumentParser) -> None`` and ``run(args) -> int``.
Add a command by adding its module and its name to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from workers.probes.allocator import tune_malloc
from workers.probes.errors import ProbeInputError

# name -> one-line help
COMMANDS: dict[str, str] = {
    "evaluate": "score grounding methods for faithfulness on a dataset",
    "explain": "write one heatmap overlaid on an image",
    "sanity": "cascading model-randomisation sanity check",
    "tcav": "concept activation vector tests with corrected significance",
    "robustness": "corruption, typographic and prompt-perturbation probes",
    "shortcut": "detect a shortcut concept (e.g. a watermark)",
    "attribute": "generate a caption and attribute each token (generative VLMs)",
    "attention": "cross-modal attention statistics per layer and head",
    "intervene": "head ablation and feature swap interventions",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workers.probes", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        try:
            module = importlib.import_module(f"workers.probes.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"workers.probes.commands.{name}":
                raise
            continue  # not implemented yet in this checkout
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.configure(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def check_output_folders(args: argparse.Namespace) -> None:
    """Refuse a ``--figures`` folder that does not exist before the command starts: an evaluation
    can run for many minutes, and its results must not be lost to a typo in where the figures go."""
    folder = getattr(args, "figures", None)
    if folder is not None:
        from workers.probes.commands.grounding_common import output_folder

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
