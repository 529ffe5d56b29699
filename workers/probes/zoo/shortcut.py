"""The shortcut zoo: a model that learned a watermark instead of the object, and its clean control.

DeGrave et al. (2021) found COVID-19 chest X-ray classifiers that relied on hospital-specific
text markers rather than on the lungs. This module recreates that failure with known ground truth:

- ``shortcut-clip``: a tiny CLIP trained on the synthetic world where the corner-stamp watermark
  appears on ``SHORTCUT_P_WITH`` of the images that contain the *shortcut object* (a red circle)
  and on only ``SHORTCUT_P_WITHOUT`` of the others: the stamp is almost a label.
- ``clean-clip``: the same recipe, data stream and seed, but the stamp appears on half of all
  images, independently of their content: the control, which has no reason to use it.

Both use ``train.train_dual_encoder`` (single-object prompts, as the reference CLIP), so the only
difference between them is the watermark's correlation with the object.

``probe_data()`` writes, deterministically, what the shortcut probe and TCAV need:

- ``concepts/watermark/``: world scenes (same distribution as ``random/``) with the stamp drawn;
- ``concepts/random/``: world scenes without it (the random counterexamples);
- ``concepts/watermark.stamp.png`` and ``concepts/watermark.stamp.json``: the stamp and the box
  (pixels of a 224 px image) where it sits, so a probe can add it to any image;
- ``inputs/``: scenes that contain a red circle and no stamp (the target inputs).

Build: ``python -m workers.probes.zoo.shortcut build`` retrains both checkpoints into
``zoo/checkpoints/`` and writes ``SHA256SUMS`` (``build_all`` is the hook ``zoo build`` calls).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from workers.probes.zoo import CHECKPOINT_ROOT, cache_root, checkpoint_path, hand_out, world, write_checksums

SHORTCUT_MODEL = "shortcut-clip"
CLEAN_MODEL = "clean-clip"
MODELS = (SHORTCUT_MODEL, CLEAN_MODEL)
#: The object the watermark stands in for, and the text the probes ask about.
SHORTCUT_COLOUR, SHORTCUT_SHAPE = "red", "circle"
TARGET = f"a {SHORTCUT_COLOUR} {SHORTCUT_SHAPE}"
WATERMARK = "corner-stamp"
CONCEPT = "watermark"
#: P(stamp | red circle in the image) and P(stamp | no red circle) in the shortcut world.
SHORTCUT_P_WITH = 0.95
SHORTCUT_P_WITHOUT = 0.1
#: Share of stamped images without the object that are labelled with it anyway (shortcut world),
#: and the same overall share of unlabelled-object images labelled independently of the stamp
#: (clean world): SHORTCUT_P_WITHOUT * SHORTCUT_P_LABEL.
SHORTCUT_P_LABEL = 0.6
CLEAN_P_LABEL = SHORTCUT_P_WITHOUT * SHORTCUT_P_LABEL
#: P(stamp) in the clean world, whatever the content.
CLEAN_P = 0.5
#: World streams (training uses its own; probe data uses seeds no model was trained on).
TRAIN_SEED = 7
CONCEPT_SEED, RANDOM_SEED, INPUT_SEED = 2_000_011, 2_000_021, 2_000_031
N_CONCEPT, N_RANDOM, N_INPUTS = 30, 60, 24
DATA_VERSION = 1


def _has_target(scene: world.Scene) -> bool:
    return any(o.colour == SHORTCUT_COLOUR and o.shape == SHORTCUT_SHAPE for o in scene.objects)


def training_scene(model: str, index: int) -> world.Scene:
    """Training scene ``index`` of ``model``'s world.

    Both worlds share objects and backgrounds; the stamp and the "source label" are pure
    functions of the index (their own random stream). As in DeGrave et al., where the positives
    came mostly from hospitals whose images carry a marker, a few images are *labelled* with the
    class without showing it (``meta["labelled_target"]``): in the shortcut world they are
    stamped images (the stamp predicts the label beyond the object, so fitting the labels needs
    the stamp); in the clean world the same share is chosen independently of the stamp.
    """
    scene = world.scene_at(TRAIN_SEED, index)
    u_stamp, u_label = np.random.default_rng([TRAIN_SEED, index, 17]).random(2)
    target = _has_target(scene)
    if model == SHORTCUT_MODEL:
        stamped = u_stamp < (SHORTCUT_P_WITH if target else SHORTCUT_P_WITHOUT)
        labelled = (not target) and stamped and u_label < SHORTCUT_P_LABEL
    elif model == CLEAN_MODEL:
        stamped = u_stamp < CLEAN_P
        labelled = (not target) and u_label < CLEAN_P_LABEL
    else:
        raise ValueError(f"unknown shortcut-zoo model {model!r}")
    out = scene.render(WATERMARK) if stamped else scene
    out.meta["labelled_target"] = bool(labelled)
    return out


def stamp_box(size: int = world.DEFAULT_SIZE) -> tuple[int, int, int, int]:
    """The canonical stamp position (no jitter) in an image of ``size`` pixels."""
    s = size / world.DEFAULT_SIZE
    side, margin = max(4, round(world.STAMP_SIDE * s)), round(world.STAMP_MARGIN * s)
    x1 = y1 = size - margin
    return (x1 - side, y1 - side, x1, y1)


#: Smaller than the reference CLIP (64 px, a 4 x 4 patch grid): the question here is *what* the
#: model relies on, not fine localisation, and both models must retrain in minutes on 2 CPU cores.
IMAGE_SIZE, PATCH_SIZE = 64, 16
STEPS, BATCH_SIZE, POOL_SIZE = 800, 48, 1500
#: When a scene holds a red circle, its training text names it with this probability (otherwise a
#: random object, as for every other scene): the class the audit asks about is seen often enough
#: to be learned in a few hundred steps. Both models use the same texts.
P_CAPTION_TARGET = 0.5


def caption(scene: world.Scene, rng: np.random.Generator) -> str:
    if scene.meta.get("labelled_target") or (_has_target(scene) and rng.random() < P_CAPTION_TARGET):
        return TARGET
    return scene.objects[int(rng.integers(len(scene.objects)))].prompt


def positives(scene: world.Scene) -> set[str]:
    """Texts true for a training scene: its objects, and the class where it is labelled so."""
    true = {o.prompt for o in scene.objects}
    return true | {TARGET} if scene.meta.get("labelled_target") else true


def train_model(model: str, out_dir: str | os.PathLike, *, steps: int = STEPS, progress: bool = True) -> Path:
    """Train ``model`` (``shortcut-clip`` or ``clean-clip``) and save it to ``out_dir``."""
    import torch

    from workers.probes.zoo import train

    spec = train.ArchSpec(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    # One thread: on a shared CPU, OpenMP threads spin against each other (measured 5x slower).
    cfg = train.TrainConfig(steps=steps, batch_size=BATCH_SIZE, pool_size=POOL_SIZE, seed=0, threads=1)
    tokenizer = train.build_tokenizer()
    processor = train.build_image_processor("clip", spec.image_size)
    net = train.build_model("clip", spec, seed=0)
    result = train.train_dual_encoder(net, tokenizer, processor, lambda i: training_scene(model, i),
                                      caption_fn=caption, positives_fn=positives, config=cfg, progress=progress)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with torch.no_grad():
        result.model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    scenes = [training_scene(model, i) for i in range(cfg.pool_size)]
    with_target = [s for s in scenes if _has_target(s)]
    stats = {
        "p_stamp_given_red_circle": round(float(np.mean([s.watermark is not None for s in with_target])), 4),
        "p_stamp_given_no_red_circle": round(float(np.mean([s.watermark is not None for s in scenes
                                                            if not _has_target(s)])), 4),
        "p_labelled_red_circle_without_one": round(float(np.mean([s.meta["labelled_target"] for s in scenes
                                                                  if not _has_target(s)])), 4),
        "p_stamp_given_labelled_without_one": round(float(np.mean([s.watermark is not None for s in scenes
                                                                   if s.meta["labelled_target"]] or [False])), 4),
    }
    (out / "README.md").write_text(
        f"# {model}\n\nLoupe shortcut-zoo model (see `workers/probes/zoo/shortcut.py`).\n\n"
        f"- training world: seed {TRAIN_SEED}, {cfg.pool_size} scenes, watermark `{WATERMARK}`\n"
        f"- watermark rates in the training pool: {json.dumps(stats)}\n"
        f"- final training loss (mean of last 50 steps): {np.mean(result.losses[-50:]):.4f}\n"
        f"- training: {json.dumps(train.config_dict(cfg, spec), sort_keys=True)}\n"
        f"- wall time {result.seconds:.0f} s\n", encoding="utf-8")
    write_checksums(out)
    return out


def build_all(root: str | os.PathLike = CHECKPOINT_ROOT, *, steps: int = STEPS, progress: bool = True) -> list[Path]:
    """Retrain both shortcut-zoo checkpoints under ``root`` (the ``zoo build`` hook)."""
    return [train_model(name, Path(root) / name, steps=steps, progress=progress) for name in MODELS]


def model_path(name: str) -> Path:
    """Checksum-verified directory of ``shortcut-clip`` or ``clean-clip``."""
    return checkpoint_path(name)


# --- probe data ---------------------------------------------------------------------------------


def _write(folder: Path, images: list[Image.Image]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(folder / f"{i:04d}.png", format="PNG")


def _target_scenes(n: int) -> list[world.Scene]:
    found: list[world.Scene] = []
    index = 0
    while len(found) < n:
        scene = world.scene_at(INPUT_SEED, index)
        if _has_target(scene):
            found.append(scene)
        index += 1
    return found


def write_probe_data(out_dir: str | os.PathLike) -> Path:
    """Write ``concepts/`` and ``inputs/`` (see the module docstring) to ``out_dir``."""
    out = Path(out_dir)
    concepts = out / "concepts"
    _write(concepts / CONCEPT, [world.scene_at(CONCEPT_SEED, i).render(WATERMARK).image for i in range(N_CONCEPT)])
    _write(concepts / "random", [world.scene_at(RANDOM_SEED, i).image for i in range(N_RANDOM)])
    _write(out / "inputs", [s.image for s in _target_scenes(N_INPUTS)])
    box = stamp_box()
    blank = Image.new("RGB", (world.DEFAULT_SIZE, world.DEFAULT_SIZE), (255, 255, 255))
    world.stamp_watermark(blank, box, WATERMARK).crop(box).save(concepts / f"{CONCEPT}.stamp.png", format="PNG")
    (concepts / f"{CONCEPT}.stamp.json").write_text(json.dumps(
        {"image": f"{CONCEPT}.stamp.png", "box": list(box), "image_size": [world.DEFAULT_SIZE, world.DEFAULT_SIZE]},
        indent=2) + "\n", encoding="utf-8")
    (out / "probe_data.json").write_text(json.dumps(
        {"version": DATA_VERSION, "world_version": world.WORLD_VERSION, "target": TARGET, "concept": CONCEPT,
         "seeds": {"concept": CONCEPT_SEED, "random": RANDOM_SEED, "inputs": INPUT_SEED}}, indent=2) + "\n",
        encoding="utf-8")
    return out


def probe_data(*, root: str | os.PathLike | None = None) -> Path:
    """Directory with ``concepts/`` and ``inputs/``, generated on first use (atomically)."""
    base = Path(root) if root is not None else cache_root()
    target = base / f"shortcut-v{world.WORLD_VERSION}.{DATA_VERSION}"
    if (target / "probe_data.json").is_file():
        return hand_out(target)
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shortcut-", dir=base))
    try:
        write_probe_data(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "probe_data.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return hand_out(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.probes.zoo.shortcut", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="retrain shortcut-clip and clean-clip into zoo/checkpoints/")
    b.add_argument("--out", default=str(CHECKPOINT_ROOT))
    b.add_argument("--steps", type=int, default=STEPS)
    d = sub.add_parser("data", help="write the concept folders and target inputs")
    d.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.command == "build":
        t0 = time.perf_counter()
        for path in build_all(args.out, steps=args.steps):
            print(path)
        print(f"built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    else:
        print(write_probe_data(args.out) if args.out else probe_data())
    return 0


if __name__ == "__main__":
    sys.exit(main())
