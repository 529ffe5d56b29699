"""Images with *every* object named: what probes of generated text check themselves against.

A grounding dataset (``annotations.jsonl``) pairs an image with one prompt. A caption names
several objects, so probes of generative models need all of them: the zoo's datasets carry a
``scenes.jsonl`` (one line per image, every object's shape, colour and box); for other datasets the
annotations are grouped by image and each prompt becomes one object (its words are matched against
the generated text).

Validation is the grounding loader's (``datasets.load_dataset``): missing or unreadable images,
malformed JSON and boxes outside the image are refused with a ``ProbeInputError``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from workers.probes.datasets import load_dataset, open_image
from workers.probes.errors import ProbeInputError

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class NamedObject:
    """One object: the words that name it (e.g. ``("red", "circle")``) and its box."""

    words: tuple[str, ...]
    box: Box
    colour: str | None = None
    shape: str | None = None


@dataclass(frozen=True)
class SceneImage:
    image_path: Path
    width: int
    height: int
    objects: tuple[NamedObject, ...]
    prompt: str  # the dataset's prompt for this image (the first one)

    def load_image(self) -> Image.Image:
        return open_image(self.image_path, max_pixels=self.width * self.height, decode=True)

    def object_for(self, word: str) -> NamedObject | None:
        """The single object a word names, or ``None`` if none or several do."""
        hits = [o for o in self.objects if word in o.words]
        return hits[0] if len(hits) == 1 else None

    @property
    def boxes(self) -> list[Box]:
        return [o.box for o in self.objects]


def load_scenes(dataset_dir: str | Path, *, limit: int | None = None) -> list[SceneImage]:
    """Images of a grounding dataset with all their objects (see the module docstring)."""
    dataset = load_dataset(dataset_dir)
    by_image: dict[Path, list] = {}
    for ex in dataset:
        by_image.setdefault(ex.image_path, []).append(ex)
    scene_objects = read_scenes_jsonl(dataset.root)
    out: list[SceneImage] = []
    for path, examples in by_image.items():
        first = examples[0]
        objects = scene_objects.get(Path(path).resolve())  # keys are resolved: a relative dataset path must match
        if objects is None:
            objects = tuple(NamedObject(words=tuple(ex.prompt.lower().split()), box=tuple(b))
                            for ex in examples for b in ex.boxes)
        for o in objects:
            x0, y0, x1, y1 = o.box
            if not (0 <= x0 < x1 <= first.width and 0 <= y0 < y1 <= first.height):
                raise ProbeInputError(f"{dataset.root / 'scenes.jsonl'}: box {list(o.box)} lies outside the "
                                      f"{first.width}x{first.height} image {path.name}")
        out.append(SceneImage(image_path=path, width=first.width, height=first.height, objects=objects,
                              prompt=first.prompt))
        if limit is not None and len(out) >= limit:
            break
    return out


def read_scenes_jsonl(root: Path) -> dict[Path, tuple[NamedObject, ...]]:
    path = root / "scenes.jsonl"
    if not path.is_file():
        return {}
    found: dict[Path, tuple[NamedObject, ...]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                image = (root / rec["image"]).resolve()
                objects = tuple(
                    NamedObject(words=(str(o["colour"]).lower(), str(o["shape"]).lower()),
                                box=tuple(float(v) for v in o["box"]),  # type: ignore[arg-type]
                                colour=str(o["colour"]).lower(), shape=str(o["shape"]).lower())
                    for o in rec["objects"])
            except (ValueError, KeyError, TypeError) as exc:
                raise ProbeInputError(f"{path}:{lineno}: malformed scene record ({exc})") from None
            if any(len(o.box) != 4 for o in objects):
                raise ProbeInputError(f"{path}:{lineno}: every box needs 4 numbers")
            found[image] = objects
    return found
