"""The synthetic world the reference models are trained and audited on.

An audit tool has to be validated on models whose ground truth is known. This world gives it:
every image is a few flat-coloured shapes (``COLOURS`` x ``SHAPES``) at random, non-overlapping
positions on a plain or lightly textured grey background, with

- a caption naming every object, left to right ("a red circle and a blue square"),
- the exact bounding box of every object in pixel coordinates of the stored image
  (``[x0, y0, x1, y1]``, ``x1``/``y1`` exclusive, as drawn), and
- optionally a small watermark ("corner-stamp": a black/white checkerboard stamp) near the
  bottom-right corner, the kind of spurious cue a shortcut-learning model latches onto
  (DeGrave et al. 2021).

Everything is a pure function of an integer seed: scene ``i`` of ``sample_scenes(seed, n)`` is
``scene_at(seed, i)`` and does not depend on ``n``, so splits drawn from different seeds are
disjoint streams and any single example can be regenerated on its own.

The bottom-right corner (``watermark_region``) is always kept free of objects, with or without a
watermark, so that ``scene.render(watermark=...)`` yields *otherwise identical* images with and
without the stamp (the shortcut probe measures the score change between the two).

Public API: ``SHAPES``, ``COLOURS``, ``COLOUR_RGB``, ``WATERMARKS``, ``SceneObject``, ``Scene``,
``render_scene``, ``scene_at``, ``crowded_scene_at`` (and its ``CROWDED_*`` settings), ``Decoy``,
``place_decoys`` (and the ``DECOY_*`` settings), ``sample_scenes``, ``draw_scene``, ``stamp_watermark``,
``watermark_region``, ``caption_for``, ``first_object_prompt``, ``all_object_prompts``, ``write_dataset``,
``read_dataset``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

#: Bumped whenever a change alters the pixels or boxes generated for a given seed.
WORLD_VERSION = 1

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
#: Nominal RGB of each colour; each object jitters it slightly (``colour_jitter``).
COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 85, 215),
    "yellow": (230, 200, 35),
    # Only in crowded scenes (``CROWDED_COLOURS``): the default world never draws them.
    "purple": (135, 60, 190),
    "orange": (240, 130, 25),
}
#: Watermark kinds accepted by ``render_scene`` / ``stamp_watermark`` (``None`` = no watermark).
WATERMARKS: tuple[str, ...] = ("corner-stamp",)

DEFAULT_SIZE = 224
#: Object side length range in pixels at ``DEFAULT_SIZE`` (scaled with the image size).
OBJECT_SIDE = (48, 72)
#: Minimum gap between two objects' boxes, in pixels at ``DEFAULT_SIZE``.
MIN_GAP = 6
#: Watermark stamp side and its distance from the bottom-right corner, at ``DEFAULT_SIZE``.
STAMP_SIDE = 20
STAMP_MARGIN = 8
#: The stamp's position jitters by up to this many pixels (at ``DEFAULT_SIZE``), so a model
#: cannot rely on one exact pixel, as with a real hospital marker.
STAMP_JITTER = 4

Box = tuple[int, int, int, int]

#: Decoys: unnamed grey shapes between the objects (``render_scene(decoys=n)``), in the same shapes
#: and about half the objects' side, at grey levels well below the background's 190-235. They are
#: never named in a caption or prompt. Why: in 2-4 object scenes any map that finds *an* object
#: hits the named one about a third of the time against 0.15 by area, and a randomly initialised
#: network's maps do find objects (they follow contrast, Adebayo et al. 2018), so the randomisation
#: sanity check cannot tell "explains the model" from "finds something that stands out". With
#: decoys as salient as objects but meaningless to a model that binds colour words to shapes, a map
#: that only finds contrast lands on a decoy most of the time, and the trained model's maps don't.
DECOY_SIDE = (22, 36)
DECOY_GREY = (40, 150)


def object_prompt(colour: str, shape: str) -> str:
    """``"a red circle"``, ``"an orange star"``: the one way the zoo names an object."""
    article = "an" if colour[:1] in "aeiou" else "a"
    return f"{article} {colour} {shape}"


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: ``box`` is ``(x0, y0, x1, y1)`` in pixels, x1/y1 exclusive."""

    shape: str
    colour: str
    box: Box

    @property
    def name(self) -> str:
        """``"red circle"``."""
        return f"{self.colour} {self.shape}"

    @property
    def prompt(self) -> str:
        """The single-object prompt the models are trained and audited on: ``"a red circle"``."""
        return object_prompt(self.colour, self.shape)


