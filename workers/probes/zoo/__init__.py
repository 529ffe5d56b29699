"""Loupe's reference model zoo: models trained on a synthetic world whose ground truth is known.

An audit tool cannot be trusted on models it has never seen explained correctly, and public
pretrained weights cannot be downloaded here. So the zoo trains its own tiny dual encoders on
``world`` (shapes x colours with exact boxes) and ships them as ordinary Hugging Face
checkpoints (config, safetensors, tokenizer, image processor, model card, ``SHA256SUMS``).

- ``world``: the synthetic world and the grounding dataset writer.
- ``train``: ``train_dual_encoder`` and the tiny CLIP / SigLIP configs.
- ``checkpoint_path(name)``: the committed checkpoint directory, checksums verified.
- ``dataset_dir(split)``: a split generated deterministically into a cache on first use (the
  group-labelled ``groups`` / ``groups-control`` splits come from ``group_split``).
- ``python -m workers.probes.zoo build|dataset``: reproduce the models / write a split.

This package imports only numpy and PIL at import time (torch is imported by ``train``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from workers.probes.errors import ProbeInputError

if TYPE_CHECKING:
    from workers.probes.zoo.world import Scene

#: Where the committed checkpoints live (one folder per model).
CHECKPOINT_ROOT = Path(__file__).resolve().parent / "checkpoints"
#: Reference dual encoders shipped with the repository.
DUAL_ENCODERS: tuple[str, ...] = ("tiny-clip", "tiny-siglip")


@dataclass(frozen=True)
class Split:
    """A deterministic dataset split: scenes ``0 .. n_images-1`` of world stream ``seed``."""

    seed: int
    n_images: int
    watermark: str | None = None
    #: Scenes from ``world.crowded_scene_at`` (5-6 objects) instead of ``world.scene_at``.
    crowded: bool = False
    #: Unnamed grey shapes placed between the objects of each scene (``world.DECOY_SIDE``).
    decoys: int = 0

    def scenes(self) -> Iterator[Scene]:
        """The split's scenes, in order (a generator)."""
        from workers.probes.zoo import world

        draw = world.crowded_scene_at if self.crowded else world.scene_at
        return (draw(self.seed, i, watermark=self.watermark, decoys=self.decoys) for i in range(self.n_images))


#: Splits by name. Training draws from seeds < 1000 (see ``train.TRAIN_SEED``); evaluation
#: splits use other seeds, so no evaluation image was ever seen in training.
SPLITS: dict[str, Split] = {
    "heldout": Split(seed=1_000_003, n_images=320),
    "validation": Split(seed=1_000_033, n_images=128),
    # 5-6 objects per scene: where a map that only finds *some* object scores near chance, which
    # the randomisation sanity check needs (see ``world.CROWDED_SHAPES``).
    "crowded": Split(seed=1_000_037, n_images=320, crowded=True),
    # The held-out scenes (same seed: the same objects, boxes and prompts) with 8 unnamed grey decoys
    # each: where a map that only finds what stands out lands on a decoy, so the randomisation sanity
    # check can pass or fail on the objects the model was trained on (``world.DECOY_SIDE``).
    "heldout-decoys": Split(seed=1_000_003, n_images=320, decoys=8),
}


def cache_root() -> Path:
    """``$LOUPE_CACHE_DIR/zoo`` if set, else ``var/cache/zoo`` under the repository root."""
    env = os.environ.get("LOUPE_CACHE_DIR")
    if env:
        return Path(env) / "zoo"
    return Path(__file__).resolve().parents[3] / "var" / "cache" / "zoo"


