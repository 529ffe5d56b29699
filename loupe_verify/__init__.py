"""Offline verification of Loupe reports and export bundles.

Importable without Django, settings or a database: ``loupe-verify BUNDLE.zip`` (:mod:`.cli`)
checks an export bundle with nothing but the bundle. Modules: :mod:`.canonical` (RFC 8785 digests),
:mod:`.chain` (audit-log row hashes), :mod:`.pdf` (signatures, signer roles, revision changes),
:mod:`.pdfa` (PDF/A-3b rules signing can break), :mod:`.bundle` (the export bundle).
"""

__all__ = ["bundle", "canonical", "chain", "pdf"]
