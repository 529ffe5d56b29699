"""Attack 1 (issue #20): decompression bombs must be refused before they reach the disk.

Each bomb goes through the real upload endpoint while a sampler thread measures the bytes on disk
below the storage root (staging directory included) every few milliseconds; the peak must stay far
below what the bomb declares. Also: archives made with ``tar -C dir .`` and Hugging Face snapshots
that carry a pickle next to the safetensors weights.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
from rest_framework.test import APIClient

from governance.models import AuditEvent, ModelVersion
from tests.model_archives import model_members, targz_bytes, write_tiny_hf_model, zip_bytes

pytestmark = pytest.mark.django_db

MiB = 1024 * 1024
BOMB = 256 * MiB  # what each bomb unpacks to: far above the 64 MiB the test allows on disk
DISK_BOUND = 64 * MiB


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    return settings.MEDIA_ROOT


class PeakDisk:
    """Samples the allocated bytes below ``root`` in a thread; ``peak`` is the largest sample."""

    def __init__(self, root: Path) -> None:
        self.root, self.peak, self._stop = root, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _size(self) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                try:
                    st = os.lstat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue
                total += max(st.st_size, st.st_blocks * 512)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._size())
            time.sleep(0.002)

    def __enter__(self) -> PeakDisk:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._size())


def upload(user, ai_model, version: str, data: bytes, name: str = "model.zip"):
    client = APIClient()
    client.force_authenticate(user)
    archive = io.BytesIO(data)
    archive.name = name
    return client.post("/api/versions/upload/", {"ai_model": ai_model.pk, "version": version, "archive": archive},
                       format="multipart")


def safetensors_bytes(n_bytes: int, *, padding: int = 0) -> bytes:
    """One U8 tensor of ``n_bytes`` zeros (a valid file), plus ``padding`` zero bytes past its end."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [n_bytes], "data_offsets": [0, n_bytes]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + bytes(n_bytes + padding)


def zip_with_stored_sizes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def config_members(tmp_path: Path) -> dict[str, bytes]:
    members = model_members(write_tiny_hf_model(tmp_path / "m"))
    return {"config.json": members["config.json"]}


def assert_refused_without_trace(response, media_root: Path, peak: int, code: str) -> None:
    assert response.status_code in (400, 413), response.content
    assert response.json()["error"] == code, response.json()
    assert not ModelVersion.objects.filter(version="bomb").exists()
    assert not AuditEvent.objects.filter(action="model_version.uploaded").exists()
    left = [p for p in Path(media_root).rglob("*") if p.is_file()]
    assert left == [], left
    assert peak < DISK_BOUND, f"peak disk use {peak / MiB:.1f} MiB"


@pytest.mark.slow
def test_a_zip_declaring_far_more_than_it_weighs_is_refused_before_unpacking(alice, acme_model, tmp_path, media_root):
    members = {**config_members(tmp_path), "model.safetensors": safetensors_bytes(BOMB)}
    data = zip_with_stored_sizes(members)
    assert len(data) < 2 * MiB
    with PeakDisk(media_root) as disk:
        response = upload(alice, acme_model, "bomb", data)
    assert_refused_without_trace(response, media_root, disk.peak, "compression_ratio")
    print(f"zip bomb ({len(data)} B -> {BOMB} B): peak disk {disk.peak} B")


@pytest.mark.slow
def test_a_targz_with_a_huge_member_is_refused_before_unpacking(alice, acme_model, tmp_path, media_root):
    members = {**config_members(tmp_path), "model.safetensors": safetensors_bytes(BOMB)}
    data = targz_bytes(members)
    assert len(data) < 2 * MiB
    with PeakDisk(media_root) as disk:
        response = upload(alice, acme_model, "bomb", data, name="model.tar.gz")
    assert_refused_without_trace(response, media_root, disk.peak, "compression_ratio")
    print(f"tar.gz bomb ({len(data)} B -> {BOMB} B): peak disk {disk.peak} B")


@pytest.mark.parametrize("pack", [zip_with_stored_sizes, targz_bytes])
@pytest.mark.slow
def test_a_safetensors_file_longer_than_its_header_says_is_refused_before_writing(
        pack, alice, acme_model, tmp_path, media_root, settings):
    """With the ratio check switched off, the safetensors header alone stops a padded file."""
    settings.LOUPE_MAX_COMPRESSION_RATIO = 0
    members = {**config_members(tmp_path), "model.safetensors": safetensors_bytes(16, padding=BOMB)}
    with PeakDisk(media_root) as disk:
        response = upload(alice, acme_model, "bomb", pack(members),
                          name="m.zip" if pack is not targz_bytes else "m.tgz")
    assert_refused_without_trace(response, media_root, disk.peak, "bad_safetensors")


