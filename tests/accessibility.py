"""axe-core in Debian's chromium: inject the npm package's ``axe.min.js`` into a Playwright page and
return the violations of WCAG 2.0-2.2 A/AA rules.

The script comes from the npm registry (``npm install axe-core`` into ``.cache/axe``, which
``.ci/run`` does when it is missing; ``LOUPE_AXE_JS`` points elsewhere). A missing script fails the
test, never skips it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AXE_JS = Path(os.environ.get("LOUPE_AXE_JS", ROOT / ".cache" / "axe" / "node_modules" / "axe-core" / "axe.min.js"))
WCAG_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa"]
BLOCKING = ("serious", "critical")


def axe_violations(page) -> list[dict]:
    """Every violation axe-core finds on the page as it is now (all impacts)."""
    if not AXE_JS.is_file():
        pytest.fail(f"axe-core not found at {AXE_JS}: run `npm install --prefix .cache/axe axe-core` "
                    "(as .ci/run does) or set LOUPE_AXE_JS")
    # The browser context bypasses CSP (bypass_csp=True in the fixture) so the check can inject it.
    page.add_script_tag(content=AXE_JS.read_text(encoding="utf-8"))
    result = page.evaluate("""async (tags) => {
        const r = await axe.run(document, {runOnly: {type: 'tag', values: tags}, resultTypes: ['violations']});
        return r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                                       nodes: v.nodes.slice(0, 5)
                                                     .map(n => n.target.join(' ') + ': ' + n.failureSummary)}));
    }""", WCAG_TAGS)
    return result


def assert_accessible(page, label: str, report: dict[str, list[dict]] | None = None) -> None:
    """0 serious or critical violations; minor and moderate ones are kept in ``report``."""
    violations = axe_violations(page)
    if report is not None:
        report[label] = violations
    blocking = [v for v in violations if v["impact"] in BLOCKING]
    assert not blocking, f"{label}: axe-core found serious/critical violations: {blocking}"
