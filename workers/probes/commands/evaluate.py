"""``python -m workers.probes evaluate``: faithfulness of grounding methods on a dataset.

``--json`` prints ONE JSON object for one method (``method``, ``n``, ``pointing_game``,
``energy_pointing_game``, ``deletion_auc``, ``insertion_auc``, ``seconds`` and the baselines
``random_pointing_game``, ``random_energy_pointing_game``, ``random_deletion_auc``,
``random_insertion_auc``), or with ``--method all`` a JSON list: one object per method, then one for
``"method": "random"`` (uniform noise maps through the same pipeline). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from workers.probes import suite
from workers.probes.commands import grounding_common as common
from workers.probes.progress import TqdmProgress


def configure(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
    parser.add_argument("--dataset", help="dataset folder (annotations.jsonl, or COCO with --format coco); "
                                          "default: the zoo's held-out split")
    parser.add_argument("--method", required=True, help="a method name, or 'all'")
    common.add_dataset_arguments(parser)
    parser.add_argument("--steps", type=common.positive_int, default=32,
                        help="points on the deletion/insertion curves (default 32)")
    parser.add_argument("--baseline", choices=["mean", "blur"], default="mean",
                        help="what hidden patches become: the mean colour or a blur (default mean)")
    parser.add_argument("--seed", type=common.non_negative_int, default=0)
    common.add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"methods": args.method, "batch_size": args.batch_size, "format": args.format,
                              "steps": args.steps, "baseline": args.baseline, "seed": args.seed}
    if args.limit is not None:
        params["limit"] = args.limit
    if args.prompt_template is not None:
        params["prompt_template"] = args.prompt_template
    with TqdmProgress("evaluate", enabled=not args.no_progress) as progress:
        result = suite.run("grounding", args.model, args.dataset, params, device=args.device, progress=progress)
    entries = result.metrics["methods"]
    output: Any = entries if args.method == "all" else entries[0]
    common.write_figures(result, args.figures)
    if args.json:
        print(json.dumps(output))
    else:
        print(common.table(entries if args.method == "all" else entries[:1] + entries[-1:]))
    return 0
