"""Validation of uploaded model archives and images.

Everything a user uploads is hostile until proven otherwise. A model archive (``.zip`` or
``.tar.gz``) is accepted only if it is a Hugging Face-format directory with ``config.json`` and
safetensors weights, and refused with an explicit reason when it

- contains pickled weights (``.bin``, ``.pt``, ``.pth``, ``.pkl``, ``.pickle``, ``.ckpt``, ``.joblib``):
  unpickling executes code, and Loupe never calls ``torch.load`` on user files;
- escapes the target directory (``../``, absolute paths, drive letters, backslashes) or contains
  links, devices or FIFOs (tar symlinks and hardlinks can point anywhere on the server);
- is too large compressed, declares or actually unpacks to too many bytes (zip bombs lie in
  their headers, so the bytes written are counted too), or has too many members.

Archives are unpacked into a private temporary directory on the storage volume; the caller moves
the directory into place only after validation and inside the database transaction that records
it (see :func:`install_model_directory`), so a refusal leaves neither rows nor files behind.

Why hand-written instead of ``shutil.unpack_archive``/``tarfile`` filters: we need byte-exact
limits on *actual* output, the same policy for zip and tar, and a refusal reason a user can act on.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO

from django.conf import settings

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"})
CONFIG_MAX_BYTES = 1024 * 1024
_CHUNK = 1024 * 1024


class UploadRejected(Exception):
    """An upload that Loupe refuses. ``code`` is stable (for clients), ``message`` is for people."""

    def __init__(self, code: str, message: str, *, status: int = 400, detail: dict | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.detail = detail or {}

    def as_dict(self) -> dict:
        return {"error": self.code, "detail": self.message, **self.detail}


@dataclass(frozen=True)
class UploadLimits:
    max_archive_bytes: int
    max_unpacked_bytes: int
    max_files: int
    max_image_pixels: int

    @classmethod
    def from_settings(cls) -> UploadLimits:
        return cls(
            max_archive_bytes=settings.LOUPE_MAX_ARCHIVE_BYTES,
            max_unpacked_bytes=settings.LOUPE_MAX_UNPACKED_BYTES,
            max_files=settings.LOUPE_MAX_ARCHIVE_FILES,
            max_image_pixels=settings.LOUPE_MAX_IMAGE_PIXELS,
        )


@dataclass
class ExtractedModel:
    """A validated model directory in a temporary location, not yet moved into storage."""

    path: Path
    files: list[str] = field(default_factory=list)  # relative POSIX paths, sorted
    unpacked_bytes: int = 0
    config: dict = field(default_factory=dict)


# --- member checks ----------------------------------------------------------------------------

def safe_member_path(name: str) -> PurePosixPath:
    """Return the member's relative path, or refuse names that could escape the target directory."""
    if "\x00" in name or "\\" in name:
        raise UploadRejected("path_traversal", f"archive member {name!r} has a backslash or NUL in its name; refused")
    path = PurePosixPath(name)
    if path.is_absolute() or (path.parts and ":" in path.parts[0]):
        raise UploadRejected("path_traversal", f"archive member {name!r} is an absolute path; refused")
    if any(part == ".." for part in path.parts):
        raise UploadRejected("path_traversal", f"archive member {name!r} points outside the archive (..); refused")
    parts = [p for p in path.parts if p not in ("", ".")]
    if not parts:
        raise UploadRejected("path_traversal", f"archive member {name!r} has an empty name; refused")
    if any(len(p.encode()) > 255 for p in parts):
        raise UploadRejected("bad_member_name", f"archive member {name[:80]!r}... has a path component over 255 bytes")
    return PurePosixPath(*parts)


def refuse_pickles(path: PurePosixPath) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UploadRejected(
            "pickled_weights",
            f"archive member {str(path)!r} is a pickle-based file ({path.suffix}); loading pickles executes "
            "arbitrary code, so Loupe only accepts safetensors weights. Convert the weights with "
            "`safetensors` (model.save_pretrained(..., safe_serialization=True)) and remove the pickle files.",
        )


