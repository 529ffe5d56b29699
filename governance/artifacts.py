"""Where a model version's files live, their SHA-256 manifest, and the architecture family.

- An uploaded archive is kept in ``ModelVersion.archive`` and unpacked (after validation,
  :mod:`governance.uploads`) next to it, into ``<storage root>/<archive name>.unpacked/``.
- A server-path version points at a directory below ``settings.LOUPE_MODEL_ROOTS``.
- A hub version has no local files until an operator mirrors it (Loupe never downloads weights).

The manifest maps each file's relative POSIX path to its SHA-256; ``ModelVersion.set_manifest``
fingerprints the whole directory from it. Evidence provenance, sign-offs and reports refer to that
fingerprint, so a swapped weight file is visible.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from django.conf import settings

# config.json ``model_type`` values, by family. Detection reads the config only: it never imports
# model code, so it is safe on untrusted uploads and cheap on the web process.
DUAL_ENCODER_TYPES = frozenset({
    "clip", "siglip", "siglip2", "align", "altclip", "chinese_clip", "owlvit", "owlv2", "x_clip", "clipseg",
    "flava", "metaclip_2", "blip", "loupe_dual_encoder",
})
GENERATIVE_TYPES = frozenset({
    "llava", "llava_next", "llava_onevision", "llava_next_video", "blip-2", "instructblip", "paligemma",
    "idefics", "idefics2", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl", "git", "kosmos-2", "fuyu",
    "mllama", "pix2struct", "vision-encoder-decoder", "gemma3", "aya_vision", "internvl", "loupe_captioner",
})
# Architectures (config "architectures") whose heads generate text, even when model_type is shared
# with a contrastive variant (BLIP has both BlipModel and BlipForConditionalGeneration).
GENERATIVE_HEAD_SUFFIXES = ("ForConditionalGeneration", "ForCausalLM", "ForVision2Seq", "ForImageTextToText")


class ArtifactUnavailable(Exception):
    """The version's files are not on this server (e.g. a hub version that was never mirrored)."""


def uploaded_model_directory(version) -> Path:
    """Where an uploaded version's archive is unpacked: next to the stored archive, whose name the
    storage made unique (so a reused primary key can never meet an old directory). Model
    directories must be on a filesystem the workers share: transformers loads from local paths."""
    if not version.archive:
        raise ArtifactUnavailable(f"{version} has no uploaded archive")
    return Path(settings.MEDIA_ROOT) / f"{version.archive.name}.unpacked"


def model_directory(version) -> Path:
    """The local Hugging Face-format directory of a :class:`~governance.models.ModelVersion`."""
    from governance.models import ModelVersion, validate_server_path

    if version.source == ModelVersion.Source.ARCHIVE:
        path = uploaded_model_directory(version)
    elif version.source == ModelVersion.Source.PATH:
        validate_server_path(version.server_path)  # the roots may have changed since registration
        path = Path(version.server_path)
    else:
        raise ArtifactUnavailable(
            f"{version} is a hub reference ({version.hub_id}@{version.hub_revision}); Loupe never downloads "
            "weights: mirror it below LOUPE_MODEL_ROOTS and register the directory as a server path")
    if not (path / "config.json").is_file():
        raise ArtifactUnavailable(f"{version}: no model directory with config.json at {path}")
    return path


def directory_manifest(directory: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every regular file below ``directory``, sorted by path.

    Symbolic links are followed only when they stay inside the directory (Hugging Face cache
    snapshots link to blobs two levels up, so a snapshot should be registered at its repo root)."""
    root = directory.resolve()
    manifest: dict[str, str] = {}
    for path in sorted(directory.rglob("*")):
        if path.is_dir():
            continue
        resolved = path.resolve()
        if not resolved.is_relative_to(root):
            raise ArtifactUnavailable(f"{path} links outside the model directory; refusing to hash it")
        if not resolved.is_file():
            continue
        with open(resolved, "rb") as handle:
            manifest[path.relative_to(directory).as_posix()] = hashlib.file_digest(handle, "sha256").hexdigest()
    return manifest


def detect_architecture(config: dict) -> tuple[str, str]:
    """(family, what was seen) from a config.json: ``dual_encoder``, ``generative_fusion`` or ``unknown``."""
    model_type = str(config.get("model_type", ""))
    architectures = [str(a) for a in config.get("architectures") or [] if isinstance(a, str)]
    detail = f"model_type={model_type or '?'}" + (f"; architectures={','.join(architectures)}" if architectures else "")
    if model_type in GENERATIVE_TYPES or any(a.endswith(GENERATIVE_HEAD_SUFFIXES) for a in architectures):
        return "generative_fusion", detail[:200]
    if model_type in DUAL_ENCODER_TYPES:
        return "dual_encoder", detail[:200]
    return "unknown", detail[:200]


def read_config(directory: Path) -> dict:
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ArtifactUnavailable(f"{directory}/config.json does not hold a JSON object")
    return config


# --------------------------------------------------------------------------------------------------
# Evidence files: content-addressed
# --------------------------------------------------------------------------------------------------

# Evidence files are content-addressed (governance/blobs.py); these two look at what is stored.


def discard_unrecorded_files(case_id: int, run_id: int) -> list[str]:
    """Remove the files of a run that has no evidence (call with its lease held, before it runs
    again): they were written by an attempt whose transaction rolled back. Returns their names."""
    from django.core.files.storage import default_storage

    from governance.blobs import run_directory
    from governance.models import EvidenceArtifact

    directory = run_directory(case_id, run_id)
    try:
        _, files = default_storage.listdir(directory)
    except FileNotFoundError:
        return []
    names = [f"{directory}/{name}" for name in files]
    recorded = set(EvidenceArtifact.objects.filter(file__in=names).values_list("file", flat=True))
    removed = [name for name in names if name not in recorded]
    for name in removed:
        default_storage.delete(name)
    return removed


def stored_names(prefixes: tuple[str, ...] = ("evidence", "reports")) -> set[str]:
    """Every file name below ``prefixes`` in the default storage (walked through the storage API)."""
    from django.core.files.storage import default_storage

    found: set[str] = set()

    def walk(directory: str) -> None:
        try:
            directories, files = default_storage.listdir(directory)
        except FileNotFoundError:
            return
        for name in files:
            found.add(f"{directory}/{name}")
        for sub in directories:
            walk(f"{directory}/{sub}")

    for prefix in prefixes:
        walk(prefix)
    return found
