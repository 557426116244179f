"""One command for a machine with a CUDA GPU (``make gpu-check``).

    python -m bench.gpu_check            # build check, GPU tests, benchmarks, a short training run
    python -m bench.gpu_check --plan     # print the steps, commands and time limits; runs nothing
    python -m bench.gpu_check --device cpu --tiny --out DIR --only bench-mnist,train-silent
                                         # the same steps on the CPU at toy sizes (what the tests run)

Every step runs in its own process with its own time limit, inside an overall budget, so a
hang or a crash in one step cannot take the others with it. Results go to
``bench/results/gpu-<device name>/``: ``summary.json`` and ``summary.md`` (environment, every
step's status and time, what failed), one log per step under ``logs/``, the benchmark tables
(``bench-<shape>.json`` / ``.md``), the GPU test outcomes (``gpu-tests.json`` / ``.md``, from
pytest's JUnit XML) and the training runs (``train/<estimator>/``, ``train.json`` / ``.md``).
The exit status is 1 when any step failed. Without a CUDA device it prints one line and exits 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Callable, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "bench", "results")

# Every provider of bench/providers.py and the devices it runs on (kept in step with
# providers.PROVIDERS by tests/test_gpu_check.py).
PROVIDER_DEVICES = {
    "reference-eager": ("cpu", "cuda"),
    "reference-compiled": ("cpu", "cuda"),
    "cpp": ("cpu",),
    "triton": ("cuda",),
    "cuda": ("cuda",),
    "mc-reparam-1": ("cpu", "cuda"),
    "gemm-limit": ("cpu", "cuda"),
}
BENCH_SHAPES = ("mnist", "cifar", "large")
# --tiny: the same problems at toy sizes (B x d x k), for running the plan on a CPU.
TINY_SHAPES = {"mnist": "4x6x10", "cifar": "4x6x12", "large": "4x8x12"}
TRAIN_ESTIMATORS = ("silent", "reparam")
# The kernel backends the check is about, per device.
REQUIRED_BACKENDS = {"cuda": ("triton", "cuda"), "cpu": ("cpp",)}

# Seconds. Each step has its own limit; the run also stops starting steps once TOTAL_BUDGET_S
# is spent and cuts a step's limit to what is left, so the total stays under 8 minutes
# (a rebuild of the extension or slow compiles then cost the last benchmarks, not the limit).
TOTAL_BUDGET_S = 420
STEP_TIMEOUTS_S = {"extension": 150, "gpu-tests": 150, "bench": 120, "train": 45}


@dataclass
class Step:
    """One command of the check. ``check(out_dir)`` lists the problems found in its outputs
    (also after a failure or a timeout, for what they tell); ``report(out_dir)`` is its
    Markdown section of the summary."""

    name: str
    what: str
    argv: list
    timeout_s: float
    check: Optional[Callable[[str], list]] = None
    report: Optional[Callable[[str], str]] = None
    outputs: tuple = ()    # files / folders (relative to the results folder) it writes, cleared first


@dataclass
class Outcome:
    name: str
    status: str            # ok | failed | timeout | not run
    seconds: float
    problems: list
    log: Optional[str]
    returncode: Optional[int] = None


# ------------------------------------------------------------------------------ plan

def device_slug(device_name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (the results folder is gpu-<slug>)."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return slug or "unknown"


def expected_providers(device: str) -> list:
    return [name for name, devices in PROVIDER_DEVICES.items() if device in devices]


def build_plan(device: str, out_dir: str, *, tiny: bool = False, python: str = sys.executable) -> list:
    """The steps, in the order they run (most informative first, so a short budget still
    yields the GPU tests and one benchmark)."""
    if device not in REQUIRED_BACKENDS:
        raise ValueError(f"device: expected 'cuda' or 'cpu', got {device!r}")
    steps = [Step(
        "extension", f"the compiled extension has the {'/'.join(REQUIRED_BACKENDS[device])} backends "
        "(rebuilds it once if not)",
        [python, "-m", "bench.gpu_check", "--ensure-extension", "--device", device],
        STEP_TIMEOUTS_S["extension"])]
    junit = os.path.join(out_dir, "gpu-tests.xml")
    steps.append(Step(
        "gpu-tests", "pytest -m gpu: every backend against the reference on the GPU",
        # -v: one line per test in the log, which is what is left if the step is cut short
        [python, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", f"--junitxml={junit}",
         os.path.join(REPO_ROOT, "tests")],
        STEP_TIMEOUTS_S["gpu-tests"],
        check=lambda out: check_gpu_tests(out, device), report=report_gpu_tests,
        outputs=("gpu-tests.xml", "gpu-tests.json", "gpu-tests.md")))
    benches = [bench_step(shape, device, out_dir, tiny, python) for shape in BENCH_SHAPES]
    trains = [train_step(estimator, device, out_dir, tiny, python) for estimator in TRAIN_ESTIMATORS]
    return steps + benches[:1] + trains + benches[1:]


def bench_step(shape: str, device: str, out_dir: str, tiny: bool, python: str) -> Step:
    providers = expected_providers(device)
    argv = [python, "-m", "bench.run", "--device", device, "--shapes", TINY_SHAPES[shape] if tiny else shape,
            "--providers", ",".join(providers), "--modes", "forward,backward,forward+backward",
            "--out", out_dir, "--name", f"bench-{shape}", "--markdown", os.path.join(out_dir, f"bench-{shape}.md")]
    # --tiny keeps one problem per shape: torch.compile of every problem would dominate a CPU run.
    argv += (["--reps", "2", "--warmup", "1", "--heads", "precision", "--latents", "bernoulli"] if tiny
             else ["--reps", "30", "--warmup", "5"])
    return Step(f"bench-{shape}", f"bench.run at the {shape} shape, every provider that runs on {device}",
                argv, STEP_TIMEOUTS_S["bench"],
                check=lambda out: check_bench(out, shape, providers),
                report=lambda out: report_bench(out, shape),
                outputs=(f"bench-{shape}.json", f"bench-{shape}.md"))


def train_step(estimator: str, device: str, out_dir: str, tiny: bool, python: str) -> Step:
    """The demo's model and data (embedded digits, Gaussian latents d=200, linear decoder,
    sigma^2 = 0.01), 2 epochs, through the reference trainer's CLI."""
    epochs = 1 if tiny else 2
    argv = [python, "-m", "silent_kernels.api.cli", "train", "--preset", "cpu", "--dataset", "digits",
            "--latent", "gaussian", "--decoder", "linear", "--variance", "fixed", "--sigma2", "0.01",
            "--latent-dim", "200", "--estimator", estimator, "--epochs", str(epochs), "--batch-size", "64",
            "--lr", "2e-3", "--seed", "0", "--device", device, "--no-figures", "--no-progress",
            "--run-dir", os.path.join(out_dir, "train", estimator)]
    if tiny:
        argv += ["--train-limit", "64", "--val-limit", "64"]
    return Step(f"train-{estimator}", f"{epochs} epoch(s) of the demo's model with the {estimator} estimator "
                f"on {device}", argv, STEP_TIMEOUTS_S["train"],
                check=lambda out: check_train(out, estimator, epochs), report=lambda out: report_train(out, estimator),
                outputs=(os.path.join("train", estimator),))


