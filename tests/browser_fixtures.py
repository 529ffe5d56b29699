"""The ``browser_page`` fixture (a pytest plugin module the root ``conftest.py`` registers): headless
Chromium (Debian's package, installed by ``.ci/run``) driven by Playwright, for the browser tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("LOUPE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser_page(tmp_path, monkeypatch):
    """A fresh Chromium profile and page. Fails (never skips) without Chromium: CI installs it."""
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's chromium (apt-get install -y chromium) "
                    "as .ci/run does, or set LOUPE_CHROMIUM")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread; the test's own ORM calls are still
    # synchronous and never run inside it.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            accept_downloads=True, viewport={"width": 1280, "height": 900})
        context.set_default_timeout(20_000)
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()
