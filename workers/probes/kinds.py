"""Probe kinds: the units of work an audit case plans and a worker runs, each declared once.

A kind is declared by the module that implements it, with :func:`probe_kind` on its run function::

    class Params(KindParams):
        epsilon: float = Field(0.03, gt=0, le=1, description="radius of the input perturbation")
        batch_size: BatchSize = 16

    @probe_kind("stability", title="Explanation stability", section="explain", params=Params,
                help="agreement between methods and their sensitivity to input noise",
                glossary={"rank_correlation": Metric("Spearman under noise", "...")})
    def stability_probe(model_dir, dataset_dir, params: Params, *, device, progress) -> ProbeResult: ...

Everything else about a kind derives from that declaration:

- the parameter check (:func:`parse_params`, one place, one wording), run by ``suite.run`` and by
  the case's plan validation (``governance.models.validate_probe_plan``);
- the OpenAPI schema of a case's ``probe_plan`` (``governance/api/plan_schema.py``);
- the command line (``workers/probes/cli.py``): one subcommand per kind, one option per parameter;
- the report section its evidence lands in and its title (``governance/reports/context.py``);
- the labels the review workspace and the report show for its metrics (:func:`glossary`).

The kind modules are listed in :data:`KIND_MODULES`; a listed module that cannot be imported is an
error, never skipped, so a renamed kind cannot silently drop out of audits. This module imports no
torch: the declarations are read by the web process too.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.probes.errors import ProbeInputError

if TYPE_CHECKING:
    from workers.probes.suite import ProbeResult

# Modules that declare probe kinds; a family adds its module here once.
KIND_MODULES: tuple[str, ...] = (
    "workers.probes.grounding_suite",
    "workers.probes.sanity",
    "workers.probes.stability",
    "workers.probes.tcav",
    "workers.probes.shortcut",
    "workers.probes.robustness",
    "workers.probes.token_attribution",
    "workers.probes.attention_stats",
    "workers.probes.interventions",
    "workers.probes.selftest",
    "workers.probes.groups",
    "workers.probes.patch_attack",
    "workers.probes.prompt_injection",
)

# Report sections a kind may name (their titles and legal requirements live with the report,
# governance/reports/context.py, which refuses a kind whose section it does not define).
# ``None`` marks a diagnostic kind whose evidence is listed in the test log only.
SectionKey = str | None


class KindParams(BaseModel):
    """Base of every kind's parameter schema: unknown keys are refused, types are not coerced
    ("8" is not 8, true is not 1), numbers must be finite, and an instance cannot be changed."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


@dataclass(frozen=True)
class Batch:
    """Marks a parameter that only sizes batches (memory, not results): ``suite.run`` plans it to
    fit a GPU's free memory (``memory.py``) and halves it when a GPU runs out of memory. Declare
    only parameters the results do not depend on. ``backward``: the passes it sizes are
    differentiated, so every layer's activations stay alive until the backward pass."""

    backward: bool = True


@dataclass(frozen=True)
class Flag:
    """How a parameter appears on the command line when its derived option would not do:
    ``name`` replaces ``--the-parameter``; ``negative`` names the switch that sets a boolean
    parameter whose default is true to false; ``hidden`` keeps it off the command line."""

    name: str | None = None
    negative: str | None = None
    hidden: bool = False


BATCH = Batch()
BatchSize = Annotated[int, Field(ge=1, description="items per forward pass: sizes memory, not results"), BATCH]
#: a batch size for passes that only score (no backward pass): planned with one layer's activations
ScoringBatchSize = Annotated[int, Field(ge=1, description="items per scoring forward pass: sizes memory, not "
                                                          "results"), Batch(backward=False)]
Seed = Annotated[int, Field(ge=0, description="seed of every random draw, so a run can be repeated")]
Limit = Annotated[int | None, Field(ge=1, description="use only the first N examples (default: all)")]


@dataclass(frozen=True)
class Metric:
    """A glossary entry for one metric: the label people read and a one-line meaning.
    ``limitation``: the report's Limitations section quotes this value (disagreement, instability)."""

    label: str
    meaning: str
    limitation: bool = False


@dataclass(frozen=True)
class DatasetArg:
    """What the kind's ``dataset_dir`` is, for the command line and the plan's ``dataset``."""

    help: str = "dataset folder (annotations.jsonl); default: the zoo's held-out split"
    flag: str = "--dataset"
    required: bool = False


@dataclass(frozen=True)
class KindSpec:
    """One probe kind, as its module declares it."""

    name: str
    title: str
    section: SectionKey
    help: str
    params: type[KindParams]
    run: Callable[..., ProbeResult]
    glossary: Mapping[str, Metric] = field(default_factory=dict)
    dataset: DatasetArg = DatasetArg()
    command: str = ""  # the CLI subcommand (default: the kind's name)
    present: Callable[[ProbeResult, Any], str] | None = None  # CLI text (default: the summary)
    as_json: Callable[[ProbeResult, Any], Any] | None = None  # CLI --json (default: the metrics)
    module: str = ""

    @property
    def batch_params(self) -> dict[str, int]:
        """The batch-sizing parameters with their defaults."""
        return {name: int(info.default) for name, info in self.params.model_fields.items()
                if any(isinstance(meta, Batch) for meta in info.metadata)}

    @property
    def batch_backward(self) -> dict[str, bool]:
        """Per batch-sizing parameter: whether the passes it sizes are differentiated."""
        return {name: meta.backward for name, info in self.params.model_fields.items()
                for meta in info.metadata if isinstance(meta, Batch)}


