"""`make gpu-check` (bench/gpu_check.py) as far as it can be exercised without a GPU: its plan,
the no-GPU line, the step runner's failure handling, the result checks, and the real steps run
on the CPU through the same code (``--device cpu --tiny``)."""

import json
import sys

import pytest
import torch

gpu_check = pytest.importorskip("bench.gpu_check")
providers = pytest.importorskip("bench.providers")


def _step(plan, name):
    return next(s for s in plan if s.name == name)


def _value_after(argv, flag):
    return argv[argv.index(flag) + 1]


def test_plan_covers_every_provider_shape_and_step_within_budget(tmp_path):
    plan = gpu_check.build_plan("cuda", str(tmp_path))
    assert [s.name for s in plan] == ["extension", "gpu-tests", "bench-mnist", "train-silent", "train-reparam",
                                      "bench-cifar", "bench-large"]
    assert set(gpu_check.PROVIDER_DEVICES) == set(providers.PROVIDERS)
    for shape in ("mnist", "cifar", "large"):
        argv = _step(plan, f"bench-{shape}").argv
        assert _value_after(argv, "--device") == "cuda" and _value_after(argv, "--shapes") == shape
        assert set(_value_after(argv, "--providers").split(",")) == set(providers.PROVIDERS) - {"cpp"}
        assert _value_after(argv, "--out") == str(tmp_path)
    tests = _step(plan, "gpu-tests").argv
    assert tests[tests.index("pytest") + 1:tests.index("pytest") + 3] == ["-m", "gpu"]
    for estimator in ("silent", "reparam"):
        argv = _step(plan, f"train-{estimator}").argv
        assert _value_after(argv, "--device") == "cuda" and _value_after(argv, "--epochs") == "2"
        assert _value_after(argv, "--estimator") == estimator
    assert gpu_check.TOTAL_BUDGET_S < 8 * 60
    assert all(0 < s.timeout_s <= gpu_check.TOTAL_BUDGET_S for s in plan)


