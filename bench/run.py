"""Run the microbenchmarks in one process and print a Markdown table.

    python -m bench.run                      # quick CPU suite (MNIST shape, < 5 min here)
    python -m bench.run --shapes mnist,cifar --providers cpp,reference-eager --modes forward+backward
    python -m bench.run --device cuda --shapes mnist,cifar,large --dtypes float32,bfloat16

The providers of one problem are timed round-robin (each repetition runs every provider once),
so the drift of a shared machine moves them alike and the ratios in a row stay comparable.
Results (machine, versions, threads, git commit, every timing sample) go to
bench/results/<name>.json; `--markdown FILE` also writes the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys

import torch

from silent_kernels import info

from .measure import MODES, peak_extra_bytes, time_interleaved
from .problems import CATEGORIES, HEADS, LATENTS, Problem, make_inputs
from .providers import PROVIDERS, prepare

SHAPES = {"mnist": (64, 200, 784), "cifar": (128, 256, 3072), "large": (256, 512, 3072)}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "bench", "results")


def _csv(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--shapes", type=_csv, default=["mnist"],
                    help=f"comma list of {', '.join(SHAPES)} or BxDxK (e.g. 8x16x40)")
    ap.add_argument("--heads", type=_csv, default=list(HEADS))
    ap.add_argument("--latents", type=_csv, default=list(LATENTS))
    ap.add_argument("--dtypes", type=_csv, default=["float32"])
    ap.add_argument("--providers", type=_csv, default=list(PROVIDERS))
    ap.add_argument("--modes", type=_csv, default=list(MODES))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    ap.add_argument("--name", default=None, help="results file name (default: timestamp)")
    ap.add_argument("--out", default=RESULTS_DIR)
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    for field, allowed in (("heads", HEADS), ("latents", LATENTS), ("providers", PROVIDERS), ("modes", MODES)):
        bad = [v for v in getattr(args, field) if v not in allowed]
        if bad:
            ap.error(f"--{field}: unknown {bad}; choose from {', '.join(allowed)}")
    return args


def shape_of(name: str) -> tuple[int, int, int]:
    if name in SHAPES:
        return SHAPES[name]
    try:
        B, d, k = (int(v) for v in name.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: {name!r} is neither {', '.join(SHAPES)} nor BxDxK") from None
    return B, d, k


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=REPO_ROOT, check=False).stdout.strip()
    except OSError:
        commit = ""
    env = {"python": sys.version.split()[0], "platform": platform.platform(),
           "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "git_commit": commit or None,
           "silent_kernels": info(), "timestamp": dt.datetime.now().isoformat(timespec="seconds")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def run(args: argparse.Namespace, on_problem_done=None) -> dict:
    """Time every (problem, provider, mode). ``on_problem_done(partial_result)`` is called
    after each problem, so a caller can keep what finished if the run is cut short."""
    problems = [Problem(*shape_of(s), head=h, latent=lat, dtype=dtype, device=args.device)
                for s in args.shapes for dtype in args.dtypes for lat in args.latents for h in args.heads]
    problems = [p for p in problems if p.valid and (p.latent != "categorical" or p.d % CATEGORIES == 0)]
    records, skipped = [], []
    for p in problems:
        runners, memory = {}, {}
        for name in args.providers:
            inp = make_inputs(p)
            runner, reason = prepare(name, p, inp)
            if runner is None:
                skipped.append({"problem": p.label, "provider": name, "reason": reason})
                continue
            runners[name] = (runner, inp.leaves(p.head))
            memory[name] = None if args.no_memory else peak_extra_bytes(runner, "forward+backward",
                                                                        runners[name][1], p.device)
        # the providers of one problem are timed round-robin: their ratios are what the table is for
        timings = {mode: time_interleaved(runners, mode, p.device, args.reps, args.warmup) for mode in args.modes}
        for name in runners:
            for mode in args.modes:
                t = timings[mode][name]
                records.append({"problem": p.as_dict(), "label": p.label, "provider": name, "mode": mode,
                                "flops": p.flops(mode), "peak_extra_bytes_fwd_bwd": memory[name], **t})
                print(f"  {p.label:<42} {name:<19} {mode:<17} {1e3 * t['median_s']:9.3f} ms",
                      file=sys.stderr, flush=True)
        if on_problem_done is not None:
            on_problem_done(_result(args, [dict(r) for r in records], skipped, complete=False))
    return _result(args, records, skipped, complete=True)


def _result(args: argparse.Namespace, records: list, skipped: list, complete: bool) -> dict:
    add_ratios(records)
    recorded_args = {**vars(args), "out": os.path.relpath(args.out, REPO_ROOT)}
    return {"environment": environment(), "args": recorded_args, "records": records, "skipped": skipped,
            "complete": complete}


def add_ratios(records: list[dict]) -> None:
    """Ratios within this run: speedup over the references, multiple of the GEMM floor."""
    by_key = {(r["label"], r["mode"], r["provider"]): r for r in records}
    for r in records:
        def other(provider):
            return by_key.get((r["label"], r["mode"], provider))
        eager, compiled, gemm = other("reference-eager"), other("reference-compiled"), other("gemm-limit")
        r["gflops"] = r["flops"] / r["median_s"] / 1e9
        r["speedup_vs_eager"] = eager["median_s"] / r["median_s"] if eager else None
        r["speedup_vs_compiled"] = compiled["median_s"] / r["median_s"] if compiled else None
        r["times_gemm_limit"] = r["median_s"] / gemm["median_s"] if gemm else None
        mem, eager_mem = r["peak_extra_bytes_fwd_bwd"], eager and eager["peak_extra_bytes_fwd_bwd"]
        r["memory_vs_eager"] = mem / eager_mem if (mem is not None and eager_mem) else None


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def markdown_table(result: dict) -> str:
    env = result["environment"]
    lines = [f"device: {result['args']['device']}"
             + (f" ({env['gpu']})" if result["args"]["device"] == "cuda" else f" ({env['processor']})")
             + f", torch {env['silent_kernels']['torch']}, threads {env['torch_threads']}, "
             f"commit {(env['git_commit'] or '?')[:10]}, {env['timestamp']}", "",
             "| problem | provider | mode | median ms | IQR ms | GFLOP/s | eager ÷ this | compiled ÷ this "
             "| this ÷ gemm-limit | peak MB (fwd+bwd) | memory ÷ eager |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["records"]:
        mem = r["peak_extra_bytes_fwd_bwd"]
        lines.append(
            f"| {r['label']} | {r['provider']} | {r['mode']} | {1e3 * r['median_s']:.3f} | "
            f"{1e3 * (r['q3_s'] - r['q1_s']):.3f} | {r['gflops']:.1f} | {_fmt(r['speedup_vs_eager'], '.2f')} | "
            f"{_fmt(r['speedup_vs_compiled'], '.2f')} | {_fmt(r['times_gemm_limit'], '.2f')} | "
            f"{_fmt(None if mem is None else mem / 2**20, '.1f')} | {_fmt(r['memory_vs_eager'], '.2f')} |")
    if result["skipped"]:
        lines.append("")
    for s in result["skipped"]:
        lines.append(f"- skipped {s['provider']} for {s['problem']}: {s['reason']}")
    return "\n".join(lines)


def _write_json(path: str, result: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    name = args.name or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out, f"{name}.json")
    # The file holds what has finished so far ("complete": false) until the run ends.
    result = run(args, on_problem_done=lambda partial: _write_json(path, partial))
    table = markdown_table(result)
    print(table)
    _write_json(path, result)
    print(f"\nresults: {path}", file=sys.stderr)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table + "\n")
    return result


if __name__ == "__main__":
    main()
