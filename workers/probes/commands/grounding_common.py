"""Arguments and output helpers shared by the grounding commands (evaluate, sanity).

Not a command itself: ``cli.COMMANDS`` does not list it. Command modules import torch, matplotlib
and the probe code inside ``run`` only, so ``python -m workers.probes --help`` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

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


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=["jsonl", "coco"], default="jsonl",
                        help="dataset format: annotations.jsonl (default) or a COCO instances JSON")
    parser.add_argument("--prompt-template", default=None,
                        help="COCO only: prompt from the category name (default 'a photo of a {name}')")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per method call (default 16)")
    parser.add_argument("--limit", type=positive_int, default=None, help="use only the first N examples")


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


def table(entries: list[dict[str, Any]]) -> str:
    """A plain-text table of evaluate results, baselines in the last columns."""
    columns = ["method", "n", "pointing_game", "energy_pointing_game", "deletion_auc", "insertion_auc",
               "random_pointing_game", "random_deletion_auc", "random_insertion_auc", "seconds"]
    rows = [[("-" if e.get(c) is None else str(e.get(c))) for c in columns] for e in entries]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)