_KINDS: dict[str, KindSpec] = {}


def probe_kind(name: str, *, title: str, section: SectionKey, params: type[KindParams], help: str,
               glossary: Mapping[str, Metric] | None = None, dataset: DatasetArg | None = None,
               command: str | None = None,
               present: Callable[[ProbeResult, Any], str] | None = None,
               as_json: Callable[[ProbeResult, Any], Any] | None = None,
               ) -> Callable[[Callable[..., ProbeResult]], Callable[..., ProbeResult]]:
    """Declare the decorated function as probe kind ``name`` (see the module docstring).

    The function is called as ``fn(model_dir, dataset_dir, params, *, device, progress)`` with
    ``params`` an instance of ``params`` (already checked) and returns a ``ProbeResult``."""
    if not issubclass(params, KindParams):
        raise TypeError(f"probe kind {name!r}: params must subclass KindParams")

    def decorator(fn: Callable[..., ProbeResult]) -> Callable[..., ProbeResult]:
        existing = _KINDS.get(name)
        if existing is not None and existing.module != fn.__module__:
            raise ValueError(f"probe kind {name!r} is declared twice: {existing.module} and {fn.__module__}")
        _KINDS[name] = KindSpec(name=name, title=title, section=section, help=help, params=params, run=fn,
                                glossary=dict(glossary or {}), dataset=dataset or DatasetArg(),
                                command=command or name, present=present, as_json=as_json,
                                module=fn.__module__)
        return fn

    return decorator


def load_all() -> None:
    """Import every module in :data:`KIND_MODULES` (a missing one raises)."""
    for module in KIND_MODULES:
        importlib.import_module(module)


def all_kinds() -> list[KindSpec]:
    """Every declared kind, in the order of :data:`KIND_MODULES` (kinds declared elsewhere last)."""
    load_all()

    def order(spec: KindSpec) -> tuple[int, str]:
        return (KIND_MODULES.index(spec.module) if spec.module in KIND_MODULES else len(KIND_MODULES), spec.name)

    return sorted(_KINDS.values(), key=order)


def names() -> list[str]:
    return [spec.name for spec in all_kinds()]


def get(name: str) -> KindSpec:
    load_all()
    try:
        return _KINDS[name]
    except KeyError:
        raise ProbeInputError(f"unknown probe kind {name!r}; available: {', '.join(sorted(_KINDS))}") from None


def unregister(name: str) -> None:
    """Forget a kind declared outside :data:`KIND_MODULES` (tests declaring a toy kind)."""
    _KINDS.pop(name, None)


def parse_params(name: str, params: Mapping[str, Any] | None) -> KindParams:
    """``params`` checked against kind ``name``'s schema; raises ``ProbeInputError`` naming every
    offending parameter (``grounding: limit: input should be greater than or equal to 1 (got 0)``),
    in the same words for every kind, on the command line and in a plan."""
    spec = get(name)
    try:
        return spec.params.model_validate(dict(params or {}))
    except ValidationError as exc:
        raise ProbeInputError(f"{name}: " + "; ".join(describe_errors(exc))) from None


def param_problems(name: str, params: Mapping[str, Any]) -> list[str]:
    """What is wrong with ``params`` for kind ``name``, one ``parameter: problem`` line each."""
    try:
        get(name).params.model_validate(dict(params))
    except ValidationError as exc:
        return describe_errors(exc)
    return []


def describe_errors(exc: ValidationError) -> list[str]:
    """One line per problem: ``parameter: what is wrong (got value)``."""
    lines = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "params"
        if error["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown parameter")
        elif error["type"] == "missing":
            lines.append(f"{where}: required")
        else:
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {message[:1].lower()}{message[1:]} (got {error.get('input')!r})")
    return lines


def params_json_schema(name: str) -> dict[str, Any]:
    """The JSON Schema of kind ``name``'s parameters (as the OpenAPI document shows it)."""
    return get(name).params.model_json_schema()


def glossary(kind: str | None = None) -> dict[str, dict[str, Metric]]:
    """``{kind: {metric key: Metric}}`` for every kind (or only ``kind``): the labels and meanings
    the review workspace and the report show next to a kind's metrics."""
    specs = [get(kind)] if kind is not None else all_kinds()
    return {spec.name: dict(spec.glossary) for spec in specs}


def label(kind: str, metric: str) -> str:
    """The human label of ``metric`` (a key or a dotted path; its last part is looked up) for
    ``kind``; the key itself when the kind declares no entry for it."""
    entries = glossary(kind)[kind] if kind in _known() else {}
    entry = entries.get(metric) or entries.get(metric.rsplit(".", 1)[-1])
    return entry.label if entry else metric


def _known() -> set[str]:
    load_all()
    return set(_KINDS)

