"""Attack 3 (issue #20): model and dataset references in a plan must not escape the configured roots.

``zoo:`` names come from a closed list; directories are accepted only below the roots after links
are resolved; a forbidden directory and a missing one get the same answer, so a plan cannot be used
to probe the server's file system.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from governance import pipeline, references
from tests.model_archives import write_tiny_hf_model


@pytest.fixture
def roots(tmp_path, settings, monkeypatch):
    models, datasets = tmp_path / "models", tmp_path / "datasets"
    models.mkdir()
    datasets.mkdir()
    settings.LOUPE_MODEL_ROOTS = [str(models)]
    settings.LOUPE_DATASET_ROOTS = [str(datasets)]
    monkeypatch.setenv("LOUPE_DATASET_ROOTS", str(datasets))
    return models, datasets


def verified_model_outside(tmp_path: Path) -> Path:
    """Another organisation's model: config.json and a verifying SHA256SUMS, outside every root."""
    import hashlib

    directory = write_tiny_hf_model(tmp_path / "elsewhere" / "globex-model")
    sums = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
                   for p in sorted(directory.iterdir()) if p.is_file())
    (directory / "SHA256SUMS").write_text(sums)
    return directory


def error_of(call, *args) -> str:
    with pytest.raises(pipeline.PipelineError) as caught:
        call(*args)
    return str(caught.value)


@pytest.mark.parametrize("form", ["zoo:{abs}", "zoo:../../../../../../..{abs}", "{abs}", "zoo:{rel_up}"])
def test_a_model_reference_cannot_leave_the_model_roots(form, roots, tmp_path):
    outside = verified_model_outside(tmp_path)
    from workers.probes import zoo

    rel_up = Path("..") / ".." / ".." / ".."
    reference = form.format(abs=outside, rel_up=str(rel_up) + str(outside))
    with pytest.raises(pipeline.PipelineError):
        pipeline.resolve_params({"compare_models": [reference]})
    with pytest.raises(pipeline.PipelineError):
        pipeline.resolve_model_reference(reference)
    assert zoo.CHECKPOINT_ROOT.exists()


def test_a_link_inside_a_root_is_followed_before_the_check(roots, tmp_path):
    models, datasets = roots
    outside = verified_model_outside(tmp_path)
    (models / "innocent").symlink_to(outside, target_is_directory=True)
    (datasets / "innocent").symlink_to(outside, target_is_directory=True)
    with pytest.raises(pipeline.PipelineError):
        pipeline.resolve_model_reference(str(models / "innocent"))
    with pytest.raises(pipeline.PipelineError):
        pipeline.resolve_dataset(str(datasets / "innocent"))


@pytest.mark.parametrize("key", ["dataset", "inputs", "compare_models"])
def test_missing_and_forbidden_references_answer_identically(key, roots, tmp_path):
    models, datasets = roots
    outside = verified_model_outside(tmp_path)
    root = models if key == "compare_models" else datasets

    def answer(reference: str) -> str:
        if key == "dataset":
            message = error_of(pipeline.resolve_dataset, reference)
        else:
            value = [reference] if key == "compare_models" else reference
            message = error_of(pipeline.resolve_params, {key: value})
        return message.replace(reference, "<ref>")

    forbidden = [str(outside), f"zoo:{outside}", str(root / ".." / "elsewhere" / "globex-model"),
                 "zoo:../../elsewhere/globex-model"]
    missing = [str(tmp_path / "no-such-dir"), "zoo:no-such-name", str(root / "no-such-dir")]
    answers = {answer(r) for r in forbidden + missing}
    assert len(answers) == 1, answers
    assert str(tmp_path) not in answers.pop()


def test_zoo_names_come_from_a_closed_list_that_matches_the_committed_zoo():
    from workers.probes import zoo
    from workers.probes.zoo import group_split

    committed = sorted(p.name for p in zoo.CHECKPOINT_ROOT.iterdir() if (p / "config.json").is_file())
    assert sorted(references.ZOO_MODELS) == committed
    assert set(references.ZOO_DATASETS) == {*zoo.SPLITS, *group_split.GROUP_SPLITS, "shortcut-concepts"}
    assert pipeline.resolve_model_reference("zoo:tiny-clip") == str(zoo.checkpoint_path("tiny-clip"))


def test_a_directory_below_a_root_is_accepted(roots):
    models, datasets = roots
    model = write_tiny_hf_model(models / "acme")
    (datasets / "photos").mkdir()
    assert pipeline.resolve_model_reference(str(model)) == str(model.resolve())
    assert pipeline.resolve_dataset(str(datasets / "photos")) == str((datasets / "photos").resolve())


def test_a_zoo_reference_in_an_undeclared_parameter_is_refused(roots):
    """A parameter added later that names a model or dataset must go through the resolver: an
    undeclared parameter holding a ``zoo:`` or path reference is refused rather than passed on."""
    with pytest.raises(pipeline.PipelineError):
        pipeline.resolve_params({"reference_model": "zoo:/etc"})
    assert pipeline.resolve_params({"limit": 3, "prompts": ["a red circle"]}) == {"limit": 3,
                                                                                    "prompts": ["a red circle"]}


@pytest.mark.django_db
def test_starting_a_case_with_an_escaping_reference_is_refused_with_the_common_answer(
        roots, tmp_path, alice, draft_case, ada, rita, rob):
    from rest_framework.test import APIClient

    from governance import workflow

    outside = verified_model_outside(tmp_path)
    draft_case.probe_plan = [{"kind": draft_case.probe_plan[0]["kind"],
                              "params": {"compare_models": [f"zoo:{outside}"]}}]
    draft_case.save()
    workflow.assign_reviewers(draft_case, [rita, rob], by=ada)
    workflow.submit(draft_case, by=alice)
    client = APIClient()
    client.force_authenticate(alice)
    response = client.post(f"/api/cases/{draft_case.pk}/start/")
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["error"] == "cannot_start"
    assert str(outside) not in json.dumps(body).replace(f"zoo:{outside}", "")
    draft_case.refresh_from_db()
    assert draft_case.state == "submitted" and not draft_case.runs.exists()
