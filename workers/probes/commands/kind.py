"""The command of a probe kind, derived from the kind's declaration (``workers/probes/kinds.py``).

Every parameter of the kind's schema becomes an option: ``batch_size`` -> ``--batch-size``, with
the schema's description and default as help. Booleans are switches (``--name`` when the default
is false, ``--no-name`` when it is true), lists of text repeat their option, lists of numbers are
comma-separated, a parameter whose declaration says ``Flag(hidden=True)`` (a nested object) is left
to plans. Options the user does not give are not passed, so the schema's defaults apply, and every
value is checked by the schema, in the same words as a plan's.
"""

from __future__ import annotations

import argparse
import functools
import json
import types
import typing
from typing import Any

from pydantic.fields import FieldInfo

from workers.probes.commands import common
from workers.probes.kinds import Flag, KindSpec


def configure(parser: argparse.ArgumentParser, spec: KindSpec) -> None:
    common.add_model_arguments(parser)
    parser.add_argument(spec.dataset.flag, dest="dataset", required=spec.dataset.required, help=spec.dataset.help)
    for name, info in spec.params.model_fields.items():
        add_param(parser, name, info)
    common.add_output_arguments(parser)
    parser.set_defaults(_run=functools.partial(run, spec))


def _flag(info: FieldInfo) -> Flag:
    return next((meta for meta in info.metadata if isinstance(meta, Flag)), Flag())


def _unwrap(annotation: Any) -> tuple[Any, tuple[Any, ...]]:
    """``X | None`` -> ``X``; returns (origin, args) of what remains."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _unwrap(rest[0])
        return typing.Union, tuple(rest)
    if origin is typing.Annotated:
        return _unwrap(args[0])
    return (origin or annotation), args


def _comma_separated(kind: type) -> Any:
    def parse(text: str) -> list[Any]:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"comma-separated {kind.__name__} values, got {text!r}") from None

    return parse


def add_param(parser: argparse.ArgumentParser, name: str, info: FieldInfo) -> None:
    """One option for parameter ``name`` (see the module docstring)."""
    flag = _flag(info)
    if flag.hidden:
        return
    option = flag.name or "--" + name.replace("_", "-")
    dest = f"param_{name}"
    text = info.description or ""
    origin, args = _unwrap(info.annotation)
    common_kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS}
    if origin is bool:
        if info.default is True:
            parser.add_argument(flag.negative or f"--no-{name.replace('_', '-')}", action="store_false",
                                help=f"do not: {text}" if text else None, **common_kwargs)
        else:
            parser.add_argument(option, action="store_true", help=text or None, **common_kwargs)
        return
    if origin is dict:
        return
    common_kwargs["metavar"] = name.upper()
    if info.is_required():
        common_kwargs.update(default=None, required=True)
        shown = ""
    else:
        default = info.get_default(call_default_factory=True)
        shown = "" if default in (None, [], {}) else f" (default {default})"
    if origin is list:
        (item,) = args or (str,)
        item_origin, _ = _unwrap(item)
        if item_origin in (int, float):
            parser.add_argument(option, type=_comma_separated(item_origin), help=f"{text}, comma-separated{shown}",
                                **common_kwargs)
        else:
            parser.add_argument(option, action="append", help=f"{text} (repeatable){shown}", **common_kwargs)
        return
    if origin is typing.Literal:
        common_kwargs.pop("metavar")
        parser.add_argument(option, choices=list(args), type=type(args[0]), help=f"{text}{shown}", **common_kwargs)
        return
    kind = origin if origin in (int, float) else str
    parser.add_argument(option, type=kind, help=f"{text}{shown}", **common_kwargs)


def params_from(args: argparse.Namespace, spec: KindSpec) -> dict[str, Any]:
    """The parameters given on the command line, under their schema names."""
    return {name: getattr(args, f"param_{name}") for name in spec.params.model_fields
            if hasattr(args, f"param_{name}")}


def run(spec: KindSpec, args: argparse.Namespace) -> int:
    from workers.probes import kinds, suite
    from workers.probes.progress import TqdmProgress

    params = params_from(args, spec)
    checked = kinds.parse_params(spec.name, params)  # bad values fail here, before a model loads
    with TqdmProgress(spec.command, enabled=not args.no_progress) as progress:
        result = suite.run(spec.name, args.model, args.dataset, params, device=args.device, progress=progress)
    common.write_figures(result, args.figures)
    if args.json:
        print(json.dumps(spec.as_json(result, checked) if spec.as_json else result.metrics))
    else:
        print(spec.present(result, checked) if spec.present else result.summary)
    return 0