class _Budget:
    """Counts members and unpacked bytes against the limits as the archive is read."""

    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self.files = 0
        self.bytes = 0

    def add_member(self, name: str, declared_size: int) -> None:
        self.files += 1
        if self.files > self.limits.max_files:
            raise UploadRejected(
                "too_many_files", f"the archive has more than {self.limits.max_files} files; refused", status=413
            )
        if declared_size < 0 or self.bytes + declared_size > self.limits.max_unpacked_bytes:
            raise UploadRejected(
                "unpacked_too_large",
                f"the archive unpacks to more than {self.limits.max_unpacked_bytes} bytes (at {name!r}); refused",
                status=413,
            )

    def copy(self, name: str, src: IO[bytes], dst: BinaryIO, declared_size: int) -> int:
        """Copy member data, refusing as soon as it writes more than it declared or than the limit."""
        written = 0
        while True:
            chunk = src.read(_CHUNK)
            if not chunk:
                break
            written += len(chunk)
            self.bytes += len(chunk)
            if written > declared_size:
                raise UploadRejected(
                    "corrupt_archive",
                    f"archive member {name!r} unpacks to more bytes than its header declares; refused",
                )
            if self.bytes > self.limits.max_unpacked_bytes:
                raise UploadRejected(
                    "unpacked_too_large",
                    f"the archive unpacks to more than {self.limits.max_unpacked_bytes} bytes; refused",
                    status=413,
                )
            dst.write(chunk)
        return written


def _open_target(root: Path, rel: PurePosixPath, seen: set[str]) -> BinaryIO:
    key = str(rel)
    if key in seen:
        raise UploadRejected("duplicate_member", f"archive member {key!r} appears twice; refused")
    seen.add(key)
    target = root.joinpath(*rel.parts)
    # Belt and braces: the name checks above already exclude escapes.
    if not target.resolve().is_relative_to(root.resolve()):
        raise UploadRejected("path_traversal", f"archive member {key!r} points outside the archive; refused")
    target.parent.mkdir(parents=True, exist_ok=True)
    return open(target, "xb")  # noqa: SIM115 - closed by the caller


def _extract_zip(fileobj: BinaryIO, root: Path, limits: UploadLimits) -> list[str]:
    budget, seen, files = _Budget(limits), set(), []
    with zipfile.ZipFile(fileobj) as archive:
        infos = archive.infolist()
        if len(infos) > limits.max_files:
            raise UploadRejected("too_many_files", f"the archive has more than {limits.max_files} files; refused", status=413)
        # Check every header first, so a refusal costs no decompression at all.
        checked = []
        for info in infos:
            rel = safe_member_path(info.filename)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise UploadRejected("link_in_archive", f"archive member {info.filename!r} is a symbolic link; refused")
            if info.is_dir():
                continue
            # Zip writers often store permission bits without a file type; only a stated
            # non-regular type is refused.
            if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
                raise UploadRejected("special_file", f"archive member {info.filename!r} is not a regular file; refused")
            if info.flag_bits & 0x1:
                raise UploadRejected("encrypted_archive", f"archive member {info.filename!r} is encrypted; refused")
            refuse_pickles(rel)
            budget.add_member(info.filename, info.file_size)
            checked.append((info, rel))
        budget.files = 0
        budget.bytes = 0
        for info, rel in checked:
            with archive.open(info) as src, _open_target(root, rel, seen) as dst:
                budget.copy(info.filename, src, dst, info.file_size)
            files.append(str(rel))
    return files


