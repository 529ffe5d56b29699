"""Group-labelled zoo splits: where the ``groups`` probe must find a gap, and where it must not.

Every image holds one world object (so a zero-shot label is unambiguous), labelled with its prompt
and one of ``GROUPS``. In ``groups`` the last group is drawn under a *subgroup condition* that
degrades it: its objects are low-contrast (their colour blended towards the background by
``LOW_CONTRAST``), the way a model can fail on a group of inputs it saw too few of (dark skin under
poor lighting, night-time scenes). The other groups are drawn normally. ``groups-control`` holds
the very same images with the group labels shuffled (seeded): any gap there is chance, so a probe
that reports one as significant after correction controls its errors badly.

Deterministic like the other splits: image ``i`` is a pure function of the split's seed and ``i``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from workers.probes.errors import ProbeInputError

if TYPE_CHECKING:
    from workers.probes.zoo.world import Scene

#: Group names, in order; in the degraded split the last one gets the subgroup condition.
GROUPS: tuple[str, ...] = ("group-a", "group-b", "group-c")
#: Object colour = LOW_CONTRAST * colour + (1 - LOW_CONTRAST) * background, for the degraded group.
LOW_CONTRAST = 0.6
#: Bumped whenever a change alters the images, labels or groups generated.
GROUP_SPLIT_VERSION = 1


@dataclass(frozen=True)
class GroupSplit:
    seed: int
    per_group: int
    degraded: str | None  # the group drawn under the subgroup condition (None: none)
    shuffle_groups: bool  # labels shuffled over the images (the control)


#: Evaluation seeds (>= 1000: never drawn in training, see ``zoo.SPLITS``).
GROUP_SPLITS: dict[str, GroupSplit] = {
    "groups": GroupSplit(seed=1_000_051, per_group=100, degraded=GROUPS[-1], shuffle_groups=False),
    "groups-control": GroupSplit(seed=1_000_051, per_group=100, degraded=GROUPS[-1], shuffle_groups=True),
}


def low_contrast(scene: Scene, factor: float = LOW_CONTRAST) -> Scene:
    """``scene`` redrawn with every object's colour blended towards the background level."""
    from workers.probes.zoo import world

    background = np.median(np.asarray(scene.image.convert("RGB")).reshape(-1, 3), axis=0)
    rgb = {name: tuple(round(factor * c + (1 - factor) * b) for c, b in zip(colour, background, strict=True))
           for name, colour in world.COLOUR_RGB.items()}
    redrawn = world.draw_scene(scene.objects, size=scene.size, background_seed=scene.background_seed,
                               texture=scene.texture, colour_rgb=rgb, meta=dict(scene.meta))
    redrawn.meta["condition"] = "low-contrast"
    return redrawn


def records(spec: GroupSplit) -> Iterator[tuple[Scene, str]]:
    """``(scene, group)`` pairs of the split, in order."""
    from workers.probes.zoo import world

    n = spec.per_group * len(GROUPS)
    groups = [GROUPS[i % len(GROUPS)] for i in range(n)]
    for i in range(n):
        scene = world.scene_at(spec.seed, i, n_objects=1)
        if groups[i] == spec.degraded:
            scene = low_contrast(scene)
        yield scene, groups[i]


def write_group_dataset(out_dir: str | os.PathLike, spec: GroupSplit, *, name: str = "") -> Path:
    """Write ``spec`` as ``images/NNNNN.png`` + ``annotations.jsonl`` lines ``{"image", "label",
    "group", "boxes", "condition"}`` + ``dataset.json``."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    pairs = list(records(spec))
    groups = [g for _, g in pairs]
    if spec.shuffle_groups:
        groups = [groups[k] for k in np.random.default_rng([spec.seed, 99]).permutation(len(groups))]
    with open(out / "annotations.jsonl", "w", encoding="utf-8") as ann:
        for i, ((scene, _), group) in enumerate(zip(pairs, groups, strict=True)):
            rel = f"images/{i:05d}.png"
            scene.image.save(out / rel, format="PNG")
            obj = scene.objects[0]
            ann.write(json.dumps({"image": rel, "label": obj.prompt, "group": group, "boxes": [list(obj.box)],
                                  "condition": scene.meta.get("condition", "standard")}) + "\n")
    info = {"split": name, "seed": spec.seed, "version": GROUP_SPLIT_VERSION, "images": len(pairs),
            "degraded_group": None if spec.shuffle_groups else spec.degraded,
            "condition": f"low contrast (factor {LOW_CONTRAST})", "groups_shuffled": spec.shuffle_groups}
    (out / "dataset.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def group_dataset_dir(split: str = "groups", *, root: str | os.PathLike | None = None) -> Path:
    """Directory of group split ``split`` (see ``GROUP_SPLITS``), generated on first use into the
    zoo cache (written to a temporary sibling and renamed, as ``zoo.dataset_dir`` does)."""
    from workers.probes.zoo import cache_root, materialise, world

    if split not in GROUP_SPLITS:  # pragma: no cover - zoo.dataset_dir only passes known names
        raise ProbeInputError(f"unknown zoo group split {split!r}; known: {', '.join(sorted(GROUP_SPLITS))}")
    base = Path(root) if root is not None else cache_root()
    target = base / f"{split}-v{world.WORLD_VERSION}.{GROUP_SPLIT_VERSION}"
    return materialise(target, lambda tmp: write_group_dataset(tmp, GROUP_SPLITS[split], name=split))
