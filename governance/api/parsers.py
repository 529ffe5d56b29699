"""The API's JSON parser, with a nesting-depth limit.

Probe plans and parameters are free-form JSON; without a limit a body nested a few thousand levels
deep exhausts the interpreter's recursion limit wherever it is walked (validation, canonical JSON,
the audit log) and answers 500. The depth is checked once, here, iteratively.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser


def json_depth(value: object, limit: int) -> int:
    """The nesting depth of ``value`` (a scalar is 0), counting no further than ``limit + 1``."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        children: Iterable[object]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        stack.extend((child, depth) for child in children)
    return deepest


class DepthLimitedJSONParser(JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            data = None
            too_deep = True
        else:
            too_deep = False
        limit = settings.LOUPE_MAX_JSON_DEPTH
        if too_deep or json_depth(data, limit) > limit:
            raise ParseError(f"JSON parse error - the body is nested more than {limit} levels deep.")
        return data
