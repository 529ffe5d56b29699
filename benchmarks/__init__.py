"""Loupe's benchmarks: performance as ratios against peers measured in the same run.

Each benchmark is a module ``benchmarks/<name>.py`` with ``main(argv: list[str] | None) -> int``;
run it with ``python -m benchmarks <name> [options]`` (see ``benchmarks/README.md``).
"""
