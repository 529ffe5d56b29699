"""Provider documents: what only the provider can supply, stored typed, hashed and versioned.

Loupe measures a model; it cannot produce a risk-management file, a declaration of conformity or
instructions for use. Providers attach them here (one ``ProviderDocument`` row per upload; a new
upload of the same type becomes version n+1, earlier versions stay), and the report's coverage
matrix cites the latest version of each type with its SHA-256, so an assessor can tell "supplied
by the provider" from "evidenced by Loupe" and from "not covered".
"""

from __future__ import annotations

import hashlib
from typing import IO

from django.conf import settings
from django.core.files.base import ContentFile
from django.db import transaction
from django.db.models import Max

from governance import audit_log
from governance.models import ModelVersion, ProviderDocument

# Document formats an assessor can open without running anything: no HTML, no macros.
CONTENT_TYPES = {
    ".pdf": "application/pdf", ".txt": "text/plain", ".md": "text/markdown", ".json": "application/json",
    ".csv": "text/csv", ".odt": "application/vnd.oasis.opendocument.text",
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
}
MAGIC = {".pdf": b"%PDF-", ".odt": b"PK\x03\x04", ".docx": b"PK\x03\x04"}
DEFAULT_MAX_BYTES = 50 * 1024 * 1024


class DocumentRejected(ValueError):
    """The upload is refused; the message says why in words the provider can act on."""


def max_bytes() -> int:
    return int(getattr(settings, "LOUPE_MAX_DOCUMENT_BYTES", DEFAULT_MAX_BYTES))


def content_type_for(filename: str, head: bytes) -> str:
    name = filename.lower()
    suffix = name[name.rfind("."):] if "." in name else ""
    if suffix not in CONTENT_TYPES:
        raise DocumentRejected(f"file type {suffix or '(none)'} is not accepted; use one of "
                               f"{', '.join(sorted(CONTENT_TYPES))}")
    magic = MAGIC.get(suffix)
    if magic and not head.startswith(magic):
        raise DocumentRejected(f"the file is named {suffix} but its content is not a {suffix} document")
    return CONTENT_TYPES[suffix]


def attach(model_version: ModelVersion, *, doc_type: str, title: str, filename: str, stream: IO[bytes],
           by) -> ProviderDocument:
    """Store one provider document as the next version of its type; returns the new immutable row."""
    if doc_type not in ProviderDocument.DocType.values:
        raise DocumentRejected(f"unknown document type {doc_type!r}; expected one of "
                               f"{', '.join(ProviderDocument.DocType.values)}")
    title = (title or "").strip() or ProviderDocument.DocType(doc_type).label
    limit = max_bytes()
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise DocumentRejected(f"the document is larger than {limit} bytes; refused")
    if not data:
        raise DocumentRejected("the document is empty")
    content_type = content_type_for(filename, data[:8])
    safe_name = "".join(c if c.isalnum() or c in "._-" else "_" for c in filename.rsplit("/", 1)[-1])[-120:]
    with transaction.atomic():
        ModelVersion.objects.select_for_update().filter(pk=model_version.pk).first()
        latest = (ProviderDocument.objects.filter(model_version=model_version, doc_type=doc_type)
                  .aggregate(v=Max("version"))["v"] or 0)
        document = ProviderDocument(model_version=model_version, doc_type=doc_type, version=latest + 1,
                                    title=title[:200], content_type=content_type,
                                    sha256=hashlib.sha256(data).hexdigest(), size=len(data), uploaded_by=by)
        document.file.save(safe_name or "document", ContentFile(data), save=False)
        try:
            document.save()
            audit_log.record(by, "provider_document.attached", model_version, {
                "document": document.pk, "doc_type": doc_type, "version": document.version,
                "sha256": document.sha256, "size": document.size, "title": document.title})
        except BaseException:
            if document.file.name:
                document.file.storage.delete(document.file.name)
            raise
    return document


def latest_documents(model_version: ModelVersion) -> list[ProviderDocument]:
    """The newest version of each document type for ``model_version``."""
    newest: dict[str, ProviderDocument] = {}
    for document in ProviderDocument.objects.filter(model_version=model_version).order_by("doc_type", "version"):
        newest[document.doc_type] = document
    return [newest[k] for k in sorted(newest)]


def entry(document: ProviderDocument) -> dict:
    """A document as the report manifest records it."""
    return {"id": document.pk, "doc_type": document.doc_type, "type_label": document.get_doc_type_display(),
            "version": document.version, "title": document.title, "sha256": document.sha256, "size": document.size,
            "content_type": document.content_type, "uploaded_by": document.uploaded_by.get_username(),
            "created_at": document.created_at.isoformat()}
