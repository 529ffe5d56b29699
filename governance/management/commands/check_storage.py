"""``manage.py check_storage``: files and rows that do not match (evidence artifacts, report PDFs)."""

from __future__ import annotations

import hashlib
import json

from django.core.files.storage import default_storage
from django.core.management.base import BaseCommand, CommandError

from governance import artifacts
from governance.models import EvidenceArtifact, Report


def referenced_files() -> dict[str, tuple[str, str]]:
    """Storage name -> (what refers to it, the SHA-256 recorded for it)."""
    files: dict[str, tuple[str, str]] = {}
    for pk, name, sha in EvidenceArtifact.objects.values_list("pk", "file", "sha256").iterator():
        files[name] = (f"evidence artifact #{pk}", sha)
    for pk, name, sha in Report.objects.values_list("pk", "pdf", "sha256").iterator():
        files[name] = (f"report #{pk}", sha)
    return files


class Command(BaseCommand):
    help = ("List orphaned files (stored below evidence/ or reports/ with no row referring to them, e.g. "
            "left by a transaction that rolled back) and missing files (a row whose file is gone). "
            "Exits 1 when a file is missing or corrupt; orphans are reported, and removed with --delete-orphans.")

    def add_arguments(self, parser):
        parser.add_argument("--verify", action="store_true", help="also re-hash every referenced file")
        parser.add_argument("--delete-orphans", action="store_true", help="remove the orphaned files")
        parser.add_argument("--json", action="store_true", help="print the result as JSON")

    def handle(self, *args, **options):
        referenced = referenced_files()
        stored = artifacts.stored_names()
        orphans = sorted(stored - set(referenced))
        missing = sorted(f"{name} ({referenced[name][0]})" for name in set(referenced) - stored)
        corrupt = []
        if options["verify"]:
            for name in sorted(set(referenced) & stored):
                with default_storage.open(name, "rb") as handle:
                    if hashlib.file_digest(handle, "sha256").hexdigest() != referenced[name][1]:
                        corrupt.append(f"{name} ({referenced[name][0]})")
        if options["delete_orphans"]:
            for name in orphans:
                default_storage.delete(name)
        result = {"referenced": len(referenced), "stored": len(stored), "orphans": orphans, "missing": missing,
                  "corrupt": corrupt, "orphans_deleted": bool(options["delete_orphans"]) and bool(orphans)}
        if options["json"]:
            self.stdout.write(json.dumps(result, indent=2))
        else:
            for name in orphans:
                self.stdout.write(f"orphan{' (deleted)' if options['delete_orphans'] else ''}: {name}")
            for name in missing:
                self.stderr.write(f"missing: {name}")
            for name in corrupt:
                self.stderr.write(f"corrupt: {name}")
            self.stdout.write(f"{len(referenced)} files referenced, {len(stored)} stored, {len(orphans)} orphaned, "
                              f"{len(missing)} missing" + (f", {len(corrupt)} corrupt" if options["verify"] else ""))
        if missing or corrupt:
            raise CommandError(f"storage does not match the records: {len(missing)} missing, {len(corrupt)} corrupt")
