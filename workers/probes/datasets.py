"""Grounding datasets: images, prompts and ground-truth boxes, validated before any model runs.

Two formats (``load_dataset(path, format=...)``):

``jsonl`` (default): ``DIR/annotations.jsonl``, one JSON object per line::

    {"image": "relative/path.png", "prompt": "a red circle", "boxes": [[x0, y0, x1, y1], ...]}

Boxes are in pixel coordinates of the image as stored (x to the right, y down, ``x0 < x1``,
``y0 < y1``, inside ``[0, width] x [0, height]``). Blank lines are ignored.

``coco``: a COCO "instances" JSON (``DIR/instances.json``, ``DIR/annotations.json``, the only
``*.json`` in ``DIR`` or ``DIR/annotations/``, or the path of the JSON file itself). One example is
made per (image, category) pair present in the image; its boxes are all that category's boxes in
that image (COCO ``bbox`` is ``[x, y, width, height]``) and its prompt is
``prompt_template.format(name=category_name)``, by default ``"a photo of a {name}"`` (the usual
CLIP zero-shot phrasing). Images are looked up relative to the JSON's folder, then ``images/``.

Everything a user can get wrong is refused with a ``ProbeInputError`` that names the file and
line: malformed JSON, missing keys, missing or unreadable images, image formats other than common
raster ones, images above ``max_pixels`` (decompression bombs), boxes outside the image, paths
escaping the dataset folder, and empty datasets.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile, UnidentifiedImageError

from workers.probes.errors import ProbeInputError

ANNOTATIONS_FILE = "annotations.jsonl"
FORMATS = ("jsonl", "coco")
DEFAULT_PROMPT_TEMPLATE = "a photo of a {name}"
# ~40 megapixels (e.g. 8000 x 5000). Bigger images are refused before they are decoded: a small
# compressed file can expand to gigabytes (a "decompression bomb"), and no grounding map needs it.
MAX_PIXELS = 40_000_000
# Formats Pillow may open. Others (EPS calls Ghostscript, for instance) are refused on purpose.
IMAGE_FORMATS = ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"]

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class GroundingExample:
    """One image-prompt pair with its ground-truth boxes (pixel coordinates of the stored image)."""

    image_path: Path
    prompt: str
    boxes: tuple[Box, ...]
    width: int
    height: int
    source: str  # "annotations.jsonl:12" or "instances.json:annotation 7": where it came from

    def load_image(self) -> Image.Image:
        """Decode the image as RGB (raises ``ProbeInputError`` naming the file if that fails)."""
        return open_image(self.image_path, max_pixels=self.width * self.height, decode=True)


@dataclass
class GroundingDataset:
    root: Path
    examples: list[GroundingExample]
    format: str
    annotation_file: Path

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[GroundingExample]:
        return iter(self.examples)

    def __getitem__(self, index: int) -> GroundingExample:
        return self.examples[index]

    def fingerprint(self) -> str:
        """SHA-256 over the annotation file and every image file used, so a report can say
        exactly which data its numbers come from."""
        digest = hashlib.sha256()
        digest.update(self.annotation_file.read_bytes())
        for path in sorted({example.image_path for example in self.examples}):
            digest.update(str(path.relative_to(self.root)).encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()


def load_dataset(path: str | Path, *, format: str = "jsonl", limit: int | None = None,
                 prompt_template: str = DEFAULT_PROMPT_TEMPLATE, max_pixels: int = MAX_PIXELS) -> GroundingDataset:
    """Read and validate a grounding dataset; the first ``limit`` examples if given."""
    if format not in FORMATS:
        raise ProbeInputError(f"unknown dataset format {format!r}; use one of: {', '.join(FORMATS)}")
    if limit is not None and limit < 1:
        raise ProbeInputError(f"--limit must be at least 1, got {limit}")
    path = Path(path)
    if not path.exists():
        raise ProbeInputError(f"dataset not found: {path}")
    if format == "jsonl":
        dataset = _load_jsonl(path, limit=limit, max_pixels=max_pixels)
    else:
        dataset = _load_coco(path, limit=limit, prompt_template=prompt_template, max_pixels=max_pixels)
    if not dataset.examples:
        raise ProbeInputError(f"dataset is empty: {dataset.annotation_file} has no examples")
    return dataset


def open_image(path: Path, *, max_pixels: int = MAX_PIXELS, decode: bool = False) -> Image.Image:
    """Open ``path`` as an image, refusing unknown formats and images above ``max_pixels``.

    Only the header is read unless ``decode`` (then the RGB pixels are loaded and returned).
    """
    try:
        image = Image.open(path, formats=IMAGE_FORMATS)
    except FileNotFoundError:
        raise ProbeInputError(f"image not found: {path}") from None
    except Image.DecompressionBombError:
        raise ProbeInputError(f"image too large (decompression bomb guard): {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ProbeInputError(f"unreadable image {path}: not a {'/'.join(IMAGE_FORMATS)} image ({exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ProbeInputError(f"image too large: {path} is {width}x{height} pixels, "
                              f"more than the limit of {max_pixels} pixels")
    if width < 1 or height < 1:
        raise ProbeInputError(f"unreadable image {path}: empty ({width}x{height})")
    if not decode:
        return image
    # Other libraries in the same process (WeasyPrint, on import) switch Pillow to silently
    # padding truncated files with grey; an audit must refuse them instead.
    lenient = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ProbeInputError(f"unreadable image {path}: {exc}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def _resolve_image(root: Path, relative: Any, where: str, *, search: Sequence[Path] = ()) -> Path:
    if not isinstance(relative, str) or not relative.strip():
        raise ProbeInputError(f"{where}: \"image\" must be a non-empty relative path")
    candidate = Path(relative)
    if candidate.is_absolute():
        raise ProbeInputError(f"{where}: image path {relative!r} must be relative to the dataset folder")
    real_root = root.resolve()
    for base in (root, *search):
        full = (base / candidate)
        if full.exists():
            # A dataset is untrusted input: it may not read files outside its own folder.
            if not full.resolve().is_relative_to(real_root):
                raise ProbeInputError(f"{where}: image path {relative!r} points outside the dataset folder")
            if not full.is_file():
                raise ProbeInputError(f"{where}: image {relative!r} is not a file")
            return full
    if ".." in candidate.parts:
        raise ProbeInputError(f"{where}: image path {relative!r} points outside the dataset folder")
    raise ProbeInputError(f"{where}: image not found: {root / candidate}")


def _validate_box(raw: Any, width: int, height: int, where: str) -> Box:
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        raise ProbeInputError(f"{where}: a box must be [x0, y0, x1, y1], got {raw!r}")
    try:
        x0, y0, x1, y1 = (float(v) for v in raw)
    except (TypeError, ValueError):
        raise ProbeInputError(f"{where}: box coordinates must be numbers, got {raw!r}") from None
    if any(isinstance(v, bool) for v in raw) or not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ProbeInputError(f"{where}: box coordinates must be finite numbers, got {raw!r}")
    if not (x0 < x1 and y0 < y1):
        raise ProbeInputError(f"{where}: box {raw!r} is empty or inverted (need x0 < x1 and y0 < y1)")
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise ProbeInputError(f"{where}: box {raw!r} lies outside the {width}x{height} image")
    return (x0, y0, x1, y1)


def _image_size(path: Path, max_pixels: int, sizes: dict[Path, tuple[int, int]]) -> tuple[int, int]:
    if path not in sizes:
        with open_image(path, max_pixels=max_pixels) as image:
            sizes[path] = image.size
    return sizes[path]


# The same path, box and size rules for other annotation formats (``groups.py``'s group-labelled files).
resolve_image = _resolve_image
validate_box = _validate_box
image_size = _image_size


def annotation_records(annotation_file: Path, required: Sequence[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each non-blank line of a JSON-lines annotation file as ``(where, record)``: ``where`` names
    the file and line for error messages; ``record`` is checked to be an object with ``required`` keys."""
    try:
        lines = annotation_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ProbeInputError(f"{annotation_file} is not UTF-8 text") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{annotation_file.name}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ProbeInputError(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise ProbeInputError(f"{where}: expected a JSON object with {', '.join(required[:-1])} and {required[-1]}")
        missing = [key for key in required if key not in record]
        if missing:
            raise ProbeInputError(f"{where}: missing key(s) {', '.join(missing)}")
        yield where, record


def _load_jsonl(path: Path, *, limit: int | None, max_pixels: int) -> GroundingDataset:
    if path.is_file():
        annotation_file, root = path, path.parent
    else:
        annotation_file, root = path / ANNOTATIONS_FILE, path
        if not annotation_file.is_file():
            raise ProbeInputError(f"{path} has no {ANNOTATIONS_FILE} (use --format coco for a COCO instances JSON)")
    examples: list[GroundingExample] = []
    sizes: dict[Path, tuple[int, int]] = {}
    for where, record in annotation_records(annotation_file, ("image", "prompt", "boxes")):
        if limit is not None and len(examples) >= limit:
            break
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ProbeInputError(f"{where}: \"prompt\" must be a non-empty string")
        boxes = record["boxes"]
        if not isinstance(boxes, list) or not boxes:
            raise ProbeInputError(f"{where}: \"boxes\" must be a non-empty list of [x0, y0, x1, y1]")
        image_path = _resolve_image(root, record["image"], where)
        width, height = _image_size(image_path, max_pixels, sizes)
        validated = tuple(_validate_box(box, width, height, where) for box in boxes)
        examples.append(GroundingExample(image_path, prompt.strip(), validated, width, height, where))
    return GroundingDataset(root=root, examples=examples, format="jsonl", annotation_file=annotation_file)


def _find_coco_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in ("instances.json", "annotations.json"):
        if (path / name).is_file():
            return path / name
    for folder in (path, path / "annotations"):
        candidates = sorted(folder.glob("*.json")) if folder.is_dir() else []
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            raise ProbeInputError(f"{folder} holds several JSON files ({', '.join(c.name for c in candidates)}); "
                                  "pass the COCO instances file itself as --dataset")
    raise ProbeInputError(f"no COCO instances JSON found in {path}")


def _load_coco(path: Path, *, limit: int | None, prompt_template: str, max_pixels: int) -> GroundingDataset:
    annotation_file = _find_coco_file(path)
    root = annotation_file.parent if annotation_file.parent.name != "annotations" else annotation_file.parent.parent
    name = annotation_file.name
    try:
        data = json.loads(annotation_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ProbeInputError(f"{name} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ProbeInputError(f"{name}: malformed JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise ProbeInputError(f"{name}: not a COCO instances file "
                              "(needs lists \"images\", \"annotations\", \"categories\")")
    try:
        template_ok = prompt_template.format(name="x")
    except (KeyError, IndexError, ValueError):
        template_ok = ""
    if not template_ok:
        raise ProbeInputError(f"prompt template {prompt_template!r} must contain {{name}} and nothing else in braces")
    categories: dict[Any, str] = {}
    for index, category in enumerate(data["categories"]):
        if not isinstance(category, dict) or "id" not in category or not isinstance(category.get("name"), str):
            raise ProbeInputError(f"{name}: category {index} needs an \"id\" and a \"name\"")
        categories[category["id"]] = category["name"]
    images: dict[Any, dict] = {}
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise ProbeInputError(f"{name}: image {index} needs an \"id\" and a \"file_name\"")
        images[image["id"]] = image
    # (image id, category id) -> boxes, in the order they first appear
    grouped: dict[tuple[Any, Any], list[tuple[Any, str]]] = {}
    for index, annotation in enumerate(data["annotations"]):
        where = f"{name}: annotation {index}"
        if not isinstance(annotation, dict):
            raise ProbeInputError(f"{where}: expected an object")
        if annotation.get("image_id") not in images:
            raise ProbeInputError(f"{where}: unknown image_id {annotation.get('image_id')!r}")
        if annotation.get("category_id") not in categories:
            raise ProbeInputError(f"{where}: unknown category_id {annotation.get('category_id')!r}")
        bbox = annotation.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise ProbeInputError(f"{where}: \"bbox\" must be [x, y, width, height]")
        grouped.setdefault((annotation["image_id"], annotation["category_id"]), []).append((bbox, where))
    examples: list[GroundingExample] = []
    sizes: dict[Path, tuple[int, int]] = {}
    for (image_id, category_id), boxes in grouped.items():
        if limit is not None and len(examples) >= limit:
            break
        first_where = boxes[0][1]
        image_path = _resolve_image(root, images[image_id]["file_name"], first_where, search=[root / "images"])
        width, height = _image_size(image_path, max_pixels, sizes)
        validated = []
        for bbox, where in boxes:
            try:
                x, y, w, h = (float(v) for v in bbox)
            except (TypeError, ValueError):
                raise ProbeInputError(f"{where}: bbox coordinates must be numbers, got {bbox!r}") from None
            validated.append(_validate_box([x, y, x + w, y + h], width, height, where))
        prompt = prompt_template.format(name=categories[category_id])
        examples.append(GroundingExample(image_path, prompt, tuple(validated), width, height, first_where))
    return GroundingDataset(root=root, examples=examples, format="coco", annotation_file=annotation_file)