def plan_text(steps: list, out_dir: str, budget_s: float = TOTAL_BUDGET_S) -> str:
    lines = [f"gpu-check plan: {len(steps)} steps, results in {out_dir}, total budget {budget_s:.0f} s"]
    for i, s in enumerate(steps, 1):
        lines.append(f"{i}. {s.name} (limit {s.timeout_s:.0f} s): {s.what}")
        lines.append("   " + " ".join(_shell_word(a) for a in s.argv))
    return "\n".join(lines)


def _shell_word(arg: str) -> str:
    return arg if re.fullmatch(r"[\w@%+=:,./-]+", arg) else "'" + arg.replace("'", "'\\''") + "'"


# ------------------------------------------------------------------------------ checks

def _load_json(path: str) -> Optional[dict]:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def check_bench(out_dir: str, shape: str, providers: list) -> list:
    """Every expected provider must have timed every problem of the shape."""
    result = _load_json(os.path.join(out_dir, f"bench-{shape}.json"))
    if result is None:
        return [f"bench-{shape}.json missing or unreadable"]
    problems = []
    if not result.get("complete", True):
        a = result["args"]
        planned = len(a["shapes"]) * len(a["dtypes"]) * len(a["latents"]) * len(a["heads"])
        done = len({r["label"] for r in result["records"]} | {s["problem"] for s in result["skipped"]})
        problems.append(f"cut short: {done} of {planned} problems finished")
    labels = {r["label"] for r in result["records"]} | {s["problem"] for s in result["skipped"]}
    timed = {(r["label"], r["provider"]) for r in result["records"]}
    reasons = {(s["problem"], s["provider"]): s["reason"] for s in result["skipped"]}
    for provider in providers:
        missing = sorted(label for label in labels if (label, provider) not in timed)
        if missing:
            why = {reasons.get((label, provider), "not timed") for label in missing}
            problems.append(f"provider {provider} did not run for {len(missing)} problem(s): {'; '.join(sorted(why))}")
    bad = [r for r in result["records"] if not (r["median_s"] > 0 and math.isfinite(r["median_s"]))]
    if bad:
        problems.append(f"{len(bad)} timing(s) not a positive finite number")
    return problems