@dataclass(frozen=True)
class Decoy:
    """An unnamed grey shape (see ``DECOY_SIDE``): ``grey`` is its 0-255 level, ``box`` as for objects."""

    shape: str
    grey: int
    box: Box


@dataclass
class Scene:
    """A rendered scene: the image, its objects (in drawing order) and its caption.

    ``background_seed`` and ``texture`` let ``render`` redraw the identical scene with a
    different watermark setting; ``watermark_box`` is where the stamp was drawn (or ``None``).
    """

    image: Image.Image
    objects: list[SceneObject]
    caption: str
    size: int
    background_seed: int
    texture: bool
    watermark: str | None = None
    watermark_box: Box | None = None
    meta: dict = field(default_factory=dict)
    decoys: list[Decoy] = field(default_factory=list)

    def render(self, watermark: str | None) -> Scene:
        """The same objects and background, with ``watermark`` (``None`` removes it).

        The stamp lands on the same position as in this scene if it had one, otherwise on the
        position the background seed picks; objects never overlap the stamp region.
        """
        return draw_scene(
            self.objects,
            size=self.size,
            background_seed=self.background_seed,
            texture=self.texture,
            watermark=watermark,
            watermark_box=self.watermark_box,
            meta=dict(self.meta),
            decoys=self.decoys,
        )

    def boxes_for(self, prompt: str) -> list[Box]:
        """Boxes of every object whose ``prompt`` equals ``prompt`` (``[]`` if none)."""
        return [o.box for o in self.objects if o.prompt == prompt]


def watermark_region(size: int = DEFAULT_SIZE) -> Box:
    """The bottom-right square (stamp + jitter + margin) that objects never enter."""
    s = size / DEFAULT_SIZE
    reach = round((STAMP_SIDE + STAMP_MARGIN + STAMP_JITTER + MIN_GAP) * s)
    return (size - reach, size - reach, size, size)


def caption_for(objects: Sequence[SceneObject]) -> str:
    """``"a red circle, a green cross and a blue square"``, objects ordered left to right."""
    names = [o.prompt for o in sorted(objects, key=lambda o: (o.box[0] + o.box[2], o.box[1]))]
    if len(names) <= 2:
        return " and ".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def _overlaps(a: Box, b: Box, gap: int) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _pick_attributes(
    rng: np.random.Generator,
    n: int,
    shapes: Sequence[str],
    colours: Sequence[str],
    distinct_shapes: bool,
    distinct_colours: bool,
) -> list[tuple[str, str]]:
    if distinct_shapes and n > len(shapes):
        raise ValueError(f"{n} objects with distinct shapes need at least {n} shapes, got {len(shapes)}")
    if distinct_colours and n > len(colours):
        raise ValueError(f"{n} objects with distinct colours need at least {n} colours, got {len(colours)}")
    if n > len(shapes) * len(colours):
        raise ValueError(f"{n} distinct objects need {n} shape x colour pairs")
    sh = list(rng.permutation(len(shapes))[:n]) if distinct_shapes else list(rng.integers(0, len(shapes), n))
    co = list(rng.permutation(len(colours))[:n]) if distinct_colours else list(rng.integers(0, len(colours), n))
    pairs = [(shapes[int(s)], colours[int(c)]) for s, c in zip(sh, co, strict=True)]
    # Even with repeated shapes or colours, no two objects are identical: a prompt names one object.
    seen: set[tuple[str, str]] = set()
    for i, p in enumerate(pairs):
        while p in seen:
            p = (shapes[int(rng.integers(len(shapes)))], colours[int(rng.integers(len(colours)))])
        pairs[i] = p
        seen.add(p)
    return pairs


