"""The audit log's row hashes, recomputed without a database (same rules as ``governance.audit_log``).

A row is a dict with ``seq, created_at (ISO string), actor_id, actor_label, action, object_type,
object_id, organisation_id, case_id, payload (RFC 8785 text), payload_hash, prev_hash, row_hash``.
``payload_hash`` is SHA-256 of the payload text; ``row_hash`` is the RFC 8785 digest of every other
column (see :data:`ROW_HASH_FIELDS`); ``prev_hash`` is the previous row's ``row_hash``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from loupe_verify.canonical import digest, sha256_hex

GENESIS_HASH = "0" * 64
ROW_HASH_FIELDS = ("seq", "created_at", "actor_id", "actor_label", "action", "object_type", "object_id",
                   "organisation_id", "case_id", "payload_hash", "prev_hash")


def row_hash_of(row: dict[str, Any]) -> str:
    """The row hash of ``row`` (``created_at`` as the ISO string the log exports)."""
    return digest({name: row[name] for name in ROW_HASH_FIELDS})


def excerpt_problems(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Check rows of the log (not necessarily contiguous): each row's payload and row hash, and the link
    between rows whose ``seq`` are consecutive. Returns sentences naming the row; empty when sound."""
    problems: list[str] = []
    previous = None
    for row in sorted(rows, key=lambda r: r["seq"]):
        where = f"audit-log row seq {row['seq']} ({row.get('action')})"
        if sha256_hex(str(row["payload"]).encode("utf-8")) != row["payload_hash"]:
            problems.append(f"{where}: its payload no longer matches its payload hash")
        if row_hash_of(row) != row["row_hash"]:
            problems.append(f"{where}: its columns no longer match its row hash")
        if previous is not None and previous["seq"] + 1 == row["seq"] and previous["row_hash"] != row["prev_hash"]:
            problems.append(f"{where}: it is not chained to seq {previous['seq']}")
        previous = row
    return problems


def payload(row: dict[str, Any]) -> Any:
    return json.loads(row["payload"])
