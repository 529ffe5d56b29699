"""Canonical JSON and SHA-256: the one way Loupe turns data into a digest.

Every hash that a reviewer signs, an auditor recomputes or a report embeds (audit-log rows, evidence
and case digests, model manifests) goes through :func:`canonical_json`, so two parties who hold the
same data always compute the same digest, on any Python version and database.

The encoding is RFC 8785-like: UTF-8, keys sorted, no insignificant whitespace, no NaN/Infinity
(they have no JSON meaning and would make digests ambiguous).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(data: Any) -> bytes:
    """Serialise ``data`` deterministically (sorted keys, compact separators, UTF-8).

    Raises ``ValueError`` for NaN/Infinity and ``TypeError`` for values JSON cannot express.
    """
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def digest(data: Any) -> str:
    """Hex SHA-256 of the canonical JSON of ``data``."""
    return sha256_hex(canonical_json(data))
