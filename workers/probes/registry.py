"""Grounding methods by name. A method is added in one place: its module, decorated with
``@register("name")``, and its module name in ``METHOD_MODULES``.

Contract of a method::

    method(adapter: DualEncoderAdapter, pixel_values: Tensor[B, 3, S, S], prompts: list[str], **params)
        -> Tensor[B, gh, gw]  (float32, on CPU; higher = more relevant to image b matching prompt b)

Upsampling to image resolution, normalisation and scoring happen elsewhere (``faithfulness``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

GroundingMethod = Callable[..., torch.Tensor]

METHOD_MODULES = ["chefer", "gradcam", "rollout", "flow", "occlusion"]

_METHODS: dict[str, GroundingMethod] = {}


def register(name: str) -> Callable[[GroundingMethod], GroundingMethod]:
    def decorator(fn: GroundingMethod) -> GroundingMethod:
        _METHODS[name] = fn
        return fn

    return decorator


def _load_all() -> None:
    """Import every method module; a listed module that is missing raises, so a renamed method
    cannot silently drop out of an evaluation."""
    for module in METHOD_MODULES:
        importlib.import_module(f"workers.probes.{module}")


def available() -> list[str]:
    _load_all()
    return [name for name in METHOD_MODULES if name in _METHODS] + sorted(set(_METHODS) - set(METHOD_MODULES))


def get(name: str) -> GroundingMethod:
    _load_all()
    try:
        return _METHODS[name]
    except KeyError:
        from workers.probes.errors import ProbeInputError

        raise ProbeInputError(f"unknown method {name!r}; available: {', '.join(available())}") from None
