"""Render a report context to a tagged PDF/A-3b with WeasyPrint, deterministically.

Tagged: WeasyPrint's ``pdf_tags`` writes the structure tree (headings, paragraphs, tables, figures)
so assistive technology can read the report.

Determinism (the same case state gives the same bytes) comes from:

- PDF dates from the ``dcterms.created``/``modified`` meta tags, which the template fills with the
  case state's own timestamp (:func:`governance.reports.manifest.build_manifest`, ``as_of``);
- the embedded manifest attachment dated the same way;
- the PDF ``/ID`` derived from the content (WeasyPrint's ``pdf_identifier=True`` hashes the objects);
- ``SOURCE_DATE_EPOCH`` set while fonts are subset: fontTools otherwise stamps the current time
  into every embedded font's ``head`` table (we measured two renders a second apart differing);
- figures rendered with fixed matplotlib settings and no PNG metadata (:mod:`.figures`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from dataclasses import dataclass

from django.template.loader import render_to_string
from weasyprint import HTML, Attachment

from governance.reports.manifest import ATTACHMENT_NAME
from governance.reports.url_fetcher import SafeURLFetcher, attachment_url

PDF_VARIANT = "pdf/a-3b"
BASE_URL = "loupe://report/"
_render_lock = threading.Lock()  # SOURCE_DATE_EPOCH is process-wide


@dataclass
class RenderedPDF:
    pdf: bytes
    pages: int
    refused_urls: list[str]
    served_urls: list[str]


def _one_af_entry_per_file(document, pdf) -> None:
    """WeasyPrint's PDF/A-3 writer adds each attachment to the catalog's ``/AF`` twice (once from the
    ``/EmbeddedFiles`` name tree, once as a file specification); ISO 19005-3 6.8 wants each
    associated file referenced once."""
    entries = pdf.catalog.get("AF")
    if entries:
        seen, unique = set(), []
        for entry in entries:
            if str(entry) not in seen:
                seen.add(str(entry))
                unique.append(entry)
        entries[:] = unique


def render_html(context: dict) -> str:
    from governance.text import strip_bidi_controls

    # Provider text must not reorder what the reader sees (governance/text.py).
    return strip_bidi_controls(render_to_string("reports/report.html", context))


def render_pdf(html: str, *, fetcher: SafeURLFetcher, manifest: bytes, created: dt.datetime) -> RenderedPDF:
    """Lay out ``html`` and write a PDF/A-3b embedding ``manifest`` as ``loupe-manifest.json``.

    Only ``fetcher`` can read anything; a refused URL is logged and skipped, rendering goes on.
    """
    fetcher.attachments[ATTACHMENT_NAME] = (manifest, "application/json")
    created = created.astimezone(dt.UTC).replace(microsecond=0, tzinfo=None)
    attachment = Attachment(url=attachment_url(ATTACHMENT_NAME), url_fetcher=fetcher, name=ATTACHMENT_NAME,
                            description="Loupe report manifest: evidence hashes, metrics and sign-offs (JSON)",
                            created=created, modified=created, relationship="Data")
    epoch = str(int(created.replace(tzinfo=dt.UTC).timestamp()))
    # WeasyPrint logs every refused URL as an error; they are collected on the fetcher instead.
    weasy_logger = logging.getLogger("weasyprint")
    with _render_lock:
        previous_epoch = os.environ.get("SOURCE_DATE_EPOCH")
        previous_level = weasy_logger.level
        os.environ["SOURCE_DATE_EPOCH"] = epoch
        weasy_logger.setLevel(logging.CRITICAL)
        try:
            document = HTML(string=html, base_url=BASE_URL, url_fetcher=fetcher).render(
                pdf_variant=PDF_VARIANT, pdf_tags=True)
            pdf = document.write_pdf(pdf_variant=PDF_VARIANT, pdf_tags=True, pdf_identifier=True,
                                     attachments=[attachment], finisher=_one_af_entry_per_file)
        finally:
            weasy_logger.setLevel(previous_level)
            if previous_epoch is None:
                os.environ.pop("SOURCE_DATE_EPOCH", None)
            else:
                os.environ["SOURCE_DATE_EPOCH"] = previous_epoch
    return RenderedPDF(pdf=pdf, pages=len(document.pages), refused_urls=list(fetcher.refused),
                       served_urls=list(fetcher.served))
