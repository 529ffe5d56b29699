"""``loupe-verify BUNDLE.zip [--trust-root ROOT.pem] [--json]``: verify a Loupe export bundle offline.

Exit status 0 when everything verifies, 1 when anything fails (each failure names the file), 2 on
usage errors. Needs no Django settings, database or network.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

# pyHanko imports DSA support, which cryptography flags as deprecated; it is not used here.
warnings.filterwarnings("ignore", message="DSA is deprecated")

from loupe_verify.bundle import load_pem_certs, verify_bundle  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loupe-verify", description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="the export bundle (zip) of a Loupe audit case")
    parser.add_argument("--trust-root", action="append", default=[],
                        help="trust this root certificate (PEM/DER) instead of the one shipped in the bundle")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    path = Path(args.bundle)
    if not path.is_file():
        parser.error(f"{path}: no such file")
    roots = None
    if args.trust_root:
        roots = [c for p in args.trust_root for c in load_pem_certs(Path(p).read_bytes())]
    result = verify_bundle(path.read_bytes(), roots)
    if args.json:
        print(json.dumps({"ok": result.ok, "checked": result.lines, "problems": result.problems}, indent=2))
    else:
        for line in result.lines:
            print(line)
        for problem in result.problems:
            print(f"FAIL: {problem}", file=sys.stderr)
        print(f"{path}: {'OK: the bundle verifies' if result.ok else f'FAILED ({len(result.problems)} problem(s))'}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