def report_bench(out_dir: str, shape: str) -> str:
    path = os.path.join(out_dir, f"bench-{shape}.md")
    if os.path.exists(path):
        with open(path) as fh:
            return f"### bench-{shape}\n\n{fh.read()}\n"
    partial = _load_json(os.path.join(out_dir, f"bench-{shape}.json"))
    if partial is None:
        return f"### bench-{shape}\n\n(no results: the step did not finish a single problem)\n"
    from .run import markdown_table

    return f"### bench-{shape} (cut short: the problems that finished)\n\n{markdown_table(partial)}\n"


def parse_junit(path: str) -> dict:
    """Counts and the failed / skipped tests (with their messages) of a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "").strip().splitlines()[0:1]
                message = message[0][:300] if message else ""
                break
        cases.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0.0), "message": message})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "cases": cases}


# "tests/test_x.py::test_y[a, b] SKIPPED (reason)   [ 12%]" (test ids may contain spaces)
PYTEST_VERBOSE_LINE = re.compile(
    r"^(\S+::.+?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?: \((.*)\))?\s*(?:\[\s*\d+%\])?$")


def parse_verbose_log(path: str) -> dict:
    """What `pytest -v` printed before it was stopped, in parse_junit's format."""
    outcome_of = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "error",
                  "SKIPPED": "skipped", "XFAIL": "skipped"}
    cases = []
    with open(path, errors="replace") as fh:
        for line in fh:
            m = PYTEST_VERBOSE_LINE.match(line.strip())
            if m:
                cases.append({"test": m.group(1), "outcome": outcome_of[m.group(2)], "seconds": None,
                              "message": (m.group(3) or "").strip()})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "cases": cases}


def check_gpu_tests(out_dir: str, device: str) -> list:
    path = os.path.join(out_dir, "gpu-tests.xml")
    log = os.path.join(out_dir, "logs", "gpu-tests.log")
    problems = []
    if os.path.exists(path):
        summary = parse_junit(path)
    elif os.path.exists(log):   # cut short: pytest writes the XML only at the end
        summary = parse_verbose_log(log)
        summary["cut_short"] = True
        problems.append(f"pytest wrote no JUnit XML; its log shows {len(summary['cases'])} finished test(s)")
    else:
        return ["pytest wrote no JUnit XML and no log"]
    with open(os.path.join(out_dir, "gpu-tests.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    counts = summary["counts"]
    if counts["failed"] or counts["error"]:
        problems.append(f"{counts['failed']} failed, {counts['error']} errors (see gpu-tests.md)")
    if device == "cuda" and counts["passed"] == 0:
        problems.append("no GPU test passed (all skipped: see the skip reasons in gpu-tests.md)")
    return problems


def report_gpu_tests(out_dir: str) -> str:
    summary = _load_json(os.path.join(out_dir, "gpu-tests.json"))
    if summary is None:
        return "### gpu-tests\n\n(no results: the step did not finish)\n"
    c = summary["counts"]
    cut = " (cut short: the tests that finished, from the log)" if summary.get("cut_short") else ""
    lines = [f"### gpu-tests{cut}", "", f"{c['passed']} passed, {c['failed']} failed, {c['error']} errors, "
             f"{c['skipped']} skipped", ""]
    for case in summary["cases"]:
        if case["outcome"] in ("failed", "error"):
            lines.append(f"- {case['outcome']}: `{case['test']}`: {case['message']}")
    skip_reasons: dict = {}
    for case in summary["cases"]:
        if case["outcome"] == "skipped":
            skip_reasons[case["message"]] = skip_reasons.get(case["message"], 0) + 1
    for message, count in sorted(skip_reasons.items(), key=lambda kv: -kv[1]):
        lines.append(f"- skipped {count}: {message}")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "gpu-tests.md"), "w") as fh:
        fh.write(text)
    return text


