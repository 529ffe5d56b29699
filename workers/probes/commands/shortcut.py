"""``python -m workers.probes shortcut``: does the score for a class ride on an artefact (a watermark)?

Combines TCAV of the artefact concept, the score change when the artefact is pasted onto otherwise
identical images, and the share of chefer relevance on the artefact (see ``workers/probes/shortcut.py``).
``--json`` prints ``{"target", "concept", "flagged", "evidence": {"tcav", "intervention",
"relevance"}, "tcav": [...], "intervention": {...}, "relevance": {...}, "thresholds": {...}}``.
The exit code is 0 whether or not the model is flagged (read ``flagged``); 2 for bad input.
"""

from __future__ import annotations

import argparse
import json

from workers.probes import suite
from workers.probes.commands import grounding_common as common
from workers.probes.progress import TqdmProgress


def configure(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
    parser.add_argument("--concepts", required=True,
                        help="folder with the artefact concept folder, random/ and <concept>.stamp.json/.png")
    parser.add_argument("--inputs", required=True, help="folder of images of the class")
    parser.add_argument("--target", required=True, help="the class text, e.g. 'a red circle'")
    parser.add_argument("--concept", default="watermark", help="the artefact's concept folder (default watermark)")
    parser.add_argument("--layers", default="auto", help="'auto' or comma-separated layers")
    parser.add_argument("--random-runs", type=common.positive_int, default=20)
    parser.add_argument("--null-concepts", type=common.positive_int, default=20)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--method", default="chefer", help="grounding method for the relevance share (default chefer)")
    parser.add_argument("--seed", type=common.non_negative_int, default=0)
    parser.add_argument("--batch-size", type=common.positive_int, default=32)
    common.add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    params = {"inputs": args.inputs, "target": args.target, "concept": args.concept, "layers": args.layers,
              "random_runs": args.random_runs, "null_concepts": args.null_concepts, "alpha": args.alpha,
              "method": args.method, "seed": args.seed, "batch_size": args.batch_size}
    with TqdmProgress("shortcut", enabled=not args.no_progress) as progress:
        result = suite.run("shortcut", args.model, args.concepts, params, device=args.device, progress=progress)
    common.write_figures(result, args.figures)
    print(json.dumps(result.metrics) if args.json else result.summary)
    return 0
