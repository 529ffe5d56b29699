"""Hostile text in model cards and reviewer comments must not make the report read, fetch or embed
anything outside Loupe's own static files and the case's evidence, and rendering must still finish.

Mallory (a provider's engineer with bad intentions) controls the model card and the intended
purpose; a compromised reviewer account controls a sign-off comment. A real TCP listener on
127.0.0.1 stands in for an internal service: it must never receive a connection.
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import socket
import threading
import zlib

import pytest
from pypdf import PdfReader

from governance.reports.render import render_pdf
from governance.reports.url_fetcher import RefusedURL, SafeURLFetcher

PASSWD_MARKER = "root:x:0:0"


class Listener:
    """A TCP server that records every connection attempt."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def listener():
    server = Listener()
    # Prove the listener works, so "no connection" below means something.
    socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    for _ in range(50):
        if server.connections:
            break
        threading.Event().wait(0.02)
    assert server.connections == 1
    server.connections = 0
    yield server
    server.close()


def hostile_text(port: int, *, giant_css: bool = True, long_word: int = 30_000) -> str:
    css = (f'<style>@import url(http://127.0.0.1:{port}/i.css); * {{ font-size: 99999999px !important; '
           f'width: 1e30px; margin: -1e9px }}</style><div style="font-size:1e30px;height:9999999in">big</div>'
           if giant_css else "")
    return (
        f'<img src="file:///etc/passwd"> <link rel="attachment" href="file:///etc/passwd">'
        f'<img src="http://127.0.0.1:{port}/leak.png"><link rel="stylesheet" href="http://127.0.0.1:{port}/x.css">'
        f'<style>@import url(http://127.0.0.1:{port}/i.css)</style>{css}'
        f'<iframe src="https://example.org/"></iframe><svg><image href="file:///etc/hostname"/></svg>'
        f'{{% debug %}} {{{{ settings.SECRET_KEY }}}} ' + "A" * long_word
    )


def _pdf_bytes_expanded(pdf: bytes) -> bytes:
    """The PDF with every Flate stream inflated, to search content that would be compressed."""
    out = [pdf]
    for match in re.finditer(rb"stream\r?\n(.*?)endstream", pdf, re.DOTALL):
        with contextlib.suppress(zlib.error):
            out.append(zlib.decompress(match.group(1)))
    return b"".join(out)


def test_it_refuses_every_url_outside_the_sandbox(listener):
    fetcher = SafeURLFetcher()
    refused = [
        "file:///etc/passwd",
        f"http://127.0.0.1:{listener.port}/x.png",
        f"https://127.0.0.1:{listener.port}/x.png",
        "ftp://127.0.0.1/x",
        "data:text/html,<script>alert(1)</script>",
        "data:image/svg+xml;base64," + base64.b64encode(b'<svg><image href="file:///etc/passwd"/></svg>').decode(),
        "loupe://static/../settings/__init__.py",
        "loupe://static/%2e%2e/%2e%2e/manage.py",
        "loupe://static/reports/../../models.py",
        "loupe://artifact/1",  # not registered for this report
        "loupe://attachment/secrets.json",
        f"loupe://static@127.0.0.1:{listener.port}/reports/report.css",
        "/etc/passwd",
    ]
    for url in refused:
        with pytest.raises(RefusedURL):
            fetcher.fetch(url)
    assert listener.connections == 0
    css = fetcher.fetch("loupe://static/reports/report.css")
    assert css.content_type == "text/css" and b"@page" in css.read()
    png = fetcher.fetch("data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n").decode())
    assert png.content_type == "image/png"


def test_it_blocks_hostile_markup_even_if_it_reached_the_html_unescaped(listener):
    """Defence in depth: the fetcher stops what escaping should already have prevented.

    (Giant CSS values are left out here: as live CSS they crash WeasyPrint itself with a
    ZeroDivisionError; as escaped user text, below, they are harmless.)"""
    html = f"<html><body><h1>x</h1>{hostile_text(listener.port, giant_css=False, long_word=50)}</body></html>"
    fetcher = SafeURLFetcher()
    import datetime as dt

    rendered = render_pdf(html, fetcher=fetcher, manifest=b'{"format": "x"}',
                          created=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    assert listener.connections == 0
    assert any(u.startswith("file:///etc/passwd") for u in rendered.refused_urls)
    assert any(f"127.0.0.1:{listener.port}" in u for u in rendered.refused_urls)
    reader = PdfReader(io.BytesIO(rendered.pdf))
    assert list(reader.attachments) == ["loupe-manifest.json"]
    assert PASSWD_MARKER.encode() not in _pdf_bytes_expanded(rendered.pdf)


@pytest.mark.slow
def test_it_escapes_hostile_model_cards_and_comments_and_still_renders(db, settings, tmp_path, listener,
                                                                     test_probe_kind):
    from governance.reports import render_case
    from tests.report_fixtures import acme_case

    settings.MEDIA_ROOT = str(tmp_path)
    evil = hostile_text(listener.port)
    case, _ = acme_case(("grounding",), comment=evil, card=hostile_text(listener.port, long_word=3_000))
    rendered, manifest = render_case(case, version=1)

    # Nothing was even attempted: the hostile markup stayed text.
    assert rendered.refused_urls == [] and listener.connections == 0
    assert all(u.startswith(("loupe://static/", "loupe://artifact/", "loupe://attachment/"))
               for u in rendered.served_urls)
    reader = PdfReader(io.BytesIO(rendered.pdf))
    assert list(reader.attachments) == ["loupe-manifest.json"]
    assert PASSWD_MARKER.encode() not in _pdf_bytes_expanded(rendered.pdf)
    text = re.sub(r"\s+", " ", " ".join(page.extract_text() or "" for page in reader.pages))
    assert '<img src="file:///etc/passwd">' in text  # shown literally, as the reviewer typed it
    assert "{% debug %}" in text and settings.SECRET_KEY not in text
    assert "more characters in the manifest" in text  # 30 000 characters were cut, not laid out
    assert manifest["signoffs"][0]["comment"] == evil.strip()  # the manifest keeps the full text