def _extract_tar(fileobj: BinaryIO, root: Path, limits: UploadLimits) -> list[str]:
    budget, seen, files, members = _Budget(limits), set(), [], 0
    # Stream mode ("r|") reads each header once, in order, and never seeks: the whole archive
    # is never decompressed just to list it. Decompressing with GzipFile ourselves (not "r|gz")
    # checks the gzip CRC and length at the end, so a truncated upload is refused instead of
    # being read as a shorter, valid-looking archive.
    gz = gzip.GzipFile(fileobj=fileobj, mode="rb")
    with tarfile.open(fileobj=gz, mode="r|") as archive:
        for member in archive:
            members += 1
            if members > limits.max_files:
                raise UploadRejected("too_many_files", f"the archive has more than {limits.max_files} files; refused", status=413)
            rel = safe_member_path(member.name)
            if member.issym() or member.islnk():
                raise UploadRejected(
                    "link_in_archive",
                    f"archive member {member.name!r} is a {'symbolic' if member.issym() else 'hard'} link; refused",
                )
            if member.isdir():
                continue
            if not member.isreg():
                raise UploadRejected("special_file", f"archive member {member.name!r} is not a regular file; refused")
            refuse_pickles(rel)
            budget.add_member(member.name, member.size)
            src = archive.extractfile(member)
            assert src is not None  # regular files always have data
            with src, _open_target(root, rel, seen) as dst:
                budget.copy(member.name, src, dst, member.size)
            files.append(str(rel))
    # Read to the end of the gzip stream (trailing padding counts against the budget) so that
    # GzipFile verifies the CRC and raises EOFError on truncation.
    while chunk := gz.read(_CHUNK):
        budget.bytes += len(chunk)
        if budget.bytes > limits.max_unpacked_bytes:
            raise UploadRejected(
                "unpacked_too_large", f"the archive unpacks to more than {limits.max_unpacked_bytes} bytes; refused", status=413
            )
    return files


def _strip_single_top_directory(root: Path, files: list[str]) -> tuple[Path, list[str]]:
    """Archives made with ``zip -r model.zip model/`` have one top directory; look inside it."""
    if "config.json" in files:
        return root, files
    tops = {f.split("/", 1)[0] for f in files}
    if len(tops) == 1 and all("/" in f for f in files):
        top = tops.pop()
        return root / top, [f.split("/", 1)[1] for f in files]
    return root, files


