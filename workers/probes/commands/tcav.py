"""``python -m workers.probes tcav``: concept activation vector tests with Holm-corrected significance.

``--json`` prints ``{"target": ..., "results": [{"concept", "layer", "tcav_score", "magnitude",
"p_value", "p_adjusted", "significant", "cav_accuracy", "reliable", ...}], ...}`` (the public
contract; extra keys: random baseline, Cohen's d, 95% CI, per-run scores). ``--concepts DIR`` holds
one folder of images per concept and a ``random/`` folder of random counterexamples.
"""

from __future__ import annotations

import argparse
import json

from workers.probes import suite
from workers.probes.commands import grounding_common as common
from workers.probes.progress import TqdmProgress


def configure(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
    parser.add_argument("--inputs", required=True, help="folder of target images (e.g. images of the class)")
    parser.add_argument("--target", required=True, help="the text whose score is tested, e.g. 'a red circle'")
    parser.add_argument("--concepts", required=True, help="folder with one sub-folder per concept and random/")
    parser.add_argument("--concept", action="append", default=None,
                        help="test only this concept folder (repeatable; default: every folder but random/)")
    parser.add_argument("--layers", default="auto", help="'auto' (every few layers) or comma-separated layers, e.g. 2,4")
    parser.add_argument("--random-runs", type=common.positive_int, default=20,
                        help="concept-vs-random and random-vs-random CAVs per concept and layer (default 20)")
    parser.add_argument("--null-concepts", type=common.positive_int, default=20,
                        help="random concepts (random folders, each with --random-runs CAVs) forming the null (default 20)")
    parser.add_argument("--statistic", default="derivative", choices=["derivative", "tcav_score"],
                        help="what the test compares with random concepts: the mean cosine directional derivative "
                             "(default) or the TCAV score itself")
    parser.add_argument("--pooling", default="auto", choices=["auto", "cls", "mean"],
                        help="activation per image: CLS token or mean of patch tokens (auto: CLS where there is one)")
    parser.add_argument("--alpha", type=float, default=0.05, help="family-wise error rate after Holm (default 0.05)")
    parser.add_argument("--seed", type=common.non_negative_int, default=0)
    parser.add_argument("--batch-size", type=common.positive_int, default=32)
    common.add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    params = {"inputs": args.inputs, "target": args.target, "layers": args.layers, "random_runs": args.random_runs,
              "null_concepts": args.null_concepts, "statistic": args.statistic,
              "pooling": args.pooling, "alpha": args.alpha, "seed": args.seed, "batch_size": args.batch_size}
    if args.concept:
        params["concepts"] = args.concept
    with TqdmProgress("tcav", enabled=not args.no_progress) as progress:
        result = suite.run("tcav", args.model, args.concepts, params, device=args.device, progress=progress)
    common.write_figures(result, args.figures)
    if args.json:
        print(json.dumps(result.metrics))
    else:
        print(result.summary)
        for r in result.metrics["results"]:
            mark = "*" if r["significant"] else (" " if r["reliable"] else "?")
            print(f"{mark} {r['concept']:<20} layer {r['layer']:>2}  TCAV {r['tcav_score']:.2f} "
                  f"(random {r['random_score']:.2f})  p_adj {r['p_adjusted']:.3g}  CAV acc {r['cav_accuracy']:.2f}")
        print("* significant after Holm correction; ? unreliable CAV (held-out accuracy < 0.7)")
    return 0
