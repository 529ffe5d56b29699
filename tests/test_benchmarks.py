"""The benchmarks still run and still compare like with like.

Actor: a maintainer who quotes a ratio from ``benchmarks/``. A ratio is only worth quoting if both
sides computed the same thing, so every benchmark checks its implementations against each other
(``max_abs_diff``). These tests run the benchmarks at their smallest size and read that check; they
assert nothing about speed (timings belong in the benchmark's output, not in a test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(*args: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout[done.stdout.index("{"):])


def test_it_runs_the_token_attribution_benchmark_with_every_variant_agreeing():
    out = run_benchmark("benchmarks/token_attribution.py", "--images", "1", "--repeats", "1")
    # the traced generation, the teacher-forced path and the naive recomputation give the same relevance
    assert out["max_abs_diff_vs_naive"] < 1e-5
    for variant in ("generation", "loupe", "teacher-forced", "teacher-forced-loop", "naive"):
        assert out[variant]["median_s"] > 0, variant
    assert out["loupe"]["attribution_s"] < out["loupe"]["median_s"]
    assert {"speedup_vs_naive", "speedup_end_to_end", "attribution_tokens_per_s"} <= set(out)


def test_it_runs_the_batched_chefer_benchmark_against_the_per_image_loop(tmp_path):
    out = run_benchmark("-m", "benchmarks", "grounding", "--only", "chefer", "--batch", "4", "--repeats", "1",
                        "--json", str(tmp_path / "grounding.json"))
    assert out["chefer"]["batch"] == 4 and out["chefer"]["max_abs_diff"] < 1e-5
    assert json.loads((tmp_path / "grounding.json").read_text())["chefer"]["batch"] == 4
    ceiling = out["chefer"]["ceiling"]
    # the zoo tiny-clip (or its same-size random stand-in) multiplies matrices in every layer
    assert ceiling["matmul_mflop_per_image"] > 1 and ceiling["dense_matmul_gflops"] > 0
    assert ceiling["max_speedup"] > 0


def test_it_bounds_the_batching_ratio_by_the_arithmetic_left_per_image():
    from benchmarks.grounding import chefer_ceiling

    # 100 MFLOP per image at 100 GFLOP/s is 1 ms per image at best: a 5 ms loop can be beaten 5x at most,
    # and a 2 ms batched call runs at half the dense rate
    c = chefer_ceiling(100e6, 100e9, batched_s=0.002, loop_s=0.005)
    assert abs(c["floor_ms_per_image"] - 1.0) < 1e-9
    assert abs(c["max_speedup"] - 5.0) < 1e-9
    assert abs(c["batched_share_of_dense_rate"] - 0.5) < 1e-9
    assert abs(c["batched_gflops"] - 50.0) < 1e-9
