"""RFC 8785 (JSON Canonicalization Scheme) and SHA-256: the one way Loupe turns data into a digest.

Every digest Loupe records (audit-log rows, evidence/sign-off/report content digests, manifests)
is SHA-256 over these bytes, so anyone holding the same data recomputes the same digest with any
RFC 8785 implementation, in any language. Pure Python: no Django.
"""

from __future__ import annotations

import hashlib
from typing import Any

import rfc8785


def canonical_json(data: Any) -> bytes:
    """RFC 8785 bytes of ``data``.

    Raises ``ValueError`` for what RFC 8785 cannot express exactly (NaN/Infinity, integers beyond
    +/-2**53-1, non-string keys) and ``TypeError`` for values JSON has no type for.
    """
    try:
        return rfc8785.dumps(data)
    except rfc8785.CanonicalizationError as exc:
        if str(exc).startswith("unsupported type"):
            raise TypeError(str(exc)) from exc
        raise ValueError(str(exc)) from exc


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def digest(data: Any) -> str:
    """Hex SHA-256 of the RFC 8785 form of ``data``."""
    return sha256_hex(canonical_json(data))