def test_the_compression_ratio_limit_is_configurable(tmp_path, settings):
    from governance.uploads import UploadLimits, UploadRejected, extracted_model_archive

    members = {**config_members(tmp_path), "model.safetensors": safetensors_bytes(4 * MiB)}
    data = zip_with_stored_sizes(members)
    settings.LOUPE_MAX_COMPRESSION_RATIO = 0  # 0: no ratio limit
    with extracted_model_archive(io.BytesIO(data), limits=UploadLimits.from_settings()) as model:
        assert "model.safetensors" in model.files
    settings.LOUPE_MAX_COMPRESSION_RATIO = 50
    with pytest.raises(UploadRejected) as caught, \
            extracted_model_archive(io.BytesIO(data), limits=UploadLimits.from_settings()):
        pass
    assert caught.value.code == "compression_ratio" and "50" in caught.value.message


def test_an_organisation_over_its_storage_quota_is_refused(alice, acme_model, tmp_path, media_root, settings):
    data = zip_bytes(model_members(write_tiny_hf_model(tmp_path / "m")))
    first = upload(alice, acme_model, "1", data)
    assert first.status_code == 201, first.json()
    used = sum(p.stat().st_size for p in Path(media_root).rglob("*") if p.is_file() and "tmp" not in p.parts)
    settings.LOUPE_ORGANISATION_QUOTA_BYTES = used + 100  # the next upload does not fit
    files_before = sorted(p for p in Path(media_root).rglob("*") if p.is_file())
    second = upload(alice, acme_model, "2", data)
    assert second.status_code == 413, second.json()
    assert second.json()["error"] == "quota_exceeded"
    assert not ModelVersion.objects.filter(version="2").exists()
    assert sorted(p for p in Path(media_root).rglob("*") if p.is_file()) == files_before


# --- archives real tools make (issues #23/#25) ---------------------------------------------------


def test_an_archive_rooted_at_dot_is_accepted(alice, acme_model, tmp_path):
    """``tar czf m.tar.gz -C dir .`` writes members ``./``, ``./config.json``, ..."""
    directory = write_tiny_hf_model(tmp_path / "m")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(directory, arcname=".")
    with tarfile.open(fileobj=io.BytesIO(buffer.getvalue())) as written:
        assert written.getnames()[0] == "."
    response = upload(alice, acme_model, "dot", buffer.getvalue(), name="m.tar.gz")
    assert response.status_code == 201, response.json()


@pytest.mark.parametrize("pack", [zip_bytes, targz_bytes])
def test_a_snapshot_with_a_pickle_next_to_safetensors_is_accepted_without_the_pickle(
        pack, alice, acme_model, tmp_path, media_root):
    members = model_members(write_tiny_hf_model(tmp_path / "m"))
    members["pytorch_model.bin"] = b"\x80\x04\x95 a pickle that must never be stored"
    response = upload(alice, acme_model, "snap", pack(members))
    assert response.status_code == 201, response.json()
    assert response.json()["ignored_files"] == ["pytorch_model.bin"]
    event = AuditEvent.objects.get(action="model_version.uploaded")
    assert event.data["ignored_files"] == ["pytorch_model.bin"]
    assert "pytorch_model.bin" not in event.data["files"]
    stored = [p.name for p in Path(media_root).rglob("*") if p.is_file()]
    assert "pytorch_model.bin" not in stored and "model.safetensors" in stored
    version = ModelVersion.objects.get(version="snap")
    assert "pytorch_model.bin" not in json.dumps(version.manifest or {})


@pytest.mark.parametrize("pack", [zip_bytes, targz_bytes])
def test_a_pickle_only_model_is_still_refused(pack, alice, acme_model, tmp_path, media_root):
    members = model_members(write_tiny_hf_model(tmp_path / "m"))
    del members["model.safetensors"]
    members["pytorch_model.bin"] = b"\x80\x04\x95 pickle"
    response = upload(alice, acme_model, "pkl", pack(members))
    assert response.status_code == 400
    assert response.json()["error"] == "pickled_weights"
    assert [p for p in Path(media_root).rglob("*") if p.is_file()] == []
