"""Evidence files, content-addressed: ``evidence/case-<case>/run-<run>/<sha256><suffix>``.

A transaction that rolls back after writing an artifact (a dropped connection) and is then retried
writes the same names again instead of suffixed copies. Since a run has evidence exactly when it
succeeded (one transaction), whatever lies in the directory of a run that is claimed again was left
by a rolled-back attempt and is removed (``governance.artifacts.discard_unrecorded_files``);
``manage.py check_storage`` lists anything else astray. This module imports no Loupe model, so
the models can use it.
"""

from __future__ import annotations


def run_directory(case_id: int, run_id: int) -> str:
    """The storage directory of a run's evidence files."""
    return f"evidence/case-{case_id}/run-{run_id}"


def store_blob(directory: str, content: bytes, sha256: str, suffix: str) -> str:
    """Store ``content`` (whose SHA-256 is ``sha256``) under its content address in ``directory``
    through the default storage and return the name. An existing file of that name holds the same
    bytes (``check_storage --verify`` would say otherwise) and is kept."""
    from django.core.files.base import ContentFile
    from django.core.files.storage import default_storage

    name = f"{directory}/{sha256}{suffix}"
    if default_storage.exists(name):
        return name
    saved = default_storage.save(name, ContentFile(content))
    if saved != name:  # another writer created it between our check and our save: keep theirs
        default_storage.delete(saved)
    return name
