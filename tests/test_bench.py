"""The benchmark code runs end to end on a tiny shape so it cannot rot (no timing assertions)."""

import json
import math
import re

import pytest

bench_run = pytest.importorskip("bench.run")
bench_mc = pytest.importorskip("bench.mc_variance")


def test_bench_run_tiny(tmp_path):
    result = bench_run.main(["--shapes", "3x5x7", "--reps", "2", "--warmup", "1", "--out", str(tmp_path),
                             "--name", "tiny", "--providers", "reference-eager,cpp,mc-reparam-1,gemm-limit",
                             "--markdown", str(tmp_path / "table.md")])
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert saved["environment"]["torch_threads"] >= 1
    providers = {r["provider"] for r in saved["records"]}
    assert {"reference-eager", "mc-reparam-1", "gemm-limit"} <= providers
    # (4 heads with Gaussian latents + 3 with Bernoulli: no exact log term for them; categorical
    # latents need d divisible by 10) x 3 modes per provider that ran, each with 2 samples
    per_provider = [r for r in saved["records"] if r["provider"] == "reference-eager"]
    assert len(per_provider) == 21 and all(len(r["samples_s"]) == 2 for r in per_provider)
    skipped = {(s["problem"], s["provider"]) for s in saved["skipped"]}
    assert ("B=3 d=5 k=7 bernoulli/logvar float32", "gemm-limit") in skipped   # not GEMM-shaped
    eager = next(r for r in result["records"] if r["provider"] == "reference-eager")
    assert eager["speedup_vs_eager"] == pytest.approx(1.0)
    assert eager["peak_extra_bytes_fwd_bwd"] > 0
    assert "| problem | provider |" in (tmp_path / "table.md").read_text()


def test_bench_rejects_unknown_provider():
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--providers", "nope"])


def test_mc_variance_tiny(tmp_path):
    results = bench_mc.main(["--shape", "4x3x6", "--samples", "1,4", "--repeats", "3", "--out", str(tmp_path)])
    assert (tmp_path / "mc_variance.png").stat().st_size > 0
    for res in results:
        se = [r["relative_standard_error"] for r in res["mc"]]
        assert all(math.isfinite(v) and v > 0 for v in se)
        assert res["analytic_relative_standard_error"] == 0.0


def test_paired_timing_prints_a_ratio(capsys):
    from bench import paired
    assert paired.main(["--a", "precision", "--b", "precision-exact", "--provider", "reference-eager",
                        "--shape", "4x6x10", "--reps", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "precision-exact (reference-eager) / precision (reference-eager) = " in out and "2 interleaved pairs" in out
    # one head, two providers: the kernel against its GEMM floor
    assert paired.main(["--a", "fixed", "--b", "fixed", "--provider", "reference-eager", "--provider-b", "gemm-limit",
                        "--shape", "4x6x10", "--reps", "2", "--threads", "1"]) == 0
    assert "fixed (gemm-limit) / fixed (reference-eager) = " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        paired.main(["--a", "fixed", "--b", "fixed", "--shape", "4x6x10"])


def test_overhead_splits_the_fixed_head_time(capsys):
    from silent_kernels.backends import available
    if not available("cpp"):
        pytest.skip("the cpp backend is not built")
    from bench import overhead
    assert overhead.main(["--shape", "4x6x10", "--reps", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = ["gemm floor", "GEMMs via autograd", "kernels, no autograd", "op via autograd", "analytic_nll"]
    lines = [line for line in out.splitlines() if "x the GEMM floor" in line]
    assert [line.split("  ")[1].strip() for line in lines] == rows
    assert "1.00x the GEMM floor" in lines[0]
    assert re.search(r"three tiny ATen calls: [0-9.]+ us right after the kernels, [0-9.]+ us warm \([0-9.]+x\)", out)
    assert overhead.main(["--head", "precision", "--shape", "4x6x10", "--reps", "2", "--threads", "1"]) == 0
    assert "precision head, Gaussian latents" in capsys.readouterr().out


def test_providers_of_a_problem_are_timed_round_robin():
    from bench.measure import time_interleaved
    from bench.providers import Runner

    calls = []

    def runner(name):
        return Runner(forward=lambda: calls.append(name), backward=lambda out: None), []

    out = time_interleaved({"a": runner("a"), "b": runner("b")}, "forward+backward", "cpu", reps=3, warmup=1)
    assert calls == ["a", "b"] * 4   # one warm-up round, then three timed rounds, each a then b
    assert all(len(t["samples_s"]) == 3 and t["q1_s"] <= t["median_s"] <= t["q3_s"] for t in out.values())
