"""``python -m workers.probes sanity``: cascading model-randomisation test (Adebayo et al. 2018).

``--json`` prints one object: ``method``, ``n``, ``passed``, ``rank_correlation`` (Spearman between
the trained and the fully randomised model's maps), ``pointing_game`` (trained),
``randomized_pointing_game``, ``random_pointing_game`` (chance), the thresholds, ``cascade``
(one entry per randomised stage, top layer first) and ``randomisation_draws`` (the fully randomised
model's scores for each of ``--draws`` independent randomisations; the verdict uses their mean). The exit code is 0 whether or not the method
passes (read ``passed``); 2 for bad input.
"""

from __future__ import annotations

import argparse
import json

from workers.probes import suite
from workers.probes.commands import grounding_common as common
from workers.probes.progress import TqdmProgress


def configure(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
    parser.add_argument("--dataset", help="dataset folder; default: the zoo's held-out scenes with grey decoys "
                                                "(heldout-decoys)")
    parser.add_argument("--method", default="chefer", help="the method to test (default chefer)")
    common.add_dataset_arguments(parser)
    parser.add_argument("--seed", type=common.non_negative_int, default=0)
    parser.add_argument("--draws", type=common.positive_int, default=3,
                        help="independent full randomisations averaged for the verdict (default 3)")
    parser.add_argument("--max-rank-correlation", type=float, default=0.3,
                        help="pass only if the mean Spearman correlation falls below this (default 0.3)")
    parser.add_argument("--pointing-margin", type=float, default=0.1,
                        help="pass only if the randomised pointing game is this close to chance (default 0.1)")
    common.add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    params = {"method": args.method, "batch_size": args.batch_size, "format": args.format, "seed": args.seed,
              "draws": args.draws,
              "max_rank_correlation": args.max_rank_correlation, "pointing_margin": args.pointing_margin}
    if args.limit is not None:
        params["limit"] = args.limit
    if args.prompt_template is not None:
        params["prompt_template"] = args.prompt_template
    with TqdmProgress("sanity", enabled=not args.no_progress) as progress:
        result = suite.run("sanity", args.model, args.dataset, params, device=args.device, progress=progress)
    common.write_figures(result, args.figures)
    print(json.dumps(result.metrics) if args.json else result.summary)
    return 0