def _read_jsonl(path: str) -> list:
    records = []
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
    return records


def check_train(out_dir: str, estimator: str, epochs: int) -> list:
    records = _read_jsonl(os.path.join(out_dir, "train", estimator, "metrics.jsonl"))
    if len(records) != epochs:
        return [f"expected {epochs} epoch record(s) in metrics.jsonl, found {len(records)}"]
    last = records[-1]
    bad = [k for k in ("train_loss", "val_bpd", "val_mse", "val_kld")
           if not isinstance(last.get(k), (int, float)) or not math.isfinite(last[k])]
    return [f"not finite after the last epoch: {', '.join(bad)}"] if bad else []


def report_train(out_dir: str, estimator: str) -> str:
    """Adds this estimator's epochs to train.json and rewrites train.md from all of it."""
    records = _read_jsonl(os.path.join(out_dir, "train", estimator, "metrics.jsonl"))
    train = _load_json(os.path.join(out_dir, "train.json")) or {}
    train[estimator] = records
    with open(os.path.join(out_dir, "train.json"), "w") as fh:
        json.dump(train, fh, indent=1)
    sections = {name: _train_table(name, recs) for name, recs in train.items()}
    with open(os.path.join(out_dir, "train.md"), "w") as fh:
        fh.write("\n".join(sections.values()))
    return sections[estimator]