def test_plan_cli_prints_every_step(capsys, tmp_path):
    assert gpu_check.main(["--plan", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("extension", "gpu-tests", "bench-mnist", "bench-cifar", "bench-large", "train-silent"):
        assert f"{name} (limit" in out
    assert "-m bench.run --device cuda --shapes large" in out
    assert not any(tmp_path.iterdir()), "--plan must not write anything"


def test_unknown_step_and_device_are_rejected():
    with pytest.raises(SystemExit, match="--only: unknown step"):
        gpu_check.main(["--plan", "--only", "bench-mnist,nope"])
    with pytest.raises(ValueError, match="device"):
        gpu_check.build_plan("tpu", "out")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_without_gpu_one_line_and_exit_0(capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "gpu_visible_without_torch", lambda: False)
    assert gpu_check.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_present_but_cpu_torch_is_an_error(capsys, monkeypatch):
    monkeypatch.setattr(gpu_check, "gpu_visible_without_torch", lambda: True)
    assert gpu_check.main([]) == 2
    assert "TORCH_SPEC" in capsys.readouterr().out


def test_runner_reports_failures_timeouts_and_spent_budget(tmp_path):
    py = sys.executable
    steps = [
        gpu_check.Step("ok", "exits 0", [py, "-c", "print('fine')"], 30),
        gpu_check.Step("crash", "exits 3", [py, "-c", "import sys; print('bo' + 'om'); sys.exit(3)"], 30),
        gpu_check.Step("hang", "sleeps", [py, "-c", "import time; time.sleep(60)"], 1),
        gpu_check.Step("bad-output", "exits 0, its check objects", [py, "-c", "pass"], 30,
                       check=lambda out: ["result file missing"]),
    ]
    outcomes = gpu_check.run_plan(steps, str(tmp_path), budget_s=100, echo=lambda m: None)
    assert [o.status for o in outcomes] == ["ok", "failed", "timeout", "failed"]
    assert "exit status 3" in outcomes[1].problems[0] and "boom" in outcomes[1].problems[0]
    assert outcomes[2].seconds < 30
    assert outcomes[3].problems == ["result file missing"]
    report = gpu_check.final_report(outcomes, str(tmp_path), 1.0)
    assert report.splitlines()[0].startswith("gpu-check: 1/4 steps ok")
    assert "FAILED crash" in report and "FAILED hang (timeout)" in report and "FAILED bad-output" in report
    log = (tmp_path / "logs" / "crash.log").read_text().splitlines()
    assert log[0].startswith("$ ") and log[1] == "boom"

    spent = gpu_check.run_plan(steps[:1], str(tmp_path), budget_s=1, echo=lambda m: None)
    assert spent[0].status == "not run"


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_a" name="test_ok" time="0.1"/>
<testcase classname="tests.test_a" name="test_bad" time="0.2"><failure message="assert 1 == 2">trace</failure></testcase>
<testcase classname="tests.test_b" name="test_gpu" time="0.0"><skipped message="needs a CUDA device"/></testcase>
</testsuite></testsuites>"""


def test_gpu_test_results_are_parsed_and_judged(tmp_path):
    (tmp_path / "gpu-tests.xml").write_text(JUNIT)
    problems = gpu_check.check_gpu_tests(str(tmp_path), "cuda")
    assert problems == ["1 failed, 0 errors (see gpu-tests.md)"]
    saved = json.loads((tmp_path / "gpu-tests.json").read_text())
    assert saved["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    section = gpu_check.report_gpu_tests(str(tmp_path))
    assert "tests.test_a::test_bad`: assert 1 == 2" in section and "skipped 1: needs a CUDA device" in section

    only_skipped = JUNIT.split("\n")[0] + "\n" + JUNIT.split("\n")[3] + "\n</testsuite></testsuites>"
    (tmp_path / "gpu-tests.xml").write_text(only_skipped)
    assert gpu_check.check_gpu_tests(str(tmp_path), "cuda") == [
        "no GPU test passed (all skipped: see the skip reasons in gpu-tests.md)"]
    assert gpu_check.check_gpu_tests(str(tmp_path), "cpu") == []


def test_bench_check_names_missing_providers_and_cut_short_runs(tmp_path):
    label = "B=4 d=6 k=10 bernoulli/precision float32"
    record = {"label": label, "provider": "reference-eager", "median_s": 1e-3}
    result = {"complete": False, "records": [record],
              "skipped": [{"problem": label, "provider": "cuda", "reason": "backend cuda not available"}],
              "args": {"shapes": ["4x6x10"], "dtypes": ["float32"], "latents": ["bernoulli", "gaussian"],
                       "heads": ["precision"]}}
    (tmp_path / "bench-mnist.json").write_text(json.dumps(result))
    problems = gpu_check.check_bench(str(tmp_path), "mnist", ["reference-eager", "cuda", "triton"])
    assert problems[0] == "cut short: 1 of 2 problems finished"
    assert "provider cuda did not run for 1 problem(s): backend cuda not available" in problems
    assert "provider triton did not run for 1 problem(s): not timed" in problems
    assert gpu_check.check_bench(str(tmp_path), "cifar", ["reference-eager"]) == [
        "bench-cifar.json missing or unreadable"]


def test_steps_run_on_cpu_through_the_same_code(tmp_path, capsys):
    """The GPU path without a GPU: the extension check, one benchmark step (every provider
    that runs on the CPU) and one training step, driven exactly as on a GPU."""
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path),
                         "--only", "extension,bench-mnist,train-silent"])
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert rc == 0, out
    assert [(s["name"], s["status"]) for s in summary["steps"]] == [
        ("extension", "ok"), ("bench-mnist", "ok"), ("train-silent", "ok")]
    bench = json.loads((tmp_path / "bench-mnist.json").read_text())
    assert bench["complete"] and {r["provider"] for r in bench["records"]} == set(
        gpu_check.expected_providers("cpu"))
    assert {r["mode"] for r in bench["records"]} == {"forward", "backward", "forward+backward"}
    train = json.loads((tmp_path / "train.json").read_text())
    assert len(train["silent"]) == 1 and train["silent"][0]["val_bpd"] > 0
    markdown = (tmp_path / "summary.md").read_text()
    assert "| bench-mnist | ok |" in markdown and "### train-silent" in markdown
    assert "| problem | provider |" in markdown


def test_summary_on_a_gpu_names_the_device_and_lists_failures(tmp_path):
    """write_summary with the environment a CUDA machine reports (no GPU needed to format it)."""
    plan = gpu_check.build_plan("cuda", str(tmp_path))
    outcomes = [gpu_check.Outcome("extension", "ok", 3.0, [], None, 0),
                gpu_check.Outcome("gpu-tests", "timeout", 150.0, ["stopped after its 150 s limit"], None),
                gpu_check.Outcome("bench-mnist", "not run", 0.0, ["the 420 s budget was spent"], None)]
    env = {"torch": "2.13.0+cu128", "torch_cuda": "12.8", "git_commit": "0123456789abcdef",
           "timestamp": "2026-01-01T00:00:00", "silent_kernels": {"triton": "3.9.0"},
           "gpu": {"name": "NVIDIA H200", "capability": "9.0", "memory_gib": 139.8, "count": 1},
           "nvidia_smi": "NVIDIA H200, 570.00, 143771 MiB"}
    summary = gpu_check.write_summary(str(tmp_path), plan, outcomes, env, 153.0)
    assert summary["failed"] == ["gpu-tests", "bench-mnist"]
    markdown = (tmp_path / "summary.md").read_text()
    assert "device: NVIDIA H200 (capability 9.0), torch 2.13.0+cu128 (CUDA 12.8)" in markdown
    assert "nvidia-smi: NVIDIA H200, 570.00" in markdown
    assert "| gpu-tests | timeout | 150.0 | stopped after its 150 s limit |" in markdown
    assert "(no results: the step did not finish)" in markdown   # its section, with no XML written
    assert json.loads((tmp_path / "summary.json").read_text())["steps"][2]["status"] == "not run"


def test_gpu_tests_cut_short_are_read_from_the_verbose_log(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "gpu-tests.log").write_text(
        "$ python -m pytest -m gpu -v\n"
        "tests/test_c.py::test_gpu_against_reference[(37, 61, 13)-fixed-gaussian-torch.float64] PASSED [  0%]\n"
        "tests/test_c.py::test_gpu_opcheck[fixed] FAILED                                   [  1%]\n"
        "tests/test_t.py::test_gpu_bfloat16[fixed-gaussian] SKIPPED (no triton)            [  2%]\n"
        "tests/test_t.py::test_gpu_determinism \n")   # started, never finished
    problems = gpu_check.check_gpu_tests(str(tmp_path), "cuda")
    assert problems == ["pytest wrote no JUnit XML; its log shows 3 finished test(s)",
                        "1 failed, 0 errors (see gpu-tests.md)"]
    section = gpu_check.report_gpu_tests(str(tmp_path))
    assert section.startswith("### gpu-tests (cut short")
    assert "1 passed, 1 failed, 0 errors, 1 skipped" in section and "skipped 1: no triton" in section


def test_a_step_never_reads_an_earlier_runs_outputs(tmp_path):
    (tmp_path / "bench-mnist.json").write_text("{}")          # left by an earlier check
    step = gpu_check.Step("bench-mnist", "writes nothing", [sys.executable, "-c", "pass"], 30,
                          check=lambda out: [] if not (tmp_path / "bench-mnist.json").exists() else ["stale"],
                          outputs=("bench-mnist.json",))
    assert gpu_check.run_step(step, str(tmp_path), 30).problems == []
