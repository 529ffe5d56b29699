"""``python -m workers.probes robustness``: corruption, typographic and prompt-perturbation probes.

``--json`` prints ``{"n", "classes", "clean_accuracy", "mean_corruption_accuracy_by_severity",
"accuracy_falls_monotonically", "probes": [{"probe", "family", "severity", "accuracy",
"accuracy_drop", "flip_rate", "score_drop", "explanation_spearman", ...}]}``. The dataset is a
grounding dataset (``annotations.jsonl``); its prompts double as the class names.
"""

from __future__ import annotations

import argparse
import json

from workers.probes import suite
from workers.probes.commands import grounding_common as common
from workers.probes.progress import TqdmProgress


def _severities(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated severities 1..5, got {text!r}") from None
    if not values or any(not 1 <= v <= 5 for v in values):
        raise argparse.ArgumentTypeError(f"severities must be within 1..5, got {text!r}")
    return values


def configure(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
    parser.add_argument("--dataset", default=None, help="grounding dataset folder; default: the zoo's held-out split")
    parser.add_argument("--probes", default="all",
                        help="all, a family (corruption, typographic, prompt) or probe names, comma-separated")
    parser.add_argument("--severities", type=_severities, default=[1, 2, 3, 4, 5], help="e.g. 1,3,5 (default 1..5)")
    parser.add_argument("--limit", type=common.positive_int, default=None, help="use only the first N examples")
    parser.add_argument("--no-explanations", action="store_true", help="skip the chefer explanation drift")
    parser.add_argument("--batch-size", type=common.positive_int, default=32)
    parser.add_argument("--seed", type=common.non_negative_int, default=0)
    common.add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    params = {"probes": args.probes, "severities": args.severities, "explain": not args.no_explanations,
              "batch_size": args.batch_size, "seed": args.seed}
    if args.limit is not None:
        params["limit"] = args.limit
    with TqdmProgress("robustness", enabled=not args.no_progress) as progress:
        result = suite.run("robustness", args.model, args.dataset, params, device=args.device, progress=progress)
    common.write_figures(result, args.figures)
    if args.json:
        print(json.dumps(result.metrics))
    else:
        print(result.summary)
        for r in result.metrics["probes"]:
            sev = "" if r["severity"] is None else f" s{r['severity']}"
            drift = "-" if r["explanation_spearman"] is None else f"{r['explanation_spearman']:.2f}"
            print(f"{r['probe'] + sev:<24} acc {r['accuracy']:.3f}  flips {r['flip_rate']:.3f}  "
                  f"score drop {r['score_drop']:+.2f}  explanation rho {drift}")
    return 0
