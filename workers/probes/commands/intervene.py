"""``python -m workers.probes intervene``: head ablation or feature swap, with effect sizes.

See ``workers/probes/interventions.py`` for what is measured.
"""

from __future__ import annotations

import argparse
import json

from workers.probes.commands import grounding_common as common


def configure(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
    parser.add_argument("--dataset", required=True, help="a dataset folder (annotations.jsonl + scenes.jsonl)")
    parser.add_argument("--kind", required=True, choices=["head-ablation", "feature-swap"])
    parser.add_argument("--mode", choices=["zero", "mean"], default="zero", help="head ablation: zero or mean")
    parser.add_argument("--prompt", default=None, help="generative models: the prompt (default 'describe the image')")
    parser.add_argument("--limit", type=common.positive_int, default=None, help="use only the first N images")
    parser.add_argument("--max-new-tokens", type=common.positive_int, default=32)
    parser.add_argument("--seed", type=common.non_negative_int, default=0, help="feature swap: background cells")
    parser.add_argument("--site", choices=["patch-embedding", "projector"], default="patch-embedding",
                        help="feature swap: where features are replaced (default patch-embedding)")
    common.add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from workers.probes import suite
    from workers.probes.progress import TqdmProgress

    params = {"kind": args.kind, "mode": args.mode, "limit": args.limit, "max_new_tokens": args.max_new_tokens,
              "seed": args.seed, "site": args.site}
    if args.prompt:
        params["prompt"] = args.prompt
    with TqdmProgress(args.kind, enabled=not args.no_progress) as progress:
        result = suite.run("intervention", args.model, args.dataset, params, device=args.device, progress=progress)
    common.write_figures(result, args.figures)
    print(json.dumps(result.metrics) if args.json else result.summary)
    return 0
