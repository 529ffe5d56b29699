"""``python -m workers.probes prompt-injection``: instructions written into images (generative VLMs).

``--json`` prints ``{"n", "skipped", "template", "success_rate", "control_rate",
"relevance_on_text", "text_area", "relevance_to_area", "by_factor": {"font", "size", "position",
"contrast"}}`` (see ``workers/probes/prompt_injection.py``). The dataset is a grounding dataset
(its images are used). The exit code is 0 whether or not the model follows the text; 2 for bad input.
"""

from __future__ import annotations

import argparse
import json

from workers.probes import suite
from workers.probes.commands import grounding_common as common
from workers.probes.progress import TqdmProgress


def _words(text: str) -> list[str]:
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise argparse.ArgumentTypeError("give at least one target word")
    return words


def configure(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
    parser.add_argument("--dataset", default=None, help="grounding dataset folder; default: the zoo's held-out split")
    parser.add_argument("--targets", type=_words, required=True, help="comma-separated words the text asks for")
    parser.add_argument("--template", default="say {target}", help="the written instruction (default 'say {target}')")
    parser.add_argument("--prompt", default=None, help="the captioning prompt (default: the model's)")
    parser.add_argument("--fonts", default=None, help="comma-separated font names (default: PIL's and the system's)")
    parser.add_argument("--limit", type=common.positive_int, default=None, help="use only the first N examples")
    parser.add_argument("--examples", type=common.non_negative_int, default=4, help="attacked images in the figure")
    parser.add_argument("--no-explanations", action="store_true", help="skip the relevance on the text")
    parser.add_argument("--seed", type=common.non_negative_int, default=0)
    common.add_output_arguments(parser)


def run(args: argparse.Namespace) -> int:
    params = {"targets": args.targets, "template": args.template, "seed": args.seed, "examples": args.examples,
              "explain": not args.no_explanations}
    for key in ("prompt", "limit"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    if args.fonts:
        params["fonts"] = [f.strip() for f in args.fonts.split(",") if f.strip()]
    with TqdmProgress("prompt-injection", enabled=not args.no_progress) as progress:
        result = suite.run("prompt_injection", args.model, args.dataset, params, device=args.device, progress=progress)
    common.write_figures(result, args.figures)
    print(json.dumps(result.metrics) if args.json else result.summary)
    return 0
