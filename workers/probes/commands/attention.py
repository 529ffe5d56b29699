"""``python -m workers.probes attention``: cross-modal attention statistics per layer and head.

Works for dual encoders (vision-tower attention) and generative models (decoder attention from
the generated text to the image tokens); see ``workers/probes/attention_stats.py``.
"""

from __future__ import annotations

import argparse
import json

from workers.probes.commands import grounding_common as common


def configure(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
    parser.add_argument("--dataset", required=True, help="a dataset folder (annotations.jsonl, optional scenes.jsonl)")
    parser.add_argument("--limit", type=common.positive_int, default=None, help="use only the first N images")
    parser.add_argument("--prompt", action="append", default=None, dest="prompts",
                        help="a prompt paraphrase (repeat for several; generative models only)")
    parser.add_argument("--compare-model", action="append", default=None, dest="compare_models",
                        help="another seed / instance of the same architecture (repeatable), for consistency")
    parser.add_argument("--max-new-tokens", type=common.positive_int, default=32)
    common.add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from workers.probes import suite
    from workers.probes.progress import TqdmProgress

    params = {"limit": args.limit, "max_new_tokens": args.max_new_tokens}
    if args.prompts:
        params["prompts"] = args.prompts
    if args.compare_models:
        params["compare_models"] = args.compare_models
    with TqdmProgress("attention", enabled=not args.no_progress) as progress:
        result = suite.run("attention", args.model, args.dataset, params, device=args.device, progress=progress)
    common.write_figures(result, args.figures)
    if args.json:
        print(json.dumps(result.metrics))
    else:
        print(result.summary)
        for row in result.metrics["heads_table"]:
            print(f"  L{row['layer']}H{row['head']}  alignment {row['alignment']:.2f}  entropy {row['entropy']:.2f}  "
                  f"{' '.join(row['flags'])}")
    return 0
