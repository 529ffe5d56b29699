"""Builders for model directories and archives used by the upload tests (real files, tiny)."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def write_tiny_hf_model(directory: Path, *, model_type: str = "clip") -> Path:
    """A minimal Hugging Face-format directory: config.json + safetensors weights + a card."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": model_type, "hidden_size": 4}))
    save_file({"proj.weight": np.arange(8, dtype=np.float32).reshape(2, 4)}, str(directory / "model.safetensors"))
    (directory / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    return directory


def zip_bytes(members: dict[str, bytes], *, symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            archive.writestr(info, target)
    return buffer.getvalue()


def targz_bytes(members: dict[str, bytes], *, links: dict[str, tuple[bytes, str]] | None = None) -> bytes:
    """``links``: name -> (tarfile.SYMTYPE or LNKTYPE, target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            archive.addfile(info)
    return buffer.getvalue()


def model_members(directory: Path, prefix: str = "") -> dict[str, bytes]:
    return {prefix + p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def tiny_model_zip(tmp_path: Path, *, prefix: str = "", model_type: str = "clip") -> bytes:
    return zip_bytes(model_members(write_tiny_hf_model(tmp_path / "hf", model_type=model_type), prefix))


def tiny_model_targz(tmp_path: Path, *, prefix: str = "", model_type: str = "clip") -> bytes:
    return targz_bytes(model_members(write_tiny_hf_model(tmp_path / "hf", model_type=model_type), prefix))
