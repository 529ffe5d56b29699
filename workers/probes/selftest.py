"""The ``selftest`` probe kind: does a worker pick up work, load the model and run a forward pass?

Operators put it in a plan to check a new GPU worker end to end without waiting for a full audit,
and the reliability tests use it because its duration and failure are controllable:
``params = {"seconds": 2.0, "fail": false}``. ``seconds`` holds the run open (reporting progress)
so a test can kill a worker or restart the broker in the middle of it.

``batch_size`` (default 1) blank images go through the forward pass. On a GPU a large one tells an
operator what fits beside the model: a batch that runs out of memory is halved until it fits
(``suite.run``), and the evidence says at which size (``memory_backoff``). ``out_of_memory_above``
raises the GPU's out-of-memory error for larger batches (0: for every batch), to exercise that path
on any device.
"""

from __future__ import annotations

import time

from pydantic import Field

from workers.probes.kinds import BatchSize, KindParams, Metric, Seed, probe_kind
from workers.probes.suite import Finding, ProbeResult, Progress, load_model, no_progress

MAX_SECONDS = 600.0


class SelftestFailure(RuntimeError):
    """Raised on request (``fail: true``) to exercise the failure path."""


class SelftestParams(KindParams):
    seconds: float = Field(0.0, ge=0, le=MAX_SECONDS, description="hold the run this long (exercises progress and "
                                                                   "cancellation)")
    fail: bool = Field(False, description="fail on purpose (exercises the failure path)")
    seed: Seed = 0
    batch_size: BatchSize = 1
    out_of_memory_above: int | None = Field(None, ge=0, description="pretend batches above this size do not fit "
                                                                    "(exercises the memory backoff)")


@probe_kind("selftest", title="Worker self-test", section=None, params=SelftestParams,
            help="load the model and run one forward pass (checks a worker, not the model)",
            glossary={"load_seconds": Metric("Load time (s)", "seconds the worker took to load the model"),
                      "forward_seconds": Metric("Forward pass (s)", "seconds of one forward pass")})
def selftest(model_dir: str, dataset_dir: str | None, params: SelftestParams, *, device: str = "cpu",
             progress: Progress = no_progress) -> ProbeResult:
    seconds, batch_size, limit = params.seconds, params.batch_size, params.out_of_memory_above
    progress(0.0, "loading the model")
    started = time.perf_counter()
    adapter = load_model(model_dir, device)
    load_seconds = time.perf_counter() - started
    deadline = time.monotonic() + float(seconds)
    while (left := deadline - time.monotonic()) > 0:
        progress(1.0 - left / max(float(seconds), 1e-9), "holding")
        time.sleep(min(0.2, left))
    if params.fail:
        raise SelftestFailure("selftest failed on request (params.fail = true)")
    import torch

    parameters = sum(p.numel() for p in adapter.model.parameters())
    if limit is not None and batch_size > limit:
        raise torch.OutOfMemoryError(f"selftest: batches above {limit} do not fit (params.out_of_memory_above)")
    with torch.no_grad():
        pixel_values = torch.zeros(batch_size, 3, adapter.image_size, adapter.image_size, device=adapter.device)
        forward_started = time.perf_counter()
        if adapter.kind == "dual_encoder":
            adapter.image_embeds(pixel_values)
        forward_seconds = time.perf_counter() - forward_started
    metrics = {"architecture": adapter.architecture, "kind": adapter.kind, "device": str(adapter.device),
               "parameters": int(parameters), "load_seconds": round(load_seconds, 4),
               "forward_seconds": round(forward_seconds, 4), "held_seconds": float(seconds), "batch_size": batch_size}
    return ProbeResult(kind="selftest", metrics=metrics,
                       summary=f"Worker loaded the {adapter.architecture} model ({parameters:,} parameters) on "
                               f"{adapter.device} and ran a forward pass.",
                       findings=[Finding("info", "worker self-test passed")], seed=params.seed)
