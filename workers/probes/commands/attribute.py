"""``python -m workers.probes attribute``: generate a caption, then attribute every generated token.

Prints (with ``--json``) the caption, per-token image and text relevance for the gradient-weighted
method (``chefer``) and the raw-attention baseline (``raw``), and the attribution graph (tokens and
patches as nodes, weighted edges). ``--figures DIR`` writes the caption figure (each word's image
heatmap) and ``attribution-graph.json``.

``--dataset DIR`` (instead of ``--image``) scores a whole dataset instead: for every generated word
that names one object, does the attribution maximum lie in that object's box (both methods, with a
random baseline)? That is the ``token_attribution`` probe kind the workers run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from workers.probes.commands import common
from workers.probes.errors import ProbeInputError


def configure(parser: argparse.ArgumentParser) -> None:
    common.add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", help="the image file")
    source.add_argument("--dataset", help="score a dataset folder (annotations.jsonl + scenes.jsonl) instead")
    parser.add_argument("--limit", type=common.positive_int, default=None, help="--dataset: first N images")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--prompt", default=None, help="the text prompt (default: the zoo captioner's "
                                                       "'describe the image'); '<image>' marks where the image goes")
    parser.add_argument("--max-new-tokens", type=common.positive_int, default=32, help="default 32")
    parser.add_argument("--json", action="store_true", help="print the attributions as JSON on stdout")
    parser.add_argument("--figures", default=None, help="write the caption figure and the graph JSON into this folder")


def run(args: argparse.Namespace) -> int:
    from workers.probes import figures
    from workers.probes import token_attribution as ta
    from workers.probes.datasets import MAX_PIXELS, open_image

    folder = Path(args.figures) if args.figures else None  # cli.check_output_folders made sure it exists
    if args.prompt is not None and not args.prompt.strip():
        raise ProbeInputError("--prompt must not be empty")
    if args.dataset:
        return _run_dataset(args)
    image = open_image(Path(args.image), max_pixels=MAX_PIXELS, decode=True)
    adapter = ta.load_fusion(args.model, args.device)
    prompt = args.prompt or ta.default_prompt(adapter)
    started = time.perf_counter()
    att = ta.attribute(adapter, image, prompt, max_new_tokens=args.max_new_tokens)
    out = ta.attribution_json(att, adapter.patch_boxes(image.size))
    out["seconds"] = round(time.perf_counter() - started, 3)
    out["image"] = str(args.image)
    if adapter.ignored_weights:  # pickled files beside the safetensors: never opened
        out["ignored_weights"] = list(adapter.ignored_weights)
    if folder is not None:
        for name, page in figures.paged("attribution-caption", ta.caption_figures(image, att)).items():
            figures.save(page, folder / f"{name}.png")
        (folder / "attribution-graph.json").write_text(json.dumps(out["graph"], indent=1), encoding="utf-8")
    if args.json:
        print(json.dumps(out))
    else:
        print(f"caption: {att.caption}")
        for tok in out["tokens"]:
            c, r = tok["chefer"], tok.get("raw")  # raw attention has no image share under cross-attention
            raw = f" (raw attention: {r['argmax_patch']})" if r else ""
            print(f"  {tok['token']:>12}  image share {c['image_share']:.2f}  peak patch {c['argmax_patch']}{raw}")
    return 0


def _run_dataset(args: argparse.Namespace) -> int:
    from workers.probes import suite
    from workers.probes.progress import TqdmProgress

    params = {"limit": args.limit, "max_new_tokens": args.max_new_tokens}
    if args.prompt:
        params["prompt"] = args.prompt
    with TqdmProgress("attribute", enabled=not args.no_progress) as progress:
        result = suite.run("token_attribution", args.model, args.dataset, params, device=args.device,
                           progress=progress)
    common.write_figures(result, args.figures)
    print(json.dumps(result.metrics) if args.json else result.summary)
    return 0
