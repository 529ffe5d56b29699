"""The only way WeasyPrint may read anything while it renders a report.

A report is built from user-supplied text (model cards, reviewer comments). Django's autoescaping
keeps that text from becoming markup, and this fetcher is the second wall: whatever URL reaches
WeasyPrint (from a template, a stylesheet, an SVG, or text that slipped through), only these are
served:

- ``loupe://static/<path>``: a file under the project's own ``governance/static/`` directory
  (report CSS and fonts), resolved and checked to stay inside it;
- ``loupe://artifact/<id>``: an evidence artifact, read through Django's storage API, only if the
  renderer registered that artifact for this report (so an id cannot be guessed from a template);
- ``loupe://attachment/<name>``: bytes the renderer registered (the manifest JSON);
- ``data:image/png|jpeg|gif;base64,...``: small inline raster images.

Everything else (``file:``, ``http(s):``, ``ftp:``, other ``data:`` types, relative paths that
resolve to any of them) is refused and recorded in :attr:`SafeURLFetcher.refused`. We subclass
WeasyPrint's ``URLFetcher`` only for its type; :meth:`fetch` never calls the parent, so no
urllib handler (file, http, ftp) can ever run.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import ImageFile
from weasyprint.urls import URLFetcher, URLFetcherResponse

# Every path of Loupe's into WeasyPrint goes through this module (render.py imports it, and so does
# the report context).
# Importing WeasyPrint sets Pillow's process-wide LOAD_TRUNCATED_IMAGES, so that a browser-like
# renderer shows what it can of a broken web image. Reports embed only the figures Loupe drew itself;
# everything else in the process (upload checks, the probes' image loading) must refuse a truncated
# file rather than silently pad it with grey, so the switch is turned back.
ImageFile.LOAD_TRUNCATED_IMAGES = False

SCHEME = "loupe"
STATIC_ROOT = Path(__file__).resolve().parent.parent / "static"

# Inline images only; SVG is excluded because an SVG can reference further URLs and scripts.
_DATA_IMAGE = re.compile(r"^data:(image/(?:png|jpeg|gif))(;base64)?,(.*)$", re.DOTALL | re.IGNORECASE)
MAX_DATA_URL_BYTES = 2 * 1024 * 1024
_CONTENT_TYPES = {".css": "text/css", ".woff2": "font/woff2", ".woff": "font/woff", ".ttf": "font/ttf",
                  ".otf": "font/otf", ".png": "image/png", ".svg": "image/svg+xml", ".json": "application/json"}


class RefusedURL(ValueError):
    """A URL the report renderer is not allowed to fetch."""


def static_url(path: str) -> str:
    return f"{SCHEME}://static/{path}"


def artifact_url(artifact_id: int | str) -> str:
    return f"{SCHEME}://artifact/{artifact_id}"


def attachment_url(name: str) -> str:
    return f"{SCHEME}://attachment/{name}"


class SafeURLFetcher(URLFetcher):
    """Serves the project's static files, registered artifacts and attachments; refuses the rest.

    ``artifacts`` maps an artifact id (as a string) to a zero-argument callable returning
    ``(bytes, content_type)``; it is filled by the renderer with exactly the artifacts the report
    shows. ``attachments`` maps a name to ``(bytes, content_type)``.
    """

    def __init__(self, artifacts: dict[str, Callable[[], tuple[bytes, str]]] | None = None,
                 attachments: dict[str, tuple[bytes, str]] | None = None) -> None:
        # fail_on_errors=False: a refused URL is logged and skipped, rendering goes on.
        super().__init__(allowed_protocols=(), allow_redirects=False, fail_on_errors=False, timeout=1)
        self.artifacts = dict(artifacts or {})
        self.attachments = dict(attachments or {})
        self.refused: list[str] = []
        self.served: list[str] = []

    def fetch(self, url: str, headers: dict | None = None) -> URLFetcherResponse:  # noqa: ARG002
        try:
            body, content_type = self._resolve(url)
        except RefusedURL:
            self.refused.append(url[:200])
            raise
        self.served.append(url[:200])
        return URLFetcherResponse(url, body, {"Content-Type": content_type})

    # WeasyPrint calls fetcher(url) and sometimes fetcher.open(...); both end here.
    def __call__(self, url: str) -> URLFetcherResponse:
        return self.fetch(url)

    def open(self, url, data=None, timeout=None):  # noqa: ARG002, A003
        return self.fetch(url if isinstance(url, str) else url.full_url)

    def _resolve(self, url: str) -> tuple[bytes, str]:
        if url[:5].lower() == "data:":
            return _decode_data_image(url)
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise RefusedURL(f"malformed URL refused: {url[:80]!r}") from exc
        if parts.scheme != SCHEME or parts.query or parts.username or parts.port:
            raise RefusedURL(f"URL outside the report sandbox refused: {url[:80]!r}")
        path = unquote(parts.path).lstrip("/")
        if parts.netloc == "static":
            return self._static(path)
        if parts.netloc == "artifact" and path in self.artifacts:
            return self.artifacts[path]()
        if parts.netloc == "attachment" and path in self.attachments:
            return self.attachments[path]
        raise RefusedURL(f"unknown report resource refused: {url[:80]!r}")

    @staticmethod
    def _static(path: str) -> tuple[bytes, str]:
        candidate = (STATIC_ROOT / path).resolve()
        # resolve() follows symlinks, so a link pointing outside static/ is refused too.
        if not candidate.is_relative_to(STATIC_ROOT) or not candidate.is_file():
            raise RefusedURL(f"static file refused: {path[:80]!r}")
        content_type = _CONTENT_TYPES.get(candidate.suffix.lower())
        if content_type is None:
            raise RefusedURL(f"static file type refused: {path[:80]!r}")
        return candidate.read_bytes(), content_type


def _decode_data_image(url: str) -> tuple[bytes, str]:
    match = _DATA_IMAGE.match(url)
    if not match:
        raise RefusedURL("data: URL refused (only PNG, JPEG and GIF images are allowed)")
    content_type, is_base64, payload = match.groups()
    if len(payload) > MAX_DATA_URL_BYTES * 4 // 3 + 4:
        raise RefusedURL("data: image refused: larger than the inline image limit")
    try:
        body = base64.b64decode(payload, validate=True) if is_base64 else unquote(payload).encode("latin-1")
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise RefusedURL("data: image refused: malformed payload") from exc
    return body, content_type.lower()
