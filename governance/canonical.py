"""Canonical JSON and SHA-256 for the service: re-exports :mod:`loupe_verify.canonical`.

One implementation (RFC 8785, the ``rfc8785`` package) serves the service and the offline verifier,
so a digest computed here is the digest ``loupe-verify`` recomputes from an export bundle.
"""

from __future__ import annotations

from loupe_verify.canonical import canonical_json, digest, sha256_hex

__all__ = ["canonical_json", "digest", "sha256_hex"]