def _train_table(estimator: str, records: list) -> str:
    lines = [f"### train-{estimator}", "", "| epoch | train loss | val BPD | val MSE | val KLD | epoch s |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r.get('epoch')} | {r.get('train_loss', float('nan')):.4f} | "
                     f"{r.get('val_bpd', float('nan')):.4f} | {r.get('val_mse', float('nan')):.3f} | "
                     f"{r.get('val_kld', float('nan')):.2f} | {r.get('time_s', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ running

def run_step(step: Step, out_dir: str, timeout_s: float) -> Outcome:
    """Run one step in its own process group (so a timeout ends its workers too)."""
    log_path = os.path.join(out_dir, "logs", f"{step.name}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    for name in step.outputs:   # an earlier check's files must not pass for this one's
        path = os.path.join(out_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(_shell_word(a) for a in step.argv) + "\n")
        log.flush()
        proc = subprocess.Popen(step.argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _end_group(proc)
            problems = [f"stopped after its {timeout_s:.0f} s limit; last lines of "
                        f"{os.path.relpath(log_path, out_dir)}:\n" + _tail(log_path, 12)]
            if step.check is not None:
                problems += _safe_check(step, out_dir)
            return Outcome(step.name, "timeout", time.perf_counter() - start, problems, log_path)
    seconds = time.perf_counter() - start
    if rc != 0:
        problems = [f"exit status {rc}; last lines of {os.path.relpath(log_path, out_dir)}:\n"
                    + _tail(log_path, 12)]
        if step.check is not None:   # partial outputs can still say what went wrong
            problems += _safe_check(step, out_dir)
        return Outcome(step.name, "failed", seconds, problems, log_path, rc)
    problems = _safe_check(step, out_dir) if step.check is not None else []
    return Outcome(step.name, "failed" if problems else "ok", seconds, problems, log_path, rc)


def _safe_check(step: Step, out_dir: str) -> list:
    try:
        return step.check(out_dir)
    except Exception as exc:  # a malformed output file is a finding, not a crash of the driver
        return [f"could not read its outputs: {type(exc).__name__}: {exc}"]


def _end_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _tail(path: str, n: int) -> str:
    with open(path, errors="replace") as fh:
        return "".join(fh.readlines()[-n:]).rstrip()


def run_plan(steps: list, out_dir: str, budget_s: float = TOTAL_BUDGET_S, echo=print) -> list:
    deadline = time.perf_counter() + budget_s
    outcomes = []
    for i, step in enumerate(steps, 1):
        left = deadline - time.perf_counter()
        if left < 5:
            outcomes.append(Outcome(step.name, "not run", 0.0, [f"the {budget_s:.0f} s budget was spent"], None))
            echo(f"[{i}/{len(steps)}] {step.name}: not run (budget spent)")
            continue
        echo(f"[{i}/{len(steps)}] {step.name}: {step.what} ...")
        outcome = run_step(step, out_dir, min(step.timeout_s, left))
        outcomes.append(outcome)
        echo(f"[{i}/{len(steps)}] {step.name}: {outcome.status} in {outcome.seconds:.1f} s")
    return outcomes


# ------------------------------------------------------------------------------ environment

def gpu_visible_without_torch() -> bool:
    """Whether the machine has an NVIDIA GPU, whatever torch was installed."""
    if os.path.exists("/dev/nvidia0"):
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "GPU" in out


def environment(device: str) -> dict:
    import platform

    import torch

    from silent_kernels import info

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "silent_kernels": info(),
           "timestamp": dt.datetime.now().isoformat(timespec="seconds"), "git_commit": _git_commit()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                      "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count()}
        smi = shutil.which("nvidia-smi")
        if smi:
            try:
                env["nvidia_smi"] = subprocess.run(
                    [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                    capture_output=True, text=True, timeout=20).stdout.strip()
            except (OSError, subprocess.TimeoutExpired):
                pass
    return env


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def ensure_extension(device: str) -> int:
    """The step 'extension': exit 0 when the kernel backends for `device` load. On CUDA,
    when they do not (typically: the venv was built before a CUDA torch or nvcc was there),
    rebuild the extension once (pip install -e compiles csrc/cuda when torch has CUDA and nvcc
    is found) and check again in a fresh process. On the CPU it only reports: the dry run must
    never rebuild the package it is testing."""
    missing = _missing_backends(device)
    if not missing:
        print(f"extension ok: backends {', '.join(REQUIRED_BACKENDS[device])} available")
        return 0
    for name, reason in missing.items():
        print(f"backend {name} not available: {reason}")
    if device != "cuda":
        print("not rebuilding on the CPU; rebuild with: pip install --no-build-isolation -e .")
        return 1
    if "cuda" in missing:
        from torch.utils.cpp_extension import CUDA_HOME
        if CUDA_HOME is None:
            print("cannot build the CUDA kernels: nvcc not found; install the CUDA toolkit matching "
                  "torch.version.cuda and set CUDA_HOME (the triton backend needs no toolkit)")
            return 1
    if set(missing) <= {"triton"}:
        print("the triton backend needs the triton package: pip install 'triton>=3.8'")
        return 1
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", REPO_ROOT]
    print("rebuilding: " + " ".join(cmd), flush=True)
    env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))}
    if subprocess.run(cmd, cwd=REPO_ROOT, env=env).returncode != 0:
        return 1
    recheck = subprocess.run([sys.executable, "-c", "import json, silent_kernels; "
                              "print(json.dumps(silent_kernels.info()['backends']))"],
                             capture_output=True, text=True, cwd=REPO_ROOT)
    backends = json.loads(recheck.stdout or "{}")
    still = [n for n in REQUIRED_BACKENDS[device] if not backends.get(n, {}).get("available")]
    if still:
        print(f"after the rebuild still missing: {', '.join(still)}: {backends}")
        return 1
    print("extension rebuilt: all backends available")
    return 0


def _missing_backends(device: str) -> dict:
    from silent_kernels import info

    backends = info()["backends"]
    return {name: backends.get(name, {}).get("reason", "unknown backend")
            for name in REQUIRED_BACKENDS[device] if not backends.get(name, {}).get("available")}


# ------------------------------------------------------------------------------ summary

def write_summary(out_dir: str, steps: list, outcomes: list, env: dict, wall_s: float,
                  budget_s: float = TOTAL_BUDGET_S) -> dict:
    by_name = {s.name: s for s in steps}
    sections = []
    for outcome in outcomes:
        step = by_name[outcome.name]
        if step.report is not None and outcome.status != "not run":
            try:
                sections.append(step.report(out_dir))
            except Exception as exc:
                sections.append(f"### {step.name}\n\n(could not summarise: {type(exc).__name__}: {exc})\n")
    failed = [o for o in outcomes if o.status != "ok"]
    summary = {"environment": env, "wall_s": wall_s, "budget_s": budget_s,
               "steps": [{"name": o.name, "status": o.status, "seconds": round(o.seconds, 2),
                          "returncode": o.returncode, "problems": o.problems,
                          "log": o.log and os.path.relpath(o.log, out_dir),
                          "command": by_name[o.name].argv} for o in outcomes],
               "failed": [o.name for o in failed]}
    with open(os.path.join(out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    gpu = env.get("gpu", {})
    lines = ["# gpu-check", "",
             f"device: {gpu.get('name', 'cpu')} (capability {gpu.get('capability', '-')}), torch {env['torch']} "
             f"(CUDA {env['torch_cuda']}), triton {env['silent_kernels'].get('triton')}, "
             f"commit {(env['git_commit'] or '?')[:10]}, {env['timestamp']}, total {wall_s:.0f} s"
             + (f"; nvidia-smi: {env['nvidia_smi']}" if env.get("nvidia_smi") else ""), "",
             "| step | status | seconds | problems |", "|---|---|---:|---|"]
    for o in outcomes:
        first = o.problems[0].splitlines()[0] if o.problems else ""
        lines.append(f"| {o.name} | {o.status} | {o.seconds:.1f} | {first} |")
    lines.append("")
    with open(os.path.join(out_dir, "summary.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n" + "\n".join(sections))
    return summary


def final_report(outcomes: list, out_dir: str, wall_s: float) -> str:
    failed = [o for o in outcomes if o.status != "ok"]
    lines = [f"gpu-check: {len(outcomes) - len(failed)}/{len(outcomes)} steps ok in {wall_s:.0f} s; "
             f"results in {out_dir}"]
    for o in failed:
        lines.append(f"FAILED {o.name} ({o.status}):")
        lines += ["    " + line for p in o.problems for line in p.splitlines()]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", action="store_true", help="print the steps and exit")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu runs the same steps on the CPU (with --tiny: what the tests do)")
    ap.add_argument("--tiny", action="store_true", help="toy shapes, 2 repetitions, 1 short epoch")
    ap.add_argument("--only", default=None, help="comma list of step names to run (default: all)")
    ap.add_argument("--out", default=None, help="results folder (default bench/results/gpu-<device name>)")
    ap.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds for all steps together")
    ap.add_argument("--ensure-extension", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.budget <= 0:
        ap.error(f"--budget: must be positive, got {args.budget}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.ensure_extension:
        return ensure_extension(args.device)

    import torch

    has_cuda = torch.cuda.is_available()
    if args.device == "cuda" and not has_cuda and not args.plan:
        if gpu_visible_without_torch():
            print(f"gpu-check: an NVIDIA GPU is present but torch {torch.__version__} cannot use it "
                  f"(CUDA build: {torch.version.cuda or 'no'}); install a CUDA torch, e.g. make clean && "
                  "make gpu-check TORCH_SPEC=\"torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128\"")
            return 2
        print(f"gpu-check: no CUDA GPU on this machine (torch {torch.__version__}, CUDA build: "
              f"{torch.version.cuda or 'no'}); nothing to check")
        return 0

    if args.device == "cuda":
        slug = device_slug(torch.cuda.get_device_name(0)) if has_cuda else "<device-name>"
        default_out = os.path.join(RESULTS_DIR, f"gpu-{slug}")
    else:
        default_out = os.path.join(RESULTS_DIR, "gpu-check-on-cpu")
    out_dir = os.path.abspath(args.out or default_out)
    steps = build_plan(args.device, out_dir, tiny=args.tiny)
    if args.only:
        wanted = [n for n in args.only.split(",") if n]
        unknown = sorted(set(wanted) - {s.name for s in steps})
        if unknown:
            raise SystemExit(f"--only: unknown step(s) {', '.join(unknown)}; steps: "
                             f"{', '.join(s.name for s in steps)}")
        steps = [s for s in steps if s.name in wanted]
    if args.plan:
        print(plan_text(steps, out_dir, args.budget))
        return 0

    os.makedirs(out_dir, exist_ok=True)
    print(f"gpu-check on {args.device}: {len(steps)} steps, budget {args.budget:.0f} s, results in {out_dir}",
          flush=True)
    start = time.perf_counter()
    outcomes = run_plan(steps, out_dir, args.budget, echo=lambda m: print(m, flush=True))
    wall = time.perf_counter() - start
    write_summary(out_dir, steps, outcomes, environment(args.device), wall, args.budget)
    print(final_report(outcomes, out_dir, wall))
    return 1 if any(o.status != "ok" for o in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
