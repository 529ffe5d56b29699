"""``python -m workers.probes explain``: one heatmap overlaid on one image, written as a figure."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from workers.probes.commands import common
from workers.probes.errors import ProbeInputError

FIGURE_SUFFIXES = {".png", ".jpg", ".jpeg", ".pdf", ".svg"}


def configure(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
    parser.add_argument("--image", required=True, help="the image file")
    parser.add_argument("--prompt", required=True, help="the text to ground")
    parser.add_argument("--method", required=True, help="a method name")
    parser.add_argument("--out", required=True, help="where to write the overlay (.png, .jpg, .pdf or .svg)")
    parser.add_argument("--alpha", type=float, default=0.85,
                        help="heatmap opacity where relevance is highest; it fades to 0 where lowest (default 0.85)")
    parser.add_argument("--json", action="store_true", help="print where the map peaks, as JSON")


def run(args: argparse.Namespace) -> int:
    from workers.probes import faithfulness, figures
    from workers.probes.datasets import MAX_PIXELS, open_image
    from workers.probes.explanations import explain_image, load_dual_encoder, method_names

    out = Path(args.out)
    if out.suffix.lower() not in FIGURE_SUFFIXES:
        raise ProbeInputError(f"--out must end in one of {', '.join(sorted(FIGURE_SUFFIXES))}, got {out.name!r}")
    if not out.parent.is_dir():
        raise ProbeInputError(f"--out: folder {out.parent} does not exist")
    if not args.prompt.strip():
        raise ProbeInputError("--prompt must not be empty")
    if not 0.0 <= args.alpha <= 1.0:
        raise ProbeInputError("--alpha must be between 0 and 1")
    (method,) = method_names(args.method)
    image = open_image(Path(args.image), max_pixels=MAX_PIXELS, decode=True)
    adapter = load_dual_encoder(args.model, args.device)
    grid_map = explain_image(adapter, image, args.prompt, method)
    peak = faithfulness.localisation(grid_map, [], image.width, image.height).peak_xy
    figure = figures.heatmap_overlay(image, grid_map, title=f"{method}: {args.prompt}", alpha=args.alpha, point=peak)
    figures.save(figure, out)
    if args.json:
        print(json.dumps({"method": method, "prompt": args.prompt, "out": str(out),
                          "peak": [round(peak[0], 1), round(peak[1], 1)], "grid": list(adapter.grid)}))
    return 0
