"""The one resolver for model and dataset references in a probe plan.

A plan is user input; every place that turns one of its references into a directory a worker reads
(the plan's ``dataset``, ``params.inputs``, ``params.compare_models``, anything declared in
:data:`PATH_PARAMS` later) goes through here, at start and again on the worker:

- ``zoo:<name>`` only for names in a closed list (:data:`ZOO_MODELS`, :data:`ZOO_DATASETS`): the name
  is never joined to a path, so ``zoo:/abs`` or ``zoo:../..`` cannot point anywhere;
- anything else must be a directory below the configured roots (``LOUPE_MODEL_ROOTS``,
  ``LOUPE_DATASET_ROOTS``) *after* symbolic links are resolved;
- a reference that does not exist and one the user may not use get the same answer
  (:func:`unavailable`), so a plan cannot probe the server's file system.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings

#: The committed reference checkpoints (``workers/probes/zoo/checkpoints``); a test keeps it in step.
ZOO_MODELS: tuple[str, ...] = ("clean-clip", "shortcut-clip", "tiny-clip", "tiny-idefics3", "tiny-llava",
                               "tiny-llava-reader", "tiny-mllama", "tiny-siglip")
#: The synthetic world's splits (``workers.probes.zoo.SPLITS``, ``zoo.group_split``) and the shortcut
#: zoo's concept folders.
ZOO_DATASETS: tuple[str, ...] = ("heldout", "validation", "crowded", "heldout-decoys", "groups", "groups-control",
                                 "shortcut-concepts")

#: Probe parameters that name server directories, and what they name.
PATH_PARAMS: dict[str, str] = {"inputs": "dataset", "compare_models": "models"}


class ReferenceUnavailable(Exception):
    """A plan reference the server will not use (the pipeline answers it as its ``PipelineError``)."""


def _error_class():
    return ReferenceUnavailable


def unavailable(what: str, reference: object) -> Exception:
    """The single answer for a reference that is missing, forbidden or malformed."""
    roots = "LOUPE_MODEL_ROOTS" if what == "model" else "LOUPE_DATASET_ROOTS"
    names = ZOO_MODELS if what == "model" else ZOO_DATASETS
    return _error_class()(
        f"{what} reference {reference!r} is not available: use one of zoo:{', zoo:'.join(names)} or a "
        f"directory below {roots}")


def model_roots() -> list[Path]:
    return [Path(r).resolve() for r in settings.LOUPE_MODEL_ROOTS]


def dataset_roots() -> list[Path]:
    return [Path(r).resolve() for r in settings.LOUPE_DATASET_ROOTS]


def _below_roots(reference: str, roots: list[Path], what: str, *, marker: str | None = None) -> str:
    try:
        path = Path(reference).resolve()
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL byte
        raise unavailable(what, reference) from None
    if not path.is_absolute() or not any(path.is_relative_to(root) for root in roots) or not path.is_dir():
        raise unavailable(what, reference)
    if marker is not None and not (path / marker).is_file():
        raise unavailable(what, reference)
    return str(path)


def resolve_dataset(reference: str | None) -> str | None:
    """A plan's dataset (or ``params.inputs``) -> a local directory; ``None``/empty: the kind's default."""
    if not reference:
        return None
    if not isinstance(reference, str):
        raise unavailable("dataset", reference)
    if reference.startswith("zoo:"):
        name = reference.removeprefix("zoo:")
        if name not in ZOO_DATASETS:
            raise unavailable("dataset", reference)
        if name == "shortcut-concepts":
            from workers.probes.zoo import shortcut

            return str(shortcut.probe_data() / "concepts")
        from workers.probes import zoo
        from workers.probes.errors import ProbeInputError

        try:
            return str(zoo.dataset_dir(name))
        except ProbeInputError as exc:
            raise _error_class()(str(exc)) from exc
    return _below_roots(reference, dataset_roots(), "dataset")


def resolve_model(reference: str) -> str:
    """``zoo:<checkpoint>`` or a model directory (with ``config.json``) below ``LOUPE_MODEL_ROOTS``."""
    if not isinstance(reference, str) or not reference:
        raise unavailable("model", reference)
    if reference.startswith("zoo:"):
        name = reference.removeprefix("zoo:")
        if name not in ZOO_MODELS:
            raise unavailable("model", reference)
        from workers.probes import zoo
        from workers.probes.errors import ProbeInputError

        try:
            return str(zoo.checkpoint_path(name))  # verifies the committed checksums
        except ProbeInputError as exc:
            raise _error_class()(str(exc)) from exc
    return _below_roots(reference, model_roots(), "model", marker="config.json")


def _mentions_zoo(value: Any) -> bool:
    if isinstance(value, str):
        return value.startswith("zoo:")
    if isinstance(value, list):
        return any(_mentions_zoo(v) for v in value)
    if isinstance(value, dict):
        return any(_mentions_zoo(v) for v in value.values())
    return False


def resolve_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of a plan item's ``params`` with every reference resolved and confined. A ``zoo:``
    reference in a parameter not declared in :data:`PATH_PARAMS` is refused: a new parameter that
    names models or datasets must be declared here, not passed to a probe unresolved."""
    resolved = dict(params or {})
    for key, value in resolved.items():
        if key not in PATH_PARAMS and _mentions_zoo(value):
            raise _error_class()(f"params.{key}: model and dataset references are only accepted in "
                                 f"{', '.join(sorted(PATH_PARAMS))}")
    for key, kind in PATH_PARAMS.items():
        if resolved.get(key) is None:
            continue
        value = resolved[key]
        if kind == "dataset":
            resolved[key] = resolve_dataset(value) if isinstance(value, str) else _raise(unavailable("dataset", value))
        else:
            if not isinstance(value, list):
                raise _error_class()(f"params.{key}: expected a list of model references")
            resolved[key] = [resolve_model(v) for v in value]
    return resolved


def _raise(exc: Exception):
    raise exc
