"""Validation of uploaded model archives and images.

Everything a user uploads is hostile until proven otherwise. A model archive (``.zip`` or
``.tar.gz``) is accepted only if it is a Hugging Face-format directory with ``config.json`` and
safetensors weights, and refused with an explicit reason when it

- contains pickled weights (``.bin``, ``.pt``, ``.pth``, ``.pkl``, ``.pickle``, ``.ckpt``, ``.joblib``):
  unpickling executes code, and Loupe never calls ``torch.load`` on user files;
- escapes the target directory (``../``, absolute paths, drive letters, backslashes) or contains
  links, devices or FIFOs (tar symlinks and hardlinks can point anywhere on the server);
- is too large compressed, declares or actually unpacks to too many bytes (zip bombs lie in
  their headers, so the bytes written are counted too), or has too many members;
- declares more than ``LOUPE_MAX_COMPRESSION_RATIO`` times its compressed size, per member (zip
  headers state both sizes) and overall (tar headers only state the unpacked size): real weights
  barely compress, a bomb compresses a thousandfold. This is checked on the *declared* sizes before a
  byte is written, so a bomb never reaches the disk;
- has a ``.safetensors`` member whose header does not describe exactly the member's bytes (checked
  on the header, read first, before the tensor data is written);
- would take its organisation over ``LOUPE_ORGANISATION_QUOTA_BYTES`` of stored models.

Pickled weights next to safetensors weights (a Hugging Face snapshot often has both
``pytorch_model.bin`` and ``model.safetensors``) are skipped, never written, and reported in
:attr:`ExtractedModel.ignored`; a model whose only weights are pickles is refused.

Archives are unpacked into a private temporary directory on the storage volume; the caller moves
the directory into place only after validation and inside the database transaction that records
it (see :func:`install_model_directory`), so a refusal leaves neither rows nor files behind.

Why hand-written instead of ``shutil.unpack_archive``/``tarfile`` filters: we need byte-exact
limits on *actual* output, the same policy for zip and tar, and a refusal reason a user can act on.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import stat
import struct
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
#: Below this many unpacked bytes the compression ratio is not checked: small text files (configs,
#: tokenizers) compress well and cannot hurt.
RATIO_FLOOR_BYTES = 1024 * 1024
#: The safetensors library refuses headers above 100 MB; so do we, before reading more.
SAFETENSORS_HEADER_MAX = 100 * 1000 * 1000
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}


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
    #: Unpacked bytes per compressed byte, per member and overall; 0 switches the check off.
    max_compression_ratio: float = 100.0
    #: Bytes the uploading organisation may still store (archive plus unpacked files); None: no quota.
    quota_remaining: int | None = None

    @classmethod
    def from_settings(cls, *, quota_remaining: int | None = None) -> UploadLimits:
        return cls(
            max_archive_bytes=settings.LOUPE_MAX_ARCHIVE_BYTES,
            max_unpacked_bytes=settings.LOUPE_MAX_UNPACKED_BYTES,
            max_files=settings.LOUPE_MAX_ARCHIVE_FILES,
            max_image_pixels=settings.LOUPE_MAX_IMAGE_PIXELS,
            max_compression_ratio=float(settings.LOUPE_MAX_COMPRESSION_RATIO),
            quota_remaining=quota_remaining,
        )

    def allowed_expansion(self, compressed_bytes: int) -> int | None:
        """The most unpacked bytes ``compressed_bytes`` may legitimately turn into (None: no limit)."""
        if self.max_compression_ratio <= 0:
            return None
        return max(int(self.max_compression_ratio * compressed_bytes), RATIO_FLOOR_BYTES)


@dataclass
class ExtractedModel:
    """A validated model directory in a temporary location, not yet moved into storage."""

    path: Path
    files: list[str] = field(default_factory=list)  # relative POSIX paths, sorted
    unpacked_bytes: int = 0
    config: dict = field(default_factory=dict)
    #: Pickled weights found next to safetensors weights: skipped, never written (relative paths, sorted).
    ignored: list[str] = field(default_factory=list)


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

    def __init__(self, limits: UploadLimits, archive_bytes: int) -> None:
        self.limits = limits
        self.archive_bytes = archive_bytes
        self.files = 0
        self.bytes = 0
        self.declared = 0

    def _refuse_over(self, total: int, name: str | None) -> None:
        at = f" (at {name!r})" if name else ""
        if total > self.limits.max_unpacked_bytes:
            raise UploadRejected(
                "unpacked_too_large",
                f"the archive unpacks to more than {self.limits.max_unpacked_bytes} bytes{at}; refused",
                status=413,
            )
        # The stored archive counts against the quota as well as what it unpacks to.
        quota = None if self.limits.quota_remaining is None else self.limits.quota_remaining - self.archive_bytes
        if quota is not None and total > quota:
            raise UploadRejected(
                "quota_exceeded",
                f"the archive unpacks to more than the {max(quota, 0)} bytes your organisation's storage quota "
                f"has left{at}; refused. Ask an operator to raise LOUPE_ORGANISATION_QUOTA_BYTES or remove "
                "unused versions.", status=413,
            )

    def add_member(self, name: str, declared_size: int, compressed_size: int | None = None) -> None:
        """Check a member's header before any of its bytes are read: count, declared size, and the
        compression ratio of the member (where the format states it) and of the archive so far."""
        self.files += 1
        if self.files > self.limits.max_files:
            raise UploadRejected(
                "too_many_files", f"the archive has more than {self.limits.max_files} files; refused", status=413
            )
        if declared_size < 0:
            raise UploadRejected("corrupt_archive", f"archive member {name!r} declares a negative size; refused")
        self.declared += declared_size
        self._refuse_over(self.declared, name)
        ratio = self.limits.max_compression_ratio
        if compressed_size is not None:
            allowed = self.limits.allowed_expansion(compressed_size)
            if allowed is not None and declared_size > allowed:
                raise UploadRejected(
                    "compression_ratio",
                    f"archive member {name!r} declares {declared_size} bytes from {compressed_size} compressed "
                    f"bytes, more than the allowed compression ratio of {ratio:g}; refused as a decompression bomb",
                    status=413,
                )
        allowed = self.limits.allowed_expansion(self.archive_bytes)
        if allowed is not None and self.declared > allowed:
            raise UploadRejected(
                "compression_ratio",
                f"the archive declares more than {self.declared} unpacked bytes (at {name!r}) from "
                f"{self.archive_bytes} bytes, more than the allowed compression ratio of {ratio:g}; refused as "
                "a decompression bomb",
                status=413,
            )

    def copy(self, name: str, src: IO[bytes], dst: BinaryIO, declared_size: int) -> int:
        """Copy member data, refusing as soon as it writes more than it declared or than the limit.
        A ``.safetensors`` member's header is read and checked against the declared size first."""
        written = 0
        head = _read_safetensors_head(name, src, declared_size) if name.lower().endswith(".safetensors") else b""
        while True:
            chunk = head or src.read(_CHUNK)
            head = b""
            if not chunk:
                break
            written += len(chunk)
            self.bytes += len(chunk)
            if written > declared_size:
                raise UploadRejected(
                    "corrupt_archive",
                    f"archive member {name!r} unpacks to more bytes than its header declares; refused",
                )
            self._refuse_over(self.bytes, None)
            dst.write(chunk)
        return written