def _check_model_directory(root: Path, files: list[str]) -> dict:
    if "config.json" not in files:
        raise UploadRejected(
            "missing_config", "the archive has no config.json at its top level; upload a Hugging Face-format model directory"
        )
    config_path = root / "config.json"
    if config_path.stat().st_size > CONFIG_MAX_BYTES:
        raise UploadRejected("bad_config", "config.json is larger than 1 MiB; refused")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UploadRejected("bad_config", f"config.json is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise UploadRejected("bad_config", "config.json must hold a JSON object")
    weights = [f for f in files if f.endswith(".safetensors")]
    if not weights:
        raise UploadRejected(
            "missing_safetensors", "the archive has no .safetensors weights; Loupe only accepts safetensors checkpoints"
        )
    for name in weights:
        check_safetensors(root / name, name)
    return config


def check_safetensors(path: Path, name: str) -> None:
    """Refuse a ``.safetensors`` file whose header the safetensors library cannot read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            list(handle.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise UploadRejected("bad_safetensors", f"{name!r} is not a valid safetensors file: {exc}") from None


def sniff_archive(fileobj: BinaryIO) -> str:
    head = fileobj.read(4)
    fileobj.seek(0)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    raise UploadRejected(
        "unsupported_archive", "the upload is neither a .zip nor a .tar.gz archive; pack the model directory as one"
    )


def staging_root() -> Path:
    """Temporary directories live on the storage volume, so moving them into place is a rename."""
    path = Path(settings.MEDIA_ROOT) / "tmp"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def extracted_model_archive(fileobj: BinaryIO, *, size: int | None = None,
                            limits: UploadLimits | None = None) -> Iterator[ExtractedModel]:
    """Validate and unpack a model archive into a temporary directory, removed on exit.

    Raises :class:`UploadRejected` with a reason for every refusal; nothing is left on disk then.
    Move ``result.path`` elsewhere inside the block to keep it (see :func:`install_model_directory`).
    """
    limits = limits or UploadLimits.from_settings()
    if size is None:
        fileobj.seek(0, os.SEEK_END)
        size = fileobj.tell()
        fileobj.seek(0)
    if size > limits.max_archive_bytes:
        raise UploadRejected(
            "archive_too_large", f"the archive is {size} bytes; the limit is {limits.max_archive_bytes}", status=413
        )
    kind = sniff_archive(fileobj)
    workdir = Path(tempfile.mkdtemp(prefix="upload-", dir=staging_root()))
    try:
        unpacked = workdir / "model"
        unpacked.mkdir()
        try:
            files = _extract_zip(fileobj, unpacked, limits) if kind == "zip" else _extract_tar(fileobj, unpacked, limits)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, OSError, NotImplementedError) as exc:
            if isinstance(exc, FileExistsError):
                raise UploadRejected("duplicate_member", f"the archive has two members with the same path: {exc.filename}") from None
            raise UploadRejected("corrupt_archive", f"the {kind} archive is corrupt or truncated: {exc}") from None
        root, files = _strip_single_top_directory(unpacked, files)
        config = _check_model_directory(root, files)
        yield ExtractedModel(path=root, files=sorted(files), unpacked_bytes=sum((root / f).stat().st_size for f in files),
                             config=config)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def install_model_directory(extracted: ExtractedModel, destination: Path) -> None:
    """Move a validated directory to its final place. Call inside ``transaction.atomic()`` and
    remove ``destination`` if the transaction fails (see :func:`remove_tree`)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists():
        raise UploadRejected("already_uploaded", f"{destination.name} already has an artifact", status=409)
    os.replace(extracted.path, destination)


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# --- images -----------------------------------------------------------------------------------

def validate_image(fileobj: BinaryIO, *, max_pixels: int | None = None) -> tuple[str, tuple[int, int]]:
    """Check an uploaded image; return (format, size).

    Pillow refuses images over ``Image.MAX_IMAGE_PIXELS * 2`` and only *warns* between 1x and 2x;
    we turn the warning into an error and also check the declared size explicitly against our own
    limit, because a PNG that declares 100k x 100k pixels is a few hundred bytes on the wire. Only
    then are the pixels decoded: ``verify()`` checks PNG checksums but reads nothing of a JPEG, so a
    truncated JPEG would pass it.
    """
    import warnings

    from PIL import Image, UnidentifiedImageError

    max_pixels = max_pixels or settings.LOUPE_MAX_IMAGE_PIXELS
    # Pillow's own guard is process-wide; set it once to our limit (see configure_pillow) rather
    # than swapping it per call, which would race between threads.
    configure_pillow()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                with Image.open(fileobj) as image:
                    width, height = image.size
                    if width * height > max_pixels:
                        raise UploadRejected(
                            "image_too_large",
                            f"the image declares {width}x{height} pixels; the limit is {max_pixels} pixels",
                            status=413,
                        )
                    if image.format not in IMAGE_FORMATS:
                        raise UploadRejected("unsupported_image", f"image format {image.format} is not accepted")
                    image.verify()
                    image_format = image.format
                fileobj.seek(0)
                with Image.open(fileobj) as image:  # verify() leaves the image unusable: open it again
                    image.load()
                return image_format, (width, height)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise UploadRejected("image_too_large", f"the image is a decompression bomb: {exc}", status=413) from None
            except UnidentifiedImageError:
                raise UploadRejected("not_an_image", "the upload is not an image Loupe can read") from None
            except (OSError, SyntaxError, ValueError) as exc:
                raise UploadRejected("corrupt_image", f"the image is corrupt or truncated: {exc}") from None
    finally:
        fileobj.seek(0)


def configure_pillow() -> None:
    """Make Pillow's decompression-bomb guard use Loupe's limit (idempotent)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = settings.LOUPE_MAX_IMAGE_PIXELS
