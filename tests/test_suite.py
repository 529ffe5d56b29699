"""Running probe kinds (workers/probes/suite.py): memory backoff when a device runs out of memory."""

from __future__ import annotations

import re

import pytest
import torch

from tests.zoo_fixtures import heldout_fixture
from workers.probes import kinds, registry, suite
from workers.probes.errors import OutOfDeviceMemory, ProbeInputError
from workers.probes.kinds import BatchSize, KindParams

pytestmark = pytest.mark.slow

KIND = "test.memory-hungry"

heldout = heldout_fixture(12)


class HungryParams(KindParams):
    batch_size: BatchSize = 16
    score_batch_size: BatchSize = 128


class NoParams(KindParams):
    pass


def declare(name, fn, params=NoParams):
    kinds.probe_kind(name, title=name, section=None, params=params, help="a kind of this test module only")(fn)


@pytest.fixture
def hungry_kind():
    """A kind that needs batches of at most ``fits`` (its default batch_size is 16)."""
    calls: list[dict] = []
    state = {"fits": 4}

    def hungry(model_dir, dataset_dir, params, *, device, progress):
        calls.append(params.model_dump())
        if params.batch_size > state["fits"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return suite.ProbeResult(kind=KIND, metrics={"n": 3}, summary="ok")

    declare(KIND, hungry, HungryParams)
    yield calls, state
    kinds.unregister(KIND)


def test_it_starts_again_with_halved_batches_when_the_device_runs_out_of_memory(hungry_kind):
    calls, _ = hungry_kind
    phases: list[str] = []
    result = suite.run(KIND, "model", None, {"score_batch_size": 100}, device="cuda",
                       progress=lambda fraction, phase: phases.append(phase))
    assert [c["batch_size"] for c in calls] == [16, 8, 4]
    assert [c["score_batch_size"] for c in calls] == [100, 50, 25]
    assert result.metrics["n"] == 3
    assert result.metrics["memory_backoff"] == {
        "device": "cuda", "batch_params": {"batch_size": 4, "score_batch_size": 25},
        "out_of_memory_at": [{"batch_size": 16, "score_batch_size": 100}, {"batch_size": 8, "score_batch_size": 50}]}
    assert phases[0] == "out of cuda memory at batch_size=16, score_batch_size=100; starting again at batch_size=8, " \
                        "score_batch_size=50"


def test_it_records_nothing_when_the_first_attempt_fits(hungry_kind):
    calls, _ = hungry_kind
    result = suite.run(KIND, "model", None, {"batch_size": 2}, device="cuda")
    assert len(calls) == 1 and "memory_backoff" not in result.metrics


def test_it_gives_up_with_a_clear_error_when_even_batches_of_one_do_not_fit(hungry_kind):
    calls, state = hungry_kind
    state["fits"] = 0
    with pytest.raises(OutOfDeviceMemory, match="ran out of cuda memory even with batch_size=1, score_batch_size=1; "
                                                "the model does not fit .* \\(CUDA out of memory") as caught:
        suite.run(KIND, "model", None, {}, device="cuda")
    assert isinstance(caught.value, ProbeInputError)  # the CLI prints it; a task fails the run with it
    # each size is halved until every one of them is 1: 128 takes 7 halvings
    assert [c["score_batch_size"] for c in calls] == [128, 64, 32, 16, 8, 4, 2, 1]
    assert [c["batch_size"] for c in calls] == [16, 8, 4, 2, 1, 1, 1, 1]


def test_it_does_not_retry_a_kind_that_declares_no_batch_sizes():
    calls = []

    def whole(model_dir, dataset_dir, params, *, device, progress):
        calls.append(params)
        raise torch.OutOfMemoryError("CUDA out of memory")

    declare("test.whole", whole)
    try:
        with pytest.raises(OutOfDeviceMemory, match="no batch size to lower"):
            suite.run("test.whole", "model", None, {}, device="cuda")
    finally:
        kinds.unregister("test.whole")
    assert len(calls) == 1


def test_it_declares_only_batch_sizes_that_each_kind_accepts(tmp_path):
    missing_model, missing_data = str(tmp_path / "no-model"), str(tmp_path / "no-data")
    declared = {spec.name: spec.batch_params for spec in kinds.all_kinds()
                if spec.batch_params and spec.module in kinds.KIND_MODULES}
    assert set(declared) >= {"grounding", "sanity", "stability", "robustness", "shortcut", "tcav", "attention",
                             "selftest", "intervention", "token_attribution"}
    for name, sizes in declared.items():
        with pytest.raises(ProbeInputError, match="(?i)unknown"):
            suite.run(name, missing_model, missing_data, {"no_such_parameter": 1})
        for key in sizes:
            # a declared size the kind rejected as unknown would turn a retry into a bad-input failure
            with pytest.raises(ProbeInputError) as caught:
                suite.run(name, missing_model, missing_data, {key: 1})
            assert "unknown" not in str(caught.value).lower(), (name, key, str(caught.value))


def test_it_gives_the_same_grounding_numbers_after_backing_off(monkeypatch, heldout):
    from workers.probes import zoo

    model = str(zoo.checkpoint_path("tiny-clip"))
    params = {"methods": ["chefer"], "steps": 8, "figure_examples": 0}
    fitted = suite.run("grounding", model, str(heldout), {**params, "batch_size": 3})

    chefer = registry.get("chefer")
    batches: list[int] = []

    def chefer_on_a_small_gpu(adapter, pixel_values, prompts, **kwargs):
        batches.append(len(prompts))
        if len(prompts) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return chefer(adapter, pixel_values, prompts, **kwargs)

    monkeypatch.setitem(registry._METHODS, "chefer", chefer_on_a_small_gpu)
    backed_off = suite.run("grounding", model, str(heldout), {**params, "batch_size": 12})
    assert batches[:2] == [12, 6] and set(batches[2:]) == {3}
    assert backed_off.metrics["memory_backoff"]["batch_params"] == {"batch_size": 3, "score_batch_size": 32}

    def numbers(result):
        return [{k: v for k, v in m.items() if k != "seconds"} for m in result.metrics["methods"]]

    assert numbers(backed_off) == numbers(fitted)


def test_it_gives_the_same_stability_numbers_at_any_batch_size(heldout):
    # the perturbations are drawn per example, not per batch, so lowering batch_size changes nothing
    from workers.probes import zoo

    model = str(zoo.checkpoint_path("tiny-clip"))
    params = {"methods": ["chefer", "rollout"], "samples": 2}
    whole = suite.run("stability", model, str(heldout), {**params, "batch_size": 12}).metrics
    split = suite.run("stability", model, str(heldout), {**params, "batch_size": 5}).metrics
    assert {k: v for k, v in split.items() if k != "seconds"} == {k: v for k, v in whole.items() if k != "seconds"}


def test_it_frees_the_failed_attempts_tensors_before_starting_again():
    import weakref

    first_attempt: list[weakref.ref] = []
    alive_at_retry: list[bool] = []

    def grows(model_dir, dataset_dir, params, *, device, progress):
        if not first_attempt:
            activations = torch.empty(1024, 1024)
            first_attempt.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory")
        alive_at_retry.append(first_attempt[0]() is not None)
        return suite.ProbeResult(kind="test.grows", metrics={}, summary="ok")

    declare("test.grows", grows, HungryParams)
    try:
        suite.run("test.grows", "model", None, {}, device="cuda")
    finally:
        kinds.unregister("test.grows")
    # held by the error's traceback until the except clause ends: a retry from inside it would
    # start with the failed attempt's memory still taken
    assert alive_at_retry == [False]


@pytest.mark.parametrize("value", [0, -4, "8", 2.5, True, None])
def test_it_refuses_a_batch_size_that_is_not_a_positive_integer_for_every_kind(value, tmp_path):
    for spec in kinds.all_kinds():
        for key in spec.batch_params:
            got = re.escape(repr(value))
            expected = f"^{spec.name}: (.*; )?{key}: input should be [^;]* \\(got {got}\\)"
            with pytest.raises(ProbeInputError, match=expected):
                suite.run(spec.name, str(tmp_path / "no-model"), None, {key: value})


class SeededParams(KindParams):
    seed: int = 0
    batch_size: BatchSize = 8


def test_it_fingerprints_the_generated_data_a_kind_read_when_given_no_dataset(tmp_path):
    from workers.probes import zoo

    def write(directory):
        (directory / "dataset.json").write_text('{"scenes": 3}')

    def reads_generated(model_dir, dataset_dir, params, *, device, progress):
        zoo.materialise(tmp_path / "generated", write)
        return suite.ProbeResult(kind="test.reads-generated", metrics={}, summary="ok")

    declare("test.reads-generated", reads_generated)
    try:
        result = suite.run("test.reads-generated", "model", None)
    finally:
        kinds.unregister("test.reads-generated")
    assert result.dataset_hash == suite.directory_fingerprint(str(tmp_path / "generated"))
    (tmp_path / "generated" / "dataset.json").write_text('{"scenes": 4}')
    assert result.dataset_hash != suite.directory_fingerprint(str(tmp_path / "generated"))


def test_it_fingerprints_examples_a_kind_generates_by_generator_parameters_and_seed():
    def generates(model_dir, dataset_dir, params, *, device, progress):
        return suite.ProbeResult(kind="test.generates", metrics={}, summary="ok", seed=params.seed)

    declare("test.generates", generates, SeededParams)
    try:
        first = suite.run("test.generates", "model", None, {"seed": 1}).dataset_hash
        again = suite.run("test.generates", "model", None, {"seed": 1, "batch_size": 2}).dataset_hash
        other = suite.run("test.generates", "model", None, {"seed": 2}).dataset_hash
    finally:
        kinds.unregister("test.generates")
    assert first is not None and re.fullmatch(r"[0-9a-f]{64}", first)
    assert first == again  # batch sizes change how examples are processed, not which
    assert other != first