def _read_exactly(src: IO[bytes], n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = src.read(n - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _read_safetensors_head(name: str, src: IO[bytes], declared_size: int) -> bytes:
    """Read and check a safetensors member's header; return the bytes read (to be written first).

    The header is JSON naming each tensor's dtype, shape and byte range; the ranges must tile the data
    section exactly, and the data section must end where the member ends. A file that is longer or
    shorter than its header says is refused here, before its data is written."""
    def bad(why: str) -> UploadRejected:
        return UploadRejected("bad_safetensors", f"{name!r} is not a valid safetensors file: {why}")

    if declared_size < 8:
        raise bad("shorter than its 8-byte header length")
    prefix = _read_exactly(src, 8)
    (header_len,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (None,)
    if header_len is None or header_len > min(SAFETENSORS_HEADER_MAX, declared_size - 8):
        raise bad("its header length is larger than the file")
    raw = _read_exactly(src, header_len)
    if len(raw) != header_len:
        raise bad("truncated header")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    ranges = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, end = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            dtype = str(info["dtype"])
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {key!r} has no valid dtype, shape and data_offsets") from None
        if start < 0 or end < start or any(d < 0 for d in shape):
            raise bad(f"tensor {key!r} has invalid offsets or shape")
        count = 1
        for d in shape:
            count *= d
        if dtype in _DTYPE_BYTES and count * _DTYPE_BYTES[dtype] != end - start:
            raise bad(f"tensor {key!r} ({dtype}, shape {shape}) does not match its byte range {start}..{end}")
        ranges.append((start, end))
    position = 0
    for start, end in sorted(ranges):
        if start != position:
            raise bad("its tensors' byte ranges overlap or leave holes")
        position = end
    if 8 + header_len + position != declared_size:
        raise bad(f"its header describes {8 + header_len + position} bytes but the file has {declared_size}")
    return prefix + raw


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


def _extract_zip(fileobj: BinaryIO, root: Path, limits: UploadLimits, archive_bytes: int,
                 ignored: list[str]) -> list[str]:
    budget, files = _Budget(limits, archive_bytes), []
    seen: set[str] = set()
    with zipfile.ZipFile(fileobj) as archive:
        infos = archive.infolist()
        if len(infos) > limits.max_files:
            raise UploadRejected("too_many_files", f"the archive has more than {limits.max_files} files; refused",
                                 status=413)
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
            if rel.suffix.lower() in PICKLE_SUFFIXES:
                ignored.append(str(rel))
                continue
            budget.add_member(info.filename, info.file_size, info.compress_size)
            checked.append((info, rel))
        budget.bytes = 0
        for info, rel in checked:
            with archive.open(info) as src, _open_target(root, rel, seen) as dst:
                budget.copy(info.filename, src, dst, info.file_size)
            files.append(str(rel))
    return files


def _extract_tar(fileobj: BinaryIO, root: Path, limits: UploadLimits, archive_bytes: int,
                 ignored: list[str]) -> list[str]:
    budget, files, members = _Budget(limits, archive_bytes), [], 0
    seen: set[str] = set()
    # Stream mode ("r|") reads each header once, in order, and never seeks: the whole archive
    # is never decompressed just to list it. Decompressing with GzipFile ourselves (not "r|gz")
    # checks the gzip CRC and length at the end, so a truncated upload is refused instead of
    # being read as a shorter, valid-looking archive.
    gz = gzip.GzipFile(fileobj=fileobj, mode="rb")
    with tarfile.open(fileobj=gz, mode="r|") as archive:
        for member in archive:
            members += 1
            if members > limits.max_files:
                raise UploadRejected("too_many_files", f"the archive has more than {limits.max_files} files; refused",
                                     status=413)
            if member.isdir() and all(p in ("", ".") for p in PurePosixPath(member.name).parts):
                continue  # the archive's own root, as `tar -C dir .` writes it ("./")
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
            if rel.suffix.lower() in PICKLE_SUFFIXES:
                ignored.append(str(rel))  # skipped: the stream moves past its data unread
                continue
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
        budget._refuse_over(budget.bytes, None)
    return files


def _strip_single_top_directory(root: Path, files: list[str], ignored: list[str]) -> tuple[Path, list[str], list[str]]:
    """Archives made with ``zip -r model.zip model/`` have one top directory; look inside it."""
    if "config.json" in files:
        return root, files, ignored
    tops = {f.split("/", 1)[0] for f in files + ignored}
    if len(tops) == 1 and all("/" in f for f in files + ignored):
        top = tops.pop()
        return root / top, [f.split("/", 1)[1] for f in files], [f.split("/", 1)[1] for f in ignored]
    return root, files, ignored


def _check_model_directory(root: Path, files: list[str], ignored: list[str]) -> dict:
    weights = [f for f in files if f.endswith(".safetensors")]
    if ignored and not weights:
        refuse_pickles(PurePosixPath(ignored[0]))
    if "config.json" not in files:
        raise UploadRejected(
            "missing_config",
            "the archive has no config.json at its top level; upload a Hugging Face-format model directory",
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
    if limits.quota_remaining is not None and size > limits.quota_remaining:
        raise UploadRejected(
            "quota_exceeded", f"the archive is {size} bytes; your organisation's storage quota has "
            f"{max(limits.quota_remaining, 0)} bytes left", status=413)
    kind = sniff_archive(fileobj)
    workdir = Path(tempfile.mkdtemp(prefix="upload-", dir=staging_root()))
    try:
        unpacked = workdir / "model"
        unpacked.mkdir()
        ignored: list[str] = []
        extract = _extract_zip if kind == "zip" else _extract_tar
        try:
            files = extract(fileobj, unpacked, limits, size, ignored)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, OSError,
                NotImplementedError) as exc:
            if isinstance(exc, FileExistsError):
                raise UploadRejected("duplicate_member",
                                     f"the archive has two members with the same path: {exc.filename}") from None
            raise UploadRejected("corrupt_archive", f"the {kind} archive is corrupt or truncated: {exc}") from None
        root, files, ignored = _strip_single_top_directory(unpacked, files, ignored)
        config = _check_model_directory(root, files, ignored)
        yield ExtractedModel(path=root, files=sorted(files),
                             unpacked_bytes=sum((root / f).stat().st_size for f in files),
                             config=config, ignored=sorted(ignored))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def install_model_directory(extracted: ExtractedModel, destination: Path) -> None:
    """Move a validated directory to its final place. Call inside ``transaction.atomic()`` and
    remove ``destination`` if the transaction fails (see :func:`remove_tree`)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists():
        raise UploadRejected("already_uploaded", f"{destination.name} already has an artifact", status=409)
    os.replace(extracted.path, destination)


def organisation_storage_used(organisation) -> int:
    """Bytes the organisation's uploaded versions occupy: archives plus unpacked directories."""
    from governance.artifacts import uploaded_model_directory
    from governance.models import ModelVersion

    used = 0
    for version in ModelVersion.objects.filter(ai_model__organisation=organisation).exclude(archive=""):
        with contextlib.suppress(OSError):
            used += version.archive.size
        for dirpath, _dirs, names in os.walk(uploaded_model_directory(version)):
            for name in names:
                with contextlib.suppress(OSError):
                    used += os.lstat(os.path.join(dirpath, name)).st_size
    return used


def limits_for(organisation) -> UploadLimits:
    """The settings' limits, with what ``organisation``'s quota (``LOUPE_ORGANISATION_QUOTA_BYTES``,
    0: none) has left."""
    quota = int(settings.LOUPE_ORGANISATION_QUOTA_BYTES)
    remaining = None if quota <= 0 else quota - organisation_storage_used(organisation)
    return UploadLimits.from_settings(quota_remaining=remaining)


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
                raise UploadRejected("image_too_large", f"the image is a decompression bomb: {exc}",
                                     status=413) from None
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