def _place(rng: np.random.Generator, n: int, size: int, side_range: tuple[int, int], max_tries: int,
           taken: Sequence[Box] = ()) -> list[Box]:
    """Up to ``n`` square boxes (side in ``side_range`` at ``DEFAULT_SIZE``), placed one at a time at
    random, ``MIN_GAP`` apart from each other and from ``taken``, inside the border and outside the
    watermark region; stops after ``max_tries`` draws."""
    s = size / DEFAULT_SIZE
    lo, hi = round(side_range[0] * s), round(side_range[1] * s)
    gap = max(1, round(MIN_GAP * s))
    border = max(1, round(4 * s))
    reserved = watermark_region(size)
    boxes: list[Box] = []
    for _ in range(max_tries):
        if len(boxes) == n:
            break
        side = int(rng.integers(lo, hi + 1))
        x0 = int(rng.integers(border, size - border - side + 1))
        y0 = int(rng.integers(border, size - border - side + 1))
        box = (x0, y0, x0 + side, y0 + side)
        if _overlaps(box, reserved, 0) or any(_overlaps(box, b, gap) for b in (*taken, *boxes)):
            continue
        boxes.append(box)
    return boxes


def _layout(rng: np.random.Generator, n: int, size: int, max_tries: int = 2000,
            side_range: tuple[int, int] = OBJECT_SIDE, restarts: int = 20) -> list[Box]:
    # Sequential placement can paint itself into a corner when the scene is crowded; it then starts
    # over (still a pure function of ``rng``). Scenes that fit at the first attempt - every scene of
    # the default world - consume exactly the random numbers they always did.
    for _ in range(restarts):
        boxes = _place(rng, n, size, side_range, max_tries)
        if len(boxes) == n:
            return boxes
    raise ValueError(f"could not place {n} non-overlapping objects in a {size}px image")


