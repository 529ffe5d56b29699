"""Upload validation: what a hostile or careless model provider can send, and what Loupe says back.

These tests call ``governance.uploads`` directly; the API-level refusals (status codes, no rows
left behind) are in ``test_api.py``.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from governance.uploads import UploadLimits, UploadRejected, extracted_model_archive, validate_image
from tests.model_archives import (
    model_members,
    targz_bytes,
    tiny_model_targz,
    tiny_model_zip,
    write_tiny_hf_model,
    zip_bytes,
)

LIMITS = UploadLimits(max_archive_bytes=5_000_000, max_unpacked_bytes=2_000_000, max_files=50,
                      max_image_pixels=1_000_000)


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"
    return settings.MEDIA_ROOT


def refusal(data: bytes, limits: UploadLimits = LIMITS) -> UploadRejected:
    with pytest.raises(UploadRejected) as caught, extracted_model_archive(io.BytesIO(data), limits=limits):
        pass
    return caught.value


def staged_leftovers(media_root: Path) -> list[Path]:
    return list((media_root / "tmp").glob("*")) if (media_root / "tmp").exists() else []


@pytest.mark.parametrize("builder", [tiny_model_zip, tiny_model_targz])
@pytest.mark.parametrize("prefix", ["", "tiny-clip/"])
def test_it_accepts_a_safetensors_model_directory(builder, prefix, tmp_path, media_root):
    with extracted_model_archive(io.BytesIO(builder(tmp_path, prefix=prefix)), limits=LIMITS) as model:
        assert model.files == ["README.md", "config.json", "model.safetensors"]
        assert model.config["model_type"] == "clip"
        assert (model.path / "model.safetensors").is_file()
    assert staged_leftovers(media_root) == []


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pkl", ".ckpt", ".pth"])
@pytest.mark.parametrize("pack", [zip_bytes, targz_bytes])
def test_it_refuses_pickled_weights_by_name(suffix, pack, tmp_path, media_root):
    """A model whose only weights are pickles (next to safetensors, they are skipped: see
    test_hardening_uploads)."""
    members = model_members(write_tiny_hf_model(tmp_path / "m"))
    del members["model.safetensors"]
    members[f"pytorch_model{suffix}"] = b"\x80\x04\x95 not really a pickle"
    error = refusal(pack(members))
    assert error.code == "pickled_weights"
    assert suffix in error.message and "safetensors" in error.message
    assert staged_leftovers(media_root) == []


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "/etc/cron.d/evil", "C:/evil", "..\\evil"])
@pytest.mark.parametrize("pack", [zip_bytes, targz_bytes])
def test_it_refuses_path_traversal(name, pack, tmp_path, media_root):
    members = model_members(write_tiny_hf_model(tmp_path / "m"))
    members[name] = b"owned"
    error = refusal(pack(members))
    assert error.code == "path_traversal", error.message
    assert not (tmp_path / "evil.txt").exists()
    assert staged_leftovers(media_root) == []


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_it_refuses_links_in_tar_archives(kind, tmp_path, media_root):
    members = model_members(write_tiny_hf_model(tmp_path / "m"))
    error = refusal(targz_bytes(members, links={"weights.safetensors": (kind, "/etc/passwd")}))
    assert error.code == "link_in_archive"
    assert "link" in error.message
    assert staged_leftovers(media_root) == []


def test_it_refuses_symlinks_in_zip_archives(tmp_path):
    members = model_members(write_tiny_hf_model(tmp_path / "m"))
    assert refusal(zip_bytes(members, symlinks={"leak": "/etc/passwd"})).code == "link_in_archive"


def test_it_refuses_too_many_files(tmp_path):
    members = model_members(write_tiny_hf_model(tmp_path / "m"))
    members.update({f"extra/{i}.txt": b"x" for i in range(60)})
    for pack in (zip_bytes, targz_bytes):
        error = refusal(pack(members))
        assert (error.code, error.status) == ("too_many_files", 413)


def test_it_refuses_an_archive_over_the_compressed_limit(tmp_path):
    data = tiny_model_zip(tmp_path)
    error = refusal(data, UploadLimits(len(data) - 1, 10**9, 100, 10**6))
    assert (error.code, error.status) == ("archive_too_large", 413)


@pytest.mark.parametrize("pack", [zip_bytes, targz_bytes])
def test_it_refuses_a_bomb_by_its_declared_size(pack, tmp_path, media_root):
    members = model_members(write_tiny_hf_model(tmp_path / "m"))
    members["padding.safetensors"] = bytes(20_000_000)  # 20 MB of zeros: ~20 KB compressed
    data = pack(members)
    assert len(data) < 100_000
    error = refusal(data)
    assert (error.code, error.status) == ("unpacked_too_large", 413)
    assert staged_leftovers(media_root) == []


def test_it_refuses_a_zip_that_lies_about_its_size(tmp_path, media_root):
    """A zip member that declares 10 bytes but inflates to 3 MB is caught while unpacking."""
    members = model_members(write_tiny_hf_model(tmp_path / "m"))
    members["liar.txt"] = bytes(3_000_000)
    data = bytearray(zip_bytes(members))
    name = b"liar.txt"
    # Patch the uncompressed size in the local header (offset 22) and central directory (offset 24).
    local = next(i for i in range(len(data))
                 if data.startswith(b"PK\x03\x04", i) and data[i + 30:i + 30 + len(name)] == name)
    struct.pack_into("<I", data, local + 22, 10)
    central = next(i for i in range(len(data))
                   if data.startswith(b"PK\x01\x02", i) and data[i + 46:i + 46 + len(name)] == name)
    struct.pack_into("<I", data, central + 24, 10)
    error = refusal(bytes(data))
    assert error.code == "corrupt_archive"
    assert staged_leftovers(media_root) == []


def test_it_requires_config_and_safetensors(tmp_path):
    members = model_members(write_tiny_hf_model(tmp_path / "m"))
    without_config = {k: v for k, v in members.items() if k != "config.json"}
    assert refusal(zip_bytes(without_config)).code == "missing_config"
    without_weights = {k: v for k, v in members.items() if not k.endswith(".safetensors")}
    assert refusal(zip_bytes(without_weights)).code == "missing_safetensors"
    bad_config = {**members, "config.json": b"{not json"}
    assert refusal(zip_bytes(bad_config)).code == "bad_config"
    bad_weights = {**members, "model.safetensors": b"\xff" * 64}
    error = refusal(zip_bytes(bad_weights))
    assert error.code == "bad_safetensors" and "model.safetensors" in error.message


def test_it_refuses_what_is_not_an_archive(tmp_path):
    assert refusal(b"just some text, not an archive").code == "unsupported_archive"
    complete = tiny_model_targz(tmp_path)
    for cut in (200, len(complete) // 2, len(complete) - 4):
        assert refusal(complete[:cut]).code == "corrupt_archive", cut
    assert refusal(tiny_model_zip(tmp_path)[:-30]).code == "corrupt_archive"


def test_it_refuses_duplicate_members(tmp_path):
    members = model_members(write_tiny_hf_model(tmp_path / "m"))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        with pytest.warns(UserWarning):
            archive.writestr("config.json", b'{"model_type": "evil"}')
    assert refusal(buffer.getvalue()).code == "duplicate_member"


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_it_accepts_a_normal_image():
    assert validate_image(io.BytesIO(png_bytes(32, 16)), max_pixels=1000) == ("PNG", (32, 16))


def test_it_refuses_a_decompression_bomb_image(settings):
    settings.LOUPE_MAX_IMAGE_PIXELS = 1_000_000
    bomb = png_bytes(4000, 4000)  # 16 Mpx of one-bit pixels: a few KB on the wire
    assert len(bomb) < 20_000
    with pytest.raises(UploadRejected) as caught:
        validate_image(io.BytesIO(bomb))
    assert (caught.value.code, caught.value.status) == ("image_too_large", 413)


def test_it_refuses_what_is_not_an_image():
    with pytest.raises(UploadRejected) as caught:
        validate_image(io.BytesIO(b"GIF89a but not really"), max_pixels=1000)
    assert caught.value.code in {"not_an_image", "corrupt_image"}


@pytest.mark.parametrize("image_format", ["PNG", "JPEG"])
def test_it_refuses_a_truncated_image_even_after_weasyprint_is_imported(image_format):
    import numpy as np

    import governance.reports.context  # noqa: F401 - imports WeasyPrint, which once made Pillow lenient

    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format=image_format)
    whole = buffer.getvalue()
    assert validate_image(io.BytesIO(whole), max_pixels=10_000) == (image_format, (64, 64))
    with pytest.raises(UploadRejected) as caught:
        validate_image(io.BytesIO(whole[:len(whole) // 2]), max_pixels=10_000)
    assert caught.value.code == "corrupt_image"
