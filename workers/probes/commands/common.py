"""Arguments and output helpers shared by the commands.

Not a command itself. Command modules import torch, matplotlib and the probe code inside ``run``
only, so ``python -m workers.probes --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from workers.probes.errors import ProbeInputError
from workers.probes.suite import ProbeResult


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a Hugging Face-format model directory (or pinned hub id)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="default cpu")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON on stdout")
    parser.add_argument("--figures", default=None, help="also write the figures (PNG) into this folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def output_folder(folder: str) -> Path:
    """``--figures FOLDER`` as a path, refused if it is not an existing folder. ``cli.main`` checks
    it before any command starts; writing checks again (the folder may have gone meanwhile)."""
    target = Path(folder)
    if not target.is_dir():
        raise ProbeInputError(f"--figures: folder {target} does not exist")
    return target


def write_figures(result: ProbeResult, folder: str | None) -> list[Path]:
    if folder is None:
        return []
    from workers.probes import figures  # matplotlib: imported only when figures are written

    target = output_folder(folder)
    return [figures.save(figure, target / f"{result.kind}-{name}.png") for name, figure in result.figures.items()]

