"""Probe kinds are declared once (workers/probes/kinds.py); everything else derives from that.

The toy kind below lives in one module of its own, written by the test, and nothing else is
touched: it must show up in the command line, the plan validation, the OpenAPI schema and the
report.
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import pytest
from django.core.exceptions import ValidationError

from workers.probes import kinds

TOY_MODULE = '''
from pydantic import Field

from workers.probes.kinds import BatchSize, KindParams, Metric, probe_kind
from workers.probes.suite import ProbeResult


class ToyParams(KindParams):
    strength: int = Field(3, ge=1, le=10, description="how hard the toy pokes the model")
    batch_size: BatchSize = 4


@probe_kind("toy", title="Toy probe", section="bias", params=ToyParams, help="poke the model gently",
            glossary={"wobble": Metric("Wobble", "how much the model wobbles when poked", limitation=True)})
def toy(model_dir, dataset_dir, params, *, device, progress):
    return ProbeResult(kind="toy", metrics={"wobble": params.strength / 10, "poked": params.strength},
                       summary=f"poked {params.strength} times")
'''


@pytest.fixture
def toy_kind(tmp_path, monkeypatch):
    (tmp_path / "loupe_toy_kind.py").write_text(textwrap.dedent(TOY_MODULE), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.import_module("loupe_toy_kind")
    yield "toy"
    kinds.unregister("toy")
    sys.modules.pop("loupe_toy_kind", None)


def test_a_new_kind_shows_up_on_the_command_line(toy_kind, capsys, tmp_path):
    from workers.probes.cli import build_parser, main

    assert "toy" in build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert main(["toy", "--model", str(tmp_path), "--strength", "7", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out) == {"wobble": 0.7, "poked": 7}
    # the limits of the declaration, in the same words as a plan gets them
    assert main(["toy", "--model", str(tmp_path), "--strength", "11", "--no-progress"]) == 2
    assert "toy: strength: input should be less than or equal to 10 (got 11)" in capsys.readouterr().err


def test_a_new_kind_is_checked_in_plans(toy_kind):
    from governance.models import validate_probe_plan

    validate_probe_plan([{"kind": "toy", "params": {"strength": 2}}])
    with pytest.raises(ValidationError) as caught:
        validate_probe_plan([{"kind": "toy", "params": {"strength": 0, "force": 1}}])
    assert caught.value.messages == [
        "probe_plan[0].params.strength: input should be greater than or equal to 1 (got 0)",
        "probe_plan[0].params.force: unknown parameter"]


def test_a_new_kind_is_in_the_openapi_schema(toy_kind):
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    plan = schema["components"]["schemas"]["AuditCase"]["properties"]["probe_plan"]
    (toy,) = [item for item in plan["items"]["oneOf"] if item["properties"]["kind"]["enum"] == ["toy"]]
    strength = toy["properties"]["params"]["properties"]["strength"]
    assert (strength["minimum"], strength["maximum"], strength["default"]) == (1, 10, 3)
    assert toy["properties"]["params"]["additionalProperties"] is False


def test_a_new_kind_lands_in_the_report_section_it_declares(toy_kind):
    from governance.reports import context

    assert [spec.name for spec in context.section_kinds()["bias"]][-1] == "toy"
    assert context.kind_titles()["toy"] == "Toy probe"
    from governance import glossary

    assert (glossary.label("wobble", "toy"), glossary.meaning("wobble", "toy")) == (
        "Wobble", "How much the model wobbles when poked")
    evidence = [{"id": 1, "kind": "toy", "metrics": {"wobble": 0.25, "poked": 3}}]
    limits = context.limitations(evidence, [])
    # The report names the measure and the kind in words, never by their keys.
    assert limits["measured"] == [{"evidence": 1, "kind": "Toy probe", "metric": "Wobble",
                                   "meaning": "How much the model wobbles when poked", "value": "0.25"}]
    assert not any("toy probe" in gap for gap in limits["gaps"])
    assert kinds.glossary("toy") == {"toy": {"wobble": kinds.Metric("Wobble", "how much the model wobbles when poked",
                                                                    limitation=True)}}
    assert kinds.label("toy", "wobble") == "Wobble"


def test_every_kind_lands_in_a_report_section():
    from governance.reports import context

    shipped = {spec.name: spec for spec in kinds.all_kinds() if spec.module in kinds.KIND_MODULES}
    placed = {spec.name for specs in context.section_kinds().values() for spec in specs}
    assert {name for name, spec in shipped.items() if spec.section is None} == {"selftest"}
    assert set(shipped) - placed == {"selftest"}
    assert "stability" in {spec.name for spec in context.section_kinds()["explain"]}


def test_a_kind_naming_a_section_the_report_lacks_is_refused(toy_kind, monkeypatch):
    from governance.reports import context

    spec = kinds.get("toy")
    monkeypatch.setitem(kinds._KINDS, "toy", kinds.KindSpec(**{**spec.__dict__, "section": "no-such-section"}))
    with pytest.raises(ValueError, match="'toy' declares report section 'no-such-section'"):
        context.section_kinds()


def test_a_missing_kind_module_is_an_error(monkeypatch):
    monkeypatch.setattr(kinds, "KIND_MODULES", (*kinds.KIND_MODULES, "workers.probes.no_such_kind"))
    with pytest.raises(ModuleNotFoundError, match="no_such_kind"):
        kinds.names()


def test_a_kind_cannot_be_declared_twice(toy_kind):
    with pytest.raises(ValueError, match="declared twice"):
        kinds.probe_kind("grounding", title="x", section=None, params=kinds.KindParams, help="x")(lambda *a, **k: None)


def test_parameters_are_checked_in_one_wording_for_every_kind():
    from workers.probes.errors import ProbeInputError

    for spec in kinds.all_kinds():
        if spec.module not in kinds.KIND_MODULES:
            continue  # kinds that tests declare
        with pytest.raises(ProbeInputError, match=f"^{spec.name}: .*no_such_parameter: unknown parameter"):
            kinds.parse_params(spec.name, {"no_such_parameter": 1})
    with pytest.raises(ProbeInputError, match=r"^stability: epsilon: input should be greater than 0 \(got -0.1\)$"):
        kinds.parse_params("stability", {"epsilon": -0.1})
    with pytest.raises(ProbeInputError, match=r"^sanity: method: needs one method name \(got 'all'\)$"):
        kinds.parse_params("sanity", {"method": "all"})
