"""Timing (median / IQR over repetitions) and peak extra memory of one Runner call."""

from __future__ import annotations

import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from .providers import Runner

MODES = ("forward", "backward", "forward+backward")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _clear_grads(leaves) -> None:
    for t in leaves:
        t.grad = None


def _one(runner: Runner, mode: str, leaves, device: str) -> float:
    """Seconds for one call of `mode` (the forward of a backward-only call is untimed).
    CPU: perf_counter wall clock; CUDA: CUDA events around the timed region."""
    _clear_grads(leaves)
    out = runner.forward() if mode == "backward" else None
    _sync(device)
    if device == "cuda":
        start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start_event.record()
    start = time.perf_counter()
    if mode == "backward":
        runner.backward(out)
    else:
        out = runner.forward()
        if mode == "forward+backward":
            runner.backward(out)
    if device == "cuda":
        end_event.record()
        end_event.synchronize()
        return start_event.elapsed_time(end_event) / 1e3
    return time.perf_counter() - start


def time_interleaved(runners: dict, mode: str, device: str, reps: int, warmup: int) -> dict:
    """Timing samples in seconds of several Runners of one problem, taken round-robin (every
    repetition runs each runner once, in turn), so that drift of the machine during the run
    moves all of them alike and their ratios stay fair. ``runners``: name -> (Runner, leaves).
    Returns name -> {median_s, q1_s, q3_s, samples_s} (CPU: wall clock; CUDA: CUDA events)."""
    for _ in range(warmup):
        for runner, leaves in runners.values():
            _one(runner, mode, leaves, device)
    samples: dict = {name: [] for name in runners}
    for _ in range(reps):
        for name, (runner, leaves) in runners.items():
            samples[name].append(_one(runner, mode, leaves, device))
    return {name: _summary(s) for name, s in samples.items()}


def _summary(samples: list) -> dict:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return {"median_s": statistics.median(samples), "q1_s": q[0], "q3_s": q[2], "samples_s": samples}


def peak_extra_bytes(runner: Runner, mode: str, leaves, device: str) -> int:
    """Peak memory allocated above the starting level during one call.

    CUDA: torch.cuda.max_memory_allocated. CPU: the allocator events recorded by
    torch.profiler(profile_memory=True) (every allocation and free, signed bytes),
    integrated in time order; allocations made by worker threads are included when
    the profiler sees them (ATen allocations on the calling thread always are)."""
    _clear_grads(leaves)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _run_mode(runner, mode)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _run_mode(runner, mode)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return int(peak)


def _run_mode(runner: Runner, mode: str) -> None:
    out = runner.forward()
    if mode != "forward":
        runner.backward(out)
