"""The point of the method in one figure: the Monte Carlo encoder gradient's standard error
against its cost as the number of samples S grows, beside the analytic gradient's cost at
zero error.

    python -m bench.mc_variance            # writes bench/results/mc_variance.{png,json}

Set-up (MNIST-like, fixed sigma^2 = 0.01 linear decoder): x ~ U[0,1)^(B x k); a linear encoder
k -> (mu, logvar) for Gaussian latents or k -> logits for Bernoulli latents. The MC estimators
average S samples per data point: reparameterised Gaussian samples, and relaxed Bernoulli
samples (binary Concrete, temperature 0.5 — a biased estimator, so its bias is reported too).
Standard error = sqrt(sum over encoder parameters of the variance of the S-sample estimate),
from R independent estimates, relative to the norm of the exact (analytic) gradient.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from silent_kernels import LatentMoments, analytic_nll

from .problems import SIGMA2
from .providers import CONCRETE_TEMPERATURE

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _setup(latent: str, B: int, d: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, k, generator=g)
    out = 2 * d if latent == "gaussian" else d
    encoder = torch.nn.Linear(k, out)
    with torch.no_grad():
        encoder.weight.copy_(torch.randn(out, k, generator=g) * k ** -0.5)
        encoder.bias.zero_()
    decoder_w = torch.randn(k, d, generator=g) * d ** -0.5
    decoder_b = torch.full((k,), 0.5)
    return x, encoder, decoder_w, decoder_b


def _grad(encoder, loss) -> torch.Tensor:
    grads = torch.autograd.grad(loss, list(encoder.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def analytic_gradient(latent, x, encoder, w, b) -> torch.Tensor:
    h = encoder(x)
    if latent == "gaussian":
        mu, logvar = h.chunk(2, dim=-1)
        q = LatentMoments.gaussian(mu, logvar=logvar)
    else:
        q = LatentMoments.bernoulli(logits=h)
    return _grad(encoder, analytic_nll(x, q, w, b, sigma2=SIGMA2))


def mc_gradient(latent, x, encoder, w, b, samples: int) -> torch.Tensor:
    h = encoder(x)
    if latent == "gaussian":
        mu, logvar = h.chunk(2, dim=-1)
        eps = torch.randn(samples, *mu.shape)
        z = mu + torch.exp(0.5 * logvar) * eps
    else:
        u = torch.rand(samples, *h.shape).clamp_(1e-6, 1 - 1e-6)
        z = torch.sigmoid((h + torch.log(u) - torch.log1p(-u)) / CONCRETE_TEMPERATURE)
    mean = F.linear(z, w, b)
    nll = 0.5 * (x - mean).square() / SIGMA2 + 0.5 * math.log(2 * math.pi * SIGMA2)
    return _grad(encoder, nll.sum(-1).mean())  # mean over samples and batch


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def measure(latent: str, B: int, d: int, k: int, sample_counts, repeats: int) -> dict:
    x, encoder, w, b = _setup(latent, B, d, k)
    exact = analytic_gradient(latent, x, encoder, w, b)
    mc_gradient(latent, x, encoder, w, b, 1)  # warm-up
    analytic_times = [_timed(lambda: analytic_gradient(latent, x, encoder, w, b))[1] for _ in range(repeats)]
    # bit-identical on repetition: zero variance, not merely small
    assert torch.equal(exact, analytic_gradient(latent, x, encoder, w, b))
    norm = exact.norm().item()
    rows = []
    for S in sample_counts:
        mc_gradient(latent, x, encoder, w, b, S)  # warm-up
        runs = [_timed(lambda: mc_gradient(latent, x, encoder, w, b, S)) for _ in range(repeats)]
        grads = torch.stack([g for g, _ in runs])
        total_var = grads.var(dim=0, unbiased=True).sum().item()
        rows.append({"S": S, "seconds_median": statistics.median(t for _, t in runs),
                     "relative_standard_error": math.sqrt(total_var) / norm,
                     # ||mean - exact|| carries MC noise of about standard_error / sqrt(repeats)
                     "relative_bias": (grads.mean(0) - exact).norm().item() / norm,
                     "relative_bias_noise_floor": math.sqrt(total_var / repeats) / norm})
    return {"latent": latent, "analytic_seconds_median": statistics.median(analytic_times),
            "analytic_relative_standard_error": 0.0, "exact_grad_norm": norm, "mc": rows}


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    for ax, res in zip(axes[0], results):
        t = [1e3 * r["seconds_median"] for r in res["mc"]]
        se = [r["relative_standard_error"] for r in res["mc"]]
        ax.loglog(t, se, "o-", label="Monte Carlo, S samples: standard error")
        ax.loglog(t, [r["relative_bias"] for r in res["mc"]], "s:", color="C3", ms=4,
                  label="Monte Carlo: ||mean of estimates - exact|| (bias + noise)")
        for r, ti, si in zip(res["mc"], t, se):
            ax.annotate(f"S={r['S']}", (ti, si), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ta = 1e3 * res["analytic_seconds_median"]
        ax.axvline(ta, color="C2", ls="--", label=f"analytic: {ta:.2f} ms, error exactly 0")
        ax.set_xlabel("time per gradient estimate (ms)")
        ax.set_ylabel("standard error / ||exact gradient||")
        ax.set_title(f"{res['latent']} latents")
        ax.legend(fontsize=7, loc="lower left")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("Encoder-gradient error vs cost (linear decoder, sigma^2 = 0.01)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m bench.mc_variance", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="64x200x784", help="BxDxK")
    ap.add_argument("--samples", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--repeats", type=int, default=16, help="independent estimates per S")
    ap.add_argument("--out", default=RESULTS_DIR)
    args = ap.parse_args(argv)
    B, d, k = (int(v) for v in args.shape.split("x"))
    sample_counts = [int(s) for s in args.samples.split(",")]
    torch.manual_seed(0)
    results = [measure(lat, B, d, k, sample_counts, args.repeats) for lat in ("gaussian", "bernoulli")]
    os.makedirs(args.out, exist_ok=True)
    png, js = os.path.join(args.out, "mc_variance.png"), os.path.join(args.out, "mc_variance.json")
    plot(results, png)
    with open(js, "w") as fh:
        json.dump({"shape": args.shape, "threads": torch.get_num_threads(), "results": results}, fh, indent=1)
    print("| latents | S | ms per estimate | rel. standard error | rel. bias (noise floor) |\n"
          "|---|---:|---:|---:|---:|")
    for res in results:
        print(f"| {res['latent']} | analytic | {1e3 * res['analytic_seconds_median']:.2f} | 0 | 0 (0) |")
        for r in res["mc"]:
            print(f"| {res['latent']} | {r['S']} | {1e3 * r['seconds_median']:.2f} | "
                  f"{r['relative_standard_error']:.3g} | {r['relative_bias']:.3g} "
                  f"({r['relative_bias_noise_floor']:.2g}) |")
    print(f"\nfigure: {png}\nnumbers: {js}")
    return results


if __name__ == "__main__":
    main()
