"""Progress bars for management commands: one tqdm bar per probe run.

In-process (the embedded default) the bars follow the pipeline's progress listeners as the probes
report; against a real broker they poll the runs' rows, which workers update as they go.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm import tqdm

from governance import pipeline
from governance.models import AuditCase, ProbeRun


class RunBars:
    def __init__(self, case_id: int, stream: Any = None) -> None:
        self.case_id = case_id
        self.stream = stream or sys.stderr
        self.bars: dict[int, tqdm] = {}

    def _bar(self, run_id: int) -> tqdm:
        if run_id not in self.bars:
            run = ProbeRun.objects.filter(pk=run_id).values("kind", "params").first() or {"kind": "?", "params": {}}
            label = run["kind"] + (f" ({run['params']['kind']})" if isinstance(run["params"].get("kind"), str) else "")
            self.bars[run_id] = tqdm(total=100, desc=f"run #{run_id} {label}"[:40].ljust(40), file=self.stream,
                                     bar_format="{desc} {bar} {percentage:3.0f}% {postfix}", leave=True)
        return self.bars[run_id]

    def update(self, run_id: int, fraction: float, phase: str) -> None:
        bar = self._bar(run_id)
        bar.n = int(round(min(max(fraction, 0.0), 1.0) * 100))
        bar.set_postfix_str(phase[:40], refresh=False)
        bar.refresh()

    def __enter__(self) -> RunBars:
        pipeline.progress_listeners.append(self.update)
        return self

    def __exit__(self, *exc: Any) -> None:
        pipeline.progress_listeners.remove(self.update)
        self.finish()

    def finish(self) -> None:
        for run in ProbeRun.objects.filter(case_id=self.case_id):
            bar = self._bar(run.pk)
            bar.n = 100 if run.is_finished else int(run.progress * 100)
            bar.set_postfix_str(run.status if run.status != ProbeRun.Status.FAILED else f"FAILED: {run.error[:30]}")
            bar.close()

    def poll_until_done(self, timeout: float | None = None, interval: float = 1.0) -> AuditCase:
        """Follow a case run by remote workers until it leaves ``running`` (or ``timeout`` passes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            case = AuditCase.objects.get(pk=self.case_id)
            for run in ProbeRun.objects.filter(case_id=self.case_id):
                self.update(run.pk, 1.0 if run.is_finished else run.progress, run.phase or run.status)
            if case.state != AuditCase.State.RUNNING:
                return case
            if deadline is not None and time.monotonic() > deadline:
                return case
            time.sleep(interval)