def dataset_dir(split: str = "heldout", *, root: str | os.PathLike | None = None) -> Path:
    """Directory of the grounding dataset ``split`` (see ``SPLITS``), generated on first use.

    The split is written to a temporary sibling and renamed into place, so a crashed or
    concurrent generation never leaves a half-written dataset that later runs would trust.
    One prompt per image (``world.first_object_prompt``), boxes in pixels of the 224 px PNGs.
    """
    from workers.probes.zoo import group_split, world

    if split in group_split.GROUP_SPLITS:  # group-labelled splits have their own annotation format
        return group_split.group_dataset_dir(split, root=root)
    if split not in SPLITS:
        known = sorted([*SPLITS, *group_split.GROUP_SPLITS])
        raise ProbeInputError(f"unknown zoo split {split!r}; known: {', '.join(known)}")
    spec = SPLITS[split]
    base = Path(root) if root is not None else cache_root()
    target = base / f"{split}-v{world.WORLD_VERSION}"
    return materialise(target, lambda tmp: world.write_dataset(tmp, spec.scenes(),
                                                               info={"split": split, "seed": spec.seed}))


_handed_out: ContextVar[list[Path] | None] = ContextVar("zoo_data_handed_out", default=None)


@contextmanager
def recording_data() -> Iterator[list[Path]]:
    """Collect the generated data directories handed out while the block runs.

    A kind given no dataset measures the zoo's generated data; ``suite.run`` fingerprints what was
    handed out so that the evidence names that data like any other dataset."""
    handed: list[Path] = []
    token = _handed_out.set(handed)
    try:
        yield handed
    finally:
        _handed_out.reset(token)


def hand_out(path: Path) -> Path:
    """``path``, noted for :func:`recording_data` (every generated-data directory leaves through here)."""
    handed = _handed_out.get()
    if handed is not None and path not in handed:
        handed.append(path)
    return path


def materialise(target: Path, write: Callable[[Path], object]) -> Path:
    """``target`` (a dataset directory with ``dataset.json``), written by ``write(tmp)`` into a
    temporary sibling and renamed into place on first use, so a crashed or concurrent generation
    never leaves a half-written dataset that later runs would trust."""
    if (target / "dataset.json").is_file():
        return hand_out(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:
            # Another process won the race; its copy is identical (same seed).
            if not (target / "dataset.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return hand_out(target)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (so a large checkpoint is never held in memory at once)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checksums(directory: str | os.PathLike) -> Path:
    """Write ``SHA256SUMS`` (``sha256sum`` format) over every other file in ``directory``."""
    d = Path(directory)
    lines = [f"{file_sha256(p)}  {p.name}" for p in sorted(d.iterdir()) if p.is_file() and p.name != "SHA256SUMS"]
    (d / "SHA256SUMS").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d / "SHA256SUMS"


def verify_checksums(directory: str | os.PathLike) -> None:
    """Raise ``ProbeInputError`` unless every file listed in ``SHA256SUMS`` matches."""
    d = Path(directory)
    sums = d / "SHA256SUMS"
    if not sums.is_file():
        raise ProbeInputError(f"{d}: no SHA256SUMS file; cannot verify the checkpoint")
    listed = 0
    for line in sums.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        path = d / name
        if "/" in name or not path.is_file():
            raise ProbeInputError(f"{d}: {name!r} listed in SHA256SUMS is missing")
        if file_sha256(path) != digest:
            raise ProbeInputError(f"{d}: checksum mismatch for {name} (file changed or corrupt)")
        listed += 1
    if listed == 0:
        raise ProbeInputError(f"{d}: SHA256SUMS lists no files")


def checkpoint_path(name: str, *, verify: bool = True) -> Path:
    """Directory of the committed zoo checkpoint ``name`` (e.g. ``"tiny-clip"``).

    Verifies ``SHA256SUMS`` first (``verify=False`` skips it), so a probe never silently runs
    on a modified reference model. Load it with ``AutoModel.from_pretrained(path,
    use_safetensors=True)``, ``AutoTokenizer`` and ``AutoImageProcessor`` (offline).
    """
    path = CHECKPOINT_ROOT / name
    if not (path / "config.json").is_file():
        known = (sorted(p.name for p in CHECKPOINT_ROOT.iterdir() if (p / "config.json").is_file())
                 if CHECKPOINT_ROOT.is_dir() else [])
        raise ProbeInputError(
            f"no zoo checkpoint {name!r} in {CHECKPOINT_ROOT}; known: {', '.join(known) or 'none'} "
            "(rebuild with `python -m workers.probes.zoo build`)"
        )
    if verify:
        verify_checksums(path)
    return path
