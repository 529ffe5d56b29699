"""``python -m benchmarks NAME [options]``: run ``benchmarks/NAME.py``'s ``main``.

``python -m benchmarks`` alone runs every benchmark with its defaults; ``--list`` lists them. A benchmark is
added by dropping a module with a ``main(argv)`` function into this folder; nothing here needs to change.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def available() -> list[str]:
    here = Path(__file__).resolve().parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_"))


def main(argv: list[str]) -> int:
    names = available()
    if argv and argv[0] in {"-h", "--help", "--list"}:
        print("usage: python -m benchmarks [NAME [options]]\n\nbenchmarks: " + ", ".join(names))
        return 0
    if not argv:
        failed = [name for name in names if run(name, []) != 0]
        return 1 if failed else 0
    return run(argv[0], argv[1:])


def run(name: str, rest: list[str]) -> int:
    names = available()
    if name not in names:
        print(f"error: unknown benchmark {name!r}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"benchmarks.{name}")
    entry = getattr(module, "main", None)
    if entry is None:
        print(f"error: benchmarks/{name}.py has no main()", file=sys.stderr)
        return 2
    if inspect.signature(entry).parameters:
        return int(entry(rest) or 0)
    sys.argv = [f"benchmarks/{name}.py", *rest]  # a script-style main() that parses sys.argv
    return int(entry() or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
