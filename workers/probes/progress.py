"""Progress bars for the command line: a ``suite.Progress`` sink drawn with tqdm on stderr.

stdout stays clean for the JSON a command prints; the bar goes to stderr and disappears when the
command is piped without a terminal only if ``enabled`` is false (``--no-progress``).
"""

from __future__ import annotations

import sys

from tqdm import tqdm


class TqdmProgress:
    """``progress(fraction, phase)`` -> a tqdm bar in per-mille steps. Use as a context manager."""

    def __init__(self, description: str, *, enabled: bool = True) -> None:
        self._bar = tqdm(total=1000, desc=description, file=sys.stderr, disable=not enabled, leave=False,
                         bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")
        self._description = description

    def __call__(self, fraction: float, phase: str) -> None:
        target = max(0, min(1000, round(fraction * 1000)))
        if target > self._bar.n:
            self._bar.update(target - self._bar.n)
        self._bar.set_description(f"{self._description}: {phase}", refresh=True)

    def __enter__(self) -> TqdmProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.close()
