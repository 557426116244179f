"""Where the time of one loss call goes on the CPU: the cpp backend's GEMM-floor ratio split
into the kernels' own work, autograd's per-call cost and the public API's, for the heads whose
contraction stage is GEMMs (Gaussian latents: the fixed head, 3 GEMMs of B x d x k; the precision
head, 15).

``python -m bench.overhead [--head fixed|precision] [--shape 64x200x784] [--reps 200] [--threads 2]``

Rows (float32, forward+backward), timed interleaved: every round runs each row once, so machine
drift moves all rows alike; the printout gives medians and each row's ratio to the first.

    gemm floor            the head's GEMMs alone (bench.providers' gemm-limit)
    GEMMs via autograd    the same GEMMs as F.linear of the moments against the stacked weight
                          products, forward and backward on leaf tensors: what autograd adds to
                          any op, before any loss math
    kernels, no autograd  the training op and its backward op called directly (torch.ops), the
                          gradients of every moment and weight: the kernels' own work
    op via autograd       the training op on leaf tensors, then .sum().backward()
    analytic_nll          the public call as bench.run times it: moments from (mu, logvar),
                          argument checks, the mean reduction, and their backward

A last line times three tiny ATen calls (what an autograd node or an argument check costs at
least) twice per round: right after the kernels row and again right after that. On a machine
whose caches the kernels' data evicts, the first is several times the second: that is why the
per-call cost of autograd and of the Python layer grows with the problem size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from silent_kernels.autograd import HEADS
from silent_kernels.backends import available

from .problems import SIGMA2, Problem, make_inputs
from .providers import prepare


def _rows(head: str, B: int, d: int, k: int) -> dict[str, tuple[Callable[[], None], list]]:
    p = Problem(B, d, k, head=head, latent="gaussian")
    inp = make_inputs(p)
    floor, _ = prepare("gemm-limit", p, inp)
    public, _ = prepare("cpp", p, inp)
    ops = torch.ops.silent_kernels
    with torch.no_grad():
        mu, logvar = (t.detach() for t in inp.encoder_out)
        mean, var = mu.clone(), logvar.exp()
        A, b = inp.weight.detach(), inp.bias.detach()
        C, c = inp.precision_weight.detach(), inp.precision_bias.detach()
        if head == "fixed":
            stacks = [A]
        else:
            stacks = [torch.cat([A, C]), torch.cat([A * A, C * C, A * C])]
    ones = torch.ones(B)
    leaves = [t.clone().requires_grad_(True) for t in (mean, var, A, b, C, c)]
    mean_l, var_l, A_l, b_l, C_l, c_l = leaves
    linear_leaves = [t.clone().requires_grad_(True) for t in (mean, var, *stacks)]
    upstream = [torch.randn(B, w.shape[0]) for w in stacks]

    def via_autograd() -> None:
        moments, weights = linear_leaves[:2], linear_leaves[2:]   # mean with stacks[0], var with stacks[1]
        torch.autograd.backward([F.linear(m, w) for m, w in zip(moments, weights)], upstream)

    if head == "fixed":
        sigma2 = torch.full((k,), SIGMA2)
        needs = [False, True, True, True, True, False]   # x, mean, var, weight, bias, sigma2

        def kernels() -> None:
            _, coefficients = ops.fixed_nll_train.default(inp.x, mean, var, A, b, sigma2)
            ops.fixed_nll_train_backward.default(ones, coefficients, mean, var, A, sigma2, needs)

        def op_autograd() -> None:
            ops.fixed_nll_train.default(inp.x, mean_l, var_l, A_l, b_l, sigma2)[0].sum().backward()
    else:
        log_term = HEADS["taylor"]   # as bench.providers' "precision" head
        # x, mean, var, k3, k4, weight, bias, precision_weight, precision_bias
        needs = [False, True, True, False, False, True, True, True, True]

        def kernels() -> None:
            _, coefficients = ops.precision_nll_train.default(inp.x, mean, var, None, None, A, b, C, c, log_term)
            ops.precision_nll_train_backward.default(ones, coefficients, mean, var, None, None, A, C, needs)

        def op_autograd() -> None:
            ops.precision_nll_train.default(inp.x, mean_l, var_l, None, None, A_l, b_l, C_l, c_l,
                                            log_term)[0].sum().backward()

    return {
        "gemm floor": (lambda: floor.backward(floor.forward()), []),
        "GEMMs via autograd": (via_autograd, linear_leaves),
        "kernels, no autograd": (kernels, []),
        "op via autograd": (op_autograd, leaves),
        "analytic_nll": (lambda: public.backward(public.forward()), inp.leaves(head)),
    }


def _tiny_aten_calls() -> None:
    t = torch.empty(3)
    t.fill_(1.0)
    t.add_(1.0)


def _timed(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", default="fixed", choices=("fixed", "precision"),
                        help="precision: the learnable-precision head with the Taylor log term")
    parser.add_argument("--shape", default="64x200x784", help="BxDxK")
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not available("cpp"):
        parser.error("the cpp backend is not available (the extension is not built)")
    torch.set_num_threads(args.threads)
    B, d, k = (int(v) for v in args.shape.split("x"))
    rows = _rows(args.head, B, d, k)
    times: dict[str, list[float]] = {name: [] for name in rows}
    tiny = {"after the kernels": [], "warm": []}
    for rep in range(args.reps + 10):
        for name, (run, leaves) in rows.items():
            for leaf in leaves:
                leaf.grad = None
            elapsed = _timed(run)
            after_kernels = _timed(_tiny_aten_calls) if name == "kernels, no autograd" else None
            warm = _timed(_tiny_aten_calls) if name == "kernels, no autograd" else None
            if rep >= 10:   # the first ten rounds are warm-up
                times[name].append(elapsed)
                if after_kernels is not None:
                    tiny["after the kernels"].append(after_kernels)
                    tiny["warm"].append(warm)
    med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    floor = med["gemm floor"]
    print(f"{args.head} head, Gaussian latents, B x d x k = {args.shape}, float32, {args.threads} threads, "
          f"{args.reps} interleaved rounds")
    for name, ms in med.items():
        print(f"  {name:22s} {ms:8.3f} ms  {ms / floor:5.2f}x the GEMM floor")
    cold_us, warm_us = (statistics.median(tiny[when]) * 1e6 for when in ("after the kernels", "warm"))
    print(f"  three tiny ATen calls: {cold_us:.1f} us right after the kernels, {warm_us:.1f} us warm "
          f"({cold_us / warm_us:.1f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
