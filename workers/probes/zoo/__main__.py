"""``python -m workers.probes.zoo build|dataset``: reproduce the reference models or write a split."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.probes.zoo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the reference models (dual encoders, then the captioners on their towers)")
    b.add_argument("--out", type=Path, default=None, help="output root (default: the committed checkpoints folder)")
    b.add_argument("--only", default=None, help="comma-separated model names (default: all)")
    b.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    b.add_argument("--jobs", type=int, default=2,
                   help="models trained at once, one process and one thread each (default 2: one per core of "
                        "the reference machine); the captioners wait for tiny-clip")
    d = sub.add_parser("dataset", help="write a deterministic dataset split")
    d.add_argument("--split", default="heldout")
    d.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    from workers.probes import zoo

    if args.command == "dataset":
        from workers.probes.zoo import group_split, world

        if args.split in group_split.GROUP_SPLITS:
            print(group_split.write_group_dataset(args.out, group_split.GROUP_SPLITS[args.split], name=args.split))
            return 0
        if args.split not in zoo.SPLITS:
            known = sorted([*zoo.SPLITS, *group_split.GROUP_SPLITS])
            print(f"error: unknown split {args.split!r}; known: {', '.join(known)}", file=sys.stderr)
            return 2
        spec = zoo.SPLITS[args.split]
        out = world.write_dataset(args.out, spec.scenes(), info={"split": args.split, "seed": spec.seed})
        print(out)
        return 0

    # hooks: the captioners reuse a dual encoder's tower (tiny-clip's, tiny-siglip's), so they come last
    from workers.probes.zoo import captioner, idefics_captioner, mllama_captioner
    from workers.probes.zoo import shortcut as shortcut_zoo  # hook: the shortcut zoo's own recipe
    from workers.probes.zoo.build import RECIPES, build_one

    captioners = [captioner.NAME, idefics_captioner.NAME, mllama_captioner.NAME]
    known = [*RECIPES, *shortcut_zoo.MODELS, *captioners]
    names = args.only.split(",") if args.only else known
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    root = args.out or zoo.CHECKPOINT_ROOT
    # Each recipe trains single-threaded (reproducible for a fixed thread count), so independent
    # models train side by side in separate processes; the captioners copy a dual encoder's tower and
    # therefore start after the others have finished.
    independent = [n for n in names if n not in captioners]
    if args.jobs > 1 and len(independent) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for line in pool.map(build_one, independent, [root] * len(independent),
                                 [args.steps] * len(independent)):
                print(line, flush=True)
    else:
        for name in independent:
            print(build_one(name, root, args.steps), flush=True)
    for name in [n for n in captioners if n in names]:
        print(build_one(name, root, args.steps), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