def _background(size: int, background_seed: int, texture: bool) -> np.ndarray:
    rng = np.random.default_rng([background_seed, 7])
    level = int(rng.integers(190, 236))
    tint = rng.integers(-6, 7, size=3)
    base = np.clip(level + tint, 0, 255).astype(np.float32)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    if texture:
        # Low-amplitude smooth noise: enough that "background" is not a single colour, far
        # too weak to be confused with an object.
        coarse = rng.normal(0.0, 6.0, size=(size // 16 + 2, size // 16 + 2, 1)).astype(np.float32)
        smooth = np.asarray(
            Image.fromarray(coarse[..., 0]).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32
        )[..., None]
        grain = rng.normal(0.0, 2.5, size=(size, size, 1)).astype(np.float32)
        img += smooth + grain
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, box: Box, rgb: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    # PIL's shape coordinates are inclusive; the boxes we report are exclusive.
    xa, ya, xb, yb = x0, y0, x1 - 1, y1 - 1
    if shape == "circle":
        draw.ellipse((xa, ya, xb, yb), fill=rgb)
    elif shape == "square":
        draw.rectangle((xa, ya, xb, yb), fill=rgb)
    elif shape == "triangle":
        draw.polygon([(xa, yb), (xb, yb), ((xa + xb) / 2, ya)], fill=rgb)
    elif shape in ("cross", "plus"):
        w = (x1 - x0) / 3
        h = (y1 - y0) / 3
        draw.rectangle((xa + w, ya, xb - w, yb), fill=rgb)
        draw.rectangle((xa, ya + h, xb, yb - h), fill=rgb)
    elif shape == "ring":
        width = max(2, round((x1 - x0) / 4.5))
        draw.ellipse((xa, ya, xb, yb), outline=rgb, width=width)
    elif shape == "star":
        cx, cy = (xa + xb) / 2, (ya + yb) / 2
        r_out, r_in = (xb - xa) / 2, (xb - xa) / 5
        pts = []
        for k in range(10):
            ang = -np.pi / 2 + k * np.pi / 5
            r = r_out if k % 2 == 0 else r_in
            pts.append((cx + r * np.cos(ang), cy + r * np.sin(ang)))
        draw.polygon(pts, fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _stamp_box(size: int, background_seed: int) -> Box:
    s = size / DEFAULT_SIZE
    side = max(4, round(STAMP_SIDE * s))
    margin = round(STAMP_MARGIN * s)
    jitter = round(STAMP_JITTER * s)
    rng = np.random.default_rng([background_seed, 11])
    dx, dy = (int(v) for v in rng.integers(0, jitter + 1, size=2))
    x1 = size - margin - dx
    y1 = size - margin - dy
    return (x1 - side, y1 - side, x1, y1)


def stamp_watermark(image: Image.Image, box: Box, kind: str = "corner-stamp") -> Image.Image:
    """Draw the watermark ``kind`` into ``box`` of a copy of ``image`` and return the copy.

    "corner-stamp" is a 4x4 black/white checkerboard inside a black frame: a texture no object
    in the world has, so a model can only associate it with content through co-occurrence.
    Works on any RGB image (e.g. to build watermark concept folders from other images).
    """
    if kind not in WATERMARKS:
        raise ValueError(f"unknown watermark {kind!r}; known: {', '.join(WATERMARKS)}")
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    x0, y0, x1, y1 = box
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(0, 0, 0))
    inner = max(1, (x1 - x0) // 10)
    ix0, iy0, ix1, iy1 = x0 + inner, y0 + inner, x1 - inner, y1 - inner
    cells = 4
    cw, ch = (ix1 - ix0) / cells, (iy1 - iy0) / cells
    for r in range(cells):
        for c in range(cells):
            fill = (250, 250, 250) if (r + c) % 2 == 0 else (10, 10, 10)
            draw.rectangle(
                (round(ix0 + c * cw), round(iy0 + r * ch), round(ix0 + (c + 1) * cw) - 1,
                 round(iy0 + (r + 1) * ch) - 1),
                fill=fill,
            )
    return out


def draw_scene(
    objects: Sequence[SceneObject],
    *,
    size: int = DEFAULT_SIZE,
    background_seed: int = 0,
    texture: bool = True,
    watermark: str | None = None,
    watermark_box: Box | None = None,
    colour_rgb: dict[str, tuple[int, int, int]] | None = None,
    meta: dict | None = None,
    decoys: Sequence[Decoy] = (),
) -> Scene:
    """Draw given objects (boxes already laid out) on the background ``background_seed`` picks.

    Colours get a small per-object jitter derived from ``background_seed`` and the object's
    index, so redrawing the same arguments gives the same pixels.
    """
    if watermark is not None and watermark not in WATERMARKS:
        raise ValueError(f"unknown watermark {watermark!r}; known: {', '.join(WATERMARKS)}")
    palette = COLOUR_RGB if colour_rgb is None else colour_rgb
    img = Image.fromarray(_background(size, background_seed, texture))
    draw = ImageDraw.Draw(img)
    jitter_rng = np.random.default_rng([background_seed, 13])
    for obj in objects:
        if obj.colour not in palette:
            raise ValueError(f"unknown colour {obj.colour!r}")
        jitter = jitter_rng.integers(-12, 13, size=3)
        red, green, blue = (int(v) for v in np.clip(np.array(palette[obj.colour]) + jitter, 0, 255))
        _draw_object(draw, obj.shape, obj.box, (red, green, blue))
    for decoy in decoys:
        _draw_object(draw, decoy.shape, decoy.box, (decoy.grey,) * 3)
    wbox = None
    if watermark is not None:
        wbox = watermark_box or _stamp_box(size, background_seed)
        img = stamp_watermark(img, wbox, watermark)
    return Scene(
        image=img,
        objects=list(objects),
        caption=caption_for(objects),
        size=size,
        background_seed=background_seed,
        texture=texture,
        watermark=watermark,
        watermark_box=wbox,
        meta=dict(meta or {}),
        decoys=list(decoys),
    )


def place_decoys(objects: Sequence[SceneObject], n: int, *, size: int, background_seed: int,
                 side_range: tuple[int, int] = DECOY_SIDE, shapes: Sequence[str] = SHAPES) -> list[Decoy]:
    """Up to ``n`` decoys in the space the objects leave (same gaps, border and free watermark
    corner as objects); fewer when a scene has no room. A pure function of ``background_seed``, with
    a generator of its own, so that asking for decoys never changes a scene's objects."""
    rng = np.random.default_rng([background_seed, 17])
    boxes = _place(rng, n, size, side_range, max_tries=200 * n, taken=[o.box for o in objects])
    shape_ids = rng.integers(len(shapes), size=len(boxes))
    greys = rng.integers(DECOY_GREY[0], DECOY_GREY[1] + 1, size=len(boxes))
    return [Decoy(shape=shapes[int(i)], grey=int(g), box=b) for i, g, b in zip(shape_ids, greys, boxes, strict=True)]


def render_scene(
    rng: np.random.Generator,
    n_objects: int | tuple[int, int] = (2, 4),
    *,
    size: int = DEFAULT_SIZE,
    watermark: str | None = None,
    texture: bool = True,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = COLOURS,
    distinct_shapes: bool = True,
    distinct_colours: bool = True,
    object_side: tuple[int, int] = OBJECT_SIDE,
    decoys: int = 0,
) -> Scene:
    """Draw one random scene using ``rng`` (consumed deterministically).

    ``n_objects`` is a count or an inclusive ``(low, high)`` range. By default every object in a
    scene has a different shape *and* a different colour, so "a red circle" names exactly one
    object and either word alone already locates it; set ``distinct_*=False`` for scenes where
    binding colour to shape matters (no two objects are ever identical). ``object_side`` is the
    side length range in pixels at ``DEFAULT_SIZE``. ``decoys``: how many unnamed grey shapes to
    place between the objects (``place_decoys``); the objects are the same with or without them.
    """
    if isinstance(n_objects, tuple):
        n = int(rng.integers(n_objects[0], n_objects[1] + 1))
    else:
        n = int(n_objects)
    if n < 1:
        raise ValueError("a scene needs at least one object")
    pairs = _pick_attributes(rng, n, shapes, colours, distinct_shapes, distinct_colours)
    boxes = _layout(rng, n, size, side_range=object_side)
    background_seed = int(rng.integers(0, 2**31 - 1))
    objects = [SceneObject(shape=s, colour=c, box=b) for (s, c), b in zip(pairs, boxes, strict=True)]
    extra = place_decoys(objects, decoys, size=size, background_seed=background_seed) if decoys else []
    return draw_scene(objects, size=size, background_seed=background_seed, texture=texture, watermark=watermark,
                      decoys=extra)


#: Crowded scenes: 5-6 smaller objects, all of different shapes and colours, from a wider palette.
#: In the default world (2-4 objects) any map that merely finds *an* object - the maps of a
#: randomly initialised network, which follow colour contrast (Adebayo et al. 2018) - hits the
#: named one 1 time in 3 against 0.15 by area, so the randomisation sanity check cannot tell
#: "finds the named object" from "finds something". With 5-6 objects the two rates meet.
CROWDED_SHAPES: tuple[str, ...] = (*SHAPES, "star", "ring")
CROWDED_COLOURS: tuple[str, ...] = (*COLOURS, "purple", "orange")
CROWDED_OBJECTS = (5, 6)
CROWDED_SIDE = (40, 58)


def crowded_scene_at(seed: int, index: int, **kwargs: Any) -> Scene:
    """Scene ``index`` of the *crowded* stream ``seed`` (see ``CROWDED_SHAPES``)."""
    options = dict(n_objects=CROWDED_OBJECTS, shapes=CROWDED_SHAPES, colours=CROWDED_COLOURS,
                   object_side=CROWDED_SIDE)
    return scene_at(seed, index, **{**options, **kwargs})


def scene_at(seed: int, index: int, **kwargs: Any) -> Scene:
    """Scene ``index`` of the stream ``seed``: independent of how many scenes are drawn."""
    scene = render_scene(np.random.default_rng([int(seed), int(index)]), **kwargs)
    scene.meta.update(seed=int(seed), index=int(index))
    return scene


def sample_scenes(seed: int, n: int, start: int = 0, **kwargs: Any) -> list[Scene]:
    """Scenes ``start .. start + n - 1`` of stream ``seed`` (``kwargs`` go to ``render_scene``)."""
    return [scene_at(seed, i, **kwargs) for i in range(start, start + n)]


# --- the grounding dataset format ---------------------------------------------------------

Example = tuple[str, list[Box]]


def first_object_prompt(scene: Scene) -> list[Example]:
    """One example per scene: the first-drawn object (a uniformly random one, since drawing
    order is random; the caption, not the object list, is sorted left to right)."""
    obj = scene.objects[0]
    return [(obj.prompt, scene.boxes_for(obj.prompt))]


def all_object_prompts(scene: Scene) -> list[Example]:
    """One example per object in the scene."""
    return [(o.prompt, scene.boxes_for(o.prompt)) for o in scene.objects]


def write_dataset(
    out_dir: str | os.PathLike,
    scenes: Iterable[Scene],
    prompt_fn: Callable[[Scene], list[Example]] = first_object_prompt,
    *,
    info: dict | None = None,
) -> Path:
    """Write ``scenes`` as a grounding dataset and return ``out_dir``.

    Layout: ``images/00000.png`` ... and ``annotations.jsonl`` with one line per example,
    ``{"image": "images/00000.png", "prompt": "a red circle", "boxes": [[x0, y0, x1, y1]]}``
    (pixel coordinates of the stored PNG), plus ``scenes.jsonl`` (every object, caption and
    watermark box per image, for probes that need more than one prompt) and ``dataset.json``
    (``info`` and the world version). ``prompt_fn`` maps a scene to ``(prompt, boxes)`` pairs.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    n_images = n_examples = 0
    with open(out / "annotations.jsonl", "w", encoding="utf-8") as ann, open(
        out / "scenes.jsonl", "w", encoding="utf-8"
    ) as sc:
        for i, scene in enumerate(scenes):
            rel = f"images/{i:05d}.png"
            scene.image.save(out / rel, format="PNG")
            n_images += 1
            for prompt, boxes in prompt_fn(scene):
                ann.write(json.dumps({"image": rel, "prompt": prompt, "boxes": [list(b) for b in boxes]}) + "\n")
                n_examples += 1
            sc.write(
                json.dumps(
                    {
                        "image": rel,
                        "caption": scene.caption,
                        "objects": [{"shape": o.shape, "colour": o.colour, "box": list(o.box)} for o in scene.objects],
                        "watermark": scene.watermark,
                        "watermark_box": list(scene.watermark_box) if scene.watermark_box else None,
                        **({"decoys": [{"shape": d.shape, "grey": d.grey, "box": list(d.box)} for d in scene.decoys]}
                           if scene.decoys else {}),
                        **{k: v for k, v in scene.meta.items() if k in ("seed", "index")},
                    }
                )
                + "\n"
            )
    meta = {"world_version": WORLD_VERSION, "images": n_images, "examples": n_examples, **(info or {})}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


@dataclass(frozen=True)
class Annotation:
    """One line of ``annotations.jsonl``; ``image`` is the absolute path."""

    image: Path
    prompt: str
    boxes: list[Box]


def read_dataset(dataset_dir: str | os.PathLike) -> Iterator[Annotation]:
    """Iterate ``annotations.jsonl`` of a dataset written by ``write_dataset`` (no validation
    beyond JSON parsing: the grounding engine's loader validates untrusted datasets)."""
    root = Path(dataset_dir)
    with open(root / "annotations.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                yield Annotation(
                    image=root / rec["image"],
                    prompt=rec["prompt"],
                    boxes=[(int(x0), int(y0), int(x1), int(y1)) for x0, y0, x1, y1 in rec["boxes"]],
                )
