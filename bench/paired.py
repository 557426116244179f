"""Two heads (or two providers of one head) timed interleaved (A, B, A, B, ...) in one process,
for a ratio that machine drift between benchmark rows cannot bias:
``python -m bench.paired --a precision --b precision-exact`` or
``python -m bench.paired --a fixed --b fixed --provider cpp --provider-b gemm-limit``.

Prints the median forward+backward time of each (ms) and B / A. Same problems and providers as
``bench.run`` (bench/problems.py, bench/providers.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .problems import HEADS, LATENTS, Problem, make_inputs
from .providers import PROVIDERS, prepare


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.paired", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", default="precision", choices=HEADS)
    parser.add_argument("--b", default="precision-exact", choices=HEADS)
    parser.add_argument("--latent", default="gaussian", choices=LATENTS)
    parser.add_argument("--provider", default="cpp", choices=PROVIDERS, help="the provider of A (and of B)")
    parser.add_argument("--provider-b", default=None, choices=PROVIDERS, help="B's provider, when it differs")
    parser.add_argument("--shape", default="64x200x784", help="BxDxK")
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    B, d, k = (int(v) for v in args.shape.split("x"))
    runs = {}
    for head, provider in ((args.a, args.provider), (args.b, args.provider_b or args.provider)):
        p = Problem(B, d, k, head=head, latent=args.latent)
        if not p.valid:
            parser.error(f"--a/--b: head {head!r} does not apply to {args.latent} latents")
        inp = make_inputs(p)
        runner, why = prepare(provider, p, inp)
        if runner is None:
            parser.error(f"--provider {provider}: {why}")
        runs[f"{head} ({provider})"] = (runner, inp.leaves(head))
    if len(runs) < 2:
        parser.error("--a/--b/--provider-b: A and B are the same; give two heads or two providers")
    times = {name: [] for name in runs}
    for rep in range(args.reps + 10):
        for head, (runner, leaves) in runs.items():
            for leaf in leaves:
                leaf.grad = None
            start = time.perf_counter()
            runner.backward(runner.forward())
            if rep >= 10:   # the first ten rounds are warm-up
                times[head].append(time.perf_counter() - start)
    med = {head: statistics.median(v) * 1e3 for head, v in times.items()}
    (name_a, ms_a), (name_b, ms_b) = med.items()
    print(f"{args.latent}, B x d x k = {args.shape}, {args.threads} threads, {args.reps} interleaved pairs")
    for name, ms in med.items():
        print(f"  {name:28s} {ms:8.3f} ms (median forward+backward)")
    print(f"  {name_b} / {name_a} = {ms_b / ms_a:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
