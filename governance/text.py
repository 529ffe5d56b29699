"""Neutralising provider text before people read it.

Unicode bidirectional controls (U+202E RIGHT-TO-LEFT OVERRIDE, the embeddings and isolates, the
directional marks) make a renderer reorder the characters that follow them: "approve\u202e..." can
read as something else entirely, in the PDF and in the admin. Right-to-left scripts lay out
correctly without them, so they are removed wherever HTML is rendered: the report's HTML
(:func:`governance.reports.render.render_html`) and every HTML response (:class:`BidiControlMiddleware`:
the admin, the review workspace). Stored data, manifests and the JSON API keep the text as written.
"""

from __future__ import annotations

import re

BIDI_CONTROLS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f\u061c"
_BIDI = re.compile(f"[{BIDI_CONTROLS}]")


def strip_bidi_controls(text: str) -> str:
    return _BIDI.sub("", text)


class BidiControlMiddleware:
    """Removes bidirectional controls from every (non-streaming) HTML response."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if (not getattr(response, "streaming", False)
                and response.get("Content-Type", "").startswith("text/html")):
            charset = response.charset or "utf-8"
            try:
                text = response.content.decode(charset)
            except UnicodeDecodeError:
                return response
            if _BIDI.search(text):
                response.content = strip_bidi_controls(text).encode(charset)
                if response.has_header("Content-Length"):
                    response["Content-Length"] = str(len(response.content))
        return response
