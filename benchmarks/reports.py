"""Report rendering: a 40-figure, 30+-page audit report, end to end, on CPU.

Measures :func:`governance.reports.render_case` (manifest from the database, summary figures with
matplotlib, Django template, WeasyPrint layout, PDF/A-3b with the embedded manifest, deterministic
font subsetting) on a case with every probe kind and ``--figures`` stored heatmap figures per
evidence item. Target: median under 5 s.

Peer, measured in the same run: WeasyPrint alone writing the *same* HTML as a plain PDF with its
default fetcher already primed (no PDF/A, no manifest, no summary figures, no database), i.e. the
floor this pipeline can reach; the ratio is our overhead over it.

Medians of wall time and of process CPU time are both printed: on a shared, oversubscribed machine
(check the printed load average) wall time overstates what the render costs.

Uses a throw-away SQLite database and media directory. Prints a table and one JSON object::

    python -m benchmarks reports [--figures 5] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _setup_django(workdir: Path) -> None:
    os.environ["DATABASE_URL"] = f"sqlite:///{workdir / 'bench.sqlite3'}"
    os.environ["LOUPE_STORAGE_ROOT"] = str(workdir / "media")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "governance.settings")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks reports", description=__doc__.split("\n")[0])
    parser.add_argument("--figures", type=int, default=5, help="stored figures per evidence item (8 items)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="loupe-bench-reports-") as tmp:
        _setup_django(Path(tmp))
        from weasyprint import HTML

        from governance.reports import context as ctx
        from governance.reports import manifest as mf
        from governance.reports import render_case
        from governance.reports.render import render_html
        from governance.reports.url_fetcher import SafeURLFetcher
        from tests.report_fixtures import ALL_KINDS, make_standalone_case

        case = make_standalone_case(kinds=ALL_KINDS, figures_per_evidence=args.figures)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        ours, ours_cpu, digests, pages, figures = [], [], set(), 0, 0
        for _ in range(args.repeats):
            start, cpu = time.perf_counter(), time.process_time()
            rendered, manifest = render_case(case, version=1)
            ours.append(time.perf_counter() - start)
            ours_cpu.append(time.process_time() - cpu)
            digests.add(hashlib.sha256(rendered.pdf).hexdigest())
            pages = rendered.pages

        # The peer: the same HTML, WeasyPrint only, plain PDF.
        manifest = mf.build_manifest(case, version=1)
        files = {a["id"]: a for e in manifest["evidence"] for a in e["artifacts"]}
        from governance.models import EvidenceArtifact

        blobs = {a.pk: a.file.open("rb").read() for a in EvidenceArtifact.objects.filter(pk__in=list(files))}
        context, inputs = ctx.build_context(manifest, manifest_sha256=mf.manifest_sha256(manifest),
                                            report={"version": 1, "supersedes": None, "changelog": []},
                                            load_artifact=lambda entry: (blobs[entry["id"]], entry["content_type"]))
        figures = sum(len(e["figures"]) for e in context["evidence"])
        html = render_html(context)
        peer, peer_cpu = [], []
        for _ in range(args.repeats):
            fetcher = SafeURLFetcher(artifacts=inputs.artifacts)
            start, cpu = time.perf_counter(), time.process_time()
            HTML(string=html, base_url="loupe://report/", url_fetcher=fetcher).write_pdf()
            peer.append(time.perf_counter() - start)
            peer_cpu.append(time.process_time() - cpu)
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024

    result = {
        "benchmark": "reports", "figures": figures, "pages": pages, "repeats": args.repeats,
        "median_s": round(statistics.median(ours), 3), "runs_s": [round(t, 3) for t in ours],
        "cpu_median_s": round(statistics.median(ours_cpu), 3),
        "peer_weasyprint_plain_median_s": round(statistics.median(peer), 3),
        "peer_cpu_median_s": round(statistics.median(peer_cpu), 3),
        "ratio_vs_peer": round(statistics.median(ours) / statistics.median(peer), 2),
        "target_s": 5.0, "meets_target": statistics.median(ours) < 5.0,
        "deterministic": len(digests) == 1, "peak_rss_increase_mib": round(peak_mib, 1),
        "load_average_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
    }
    print(f"{'what':<40}{'wall s':>9}{'CPU s':>9}")
    print(f"{'render_case (ours, PDF/A-3b)':<40}{result['median_s']:>9.3f}{result['cpu_median_s']:>9.3f}")
    print(f"{'WeasyPrint plain PDF, same HTML (peer)':<40}{result['peer_weasyprint_plain_median_s']:>9.3f}"
          f"{result['peer_cpu_median_s']:>9.3f}")
    print(f"figures={figures} pages={pages} deterministic={result['deterministic']} "
          f"load={result['load_average_1m']} on {result['cpus']} CPUs")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
