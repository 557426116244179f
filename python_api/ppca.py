"""Companion result 1, experiment: the linear VAE on probabilistic-PCA data
(``elbo-converges-to-three-entropies.txt``, Fig. 1(a) and Appendix C.1).

Data: x = W_gen z + mu_gen + sigma_gen * eps with z ~ N(0, I_q), entries of W_gen and
mu_gen ~ U(0, 1) and sigma_gen = 0.1 (their Appendix C.1: q = H = 2, D = 10, 10,000 points).

Model (their Eqs. 29-32): prior N(0, I); linear encoder q(z|x) = N(V x + c, diag(tau^2))
with a per-dimension learned log-variance ``logvar`` (tau^2 does not depend on x); linear
decoder N(x; W z + b, sigma^2 I) with learned scalar sigma^2 (or sigma^2 held fixed). The
negative ELBO is exact: ``analytic_nll`` (fixed-variance head, sigma^2 a learnable tensor)
plus the analytic Gaussian KL, so the run is deterministic (full batch by default, float64)
and L-BFGS applies. Their run estimated the ELBO with 100 samples and Adam (lr 1e-3, batch
2000); ``optimizer="adam"`` with ``batch_size`` reproduces that schedule without sampling.

Recorded per step: the ELBO, the three-entropies sum of MATH.md §8 (``entropies``), their gap,
and the closed-form pPCA maximum log-likelihood of the same data (MATH.md §7). At the optimum
the three agree (the linear VAE's diagonal posterior is exact at the pPCA solution, Lucas
et al. 2019); with sigma^2 held at a wrong value the gap stays finite and equals
D/2 - E_q||x - g(z)||^2 / (2 sigma^2) (the sigma^2-stationarity condition that fails), which
``predicted_gap`` reports.

    python -m silent_kernels.api.ppca --n 500 --dim 6 --latent 2
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Optional

import torch
from torch import Tensor, nn

from silent_kernels import LatentMoments, analytic_nll
from silent_kernels.moments import LOG_2PI

from .entropies import entropy_sum

__all__ = ["make_ppca_data", "ppca_max_loglik", "gaussian_loglik", "LinearVAE", "train_linear_vae",
           "run_experiment", "ppca_figure"]



def make_ppca_data(n: int, dim: int, latent: int, *, sigma_gen: float = 0.1, seed: int = 0,
                   n_test: int = 0, dtype=torch.float64) -> dict:
    """Samples of the pPCA generative model (their Eqs. 77-78) and its parameters."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.rand(dim, latent, generator=gen, dtype=dtype)
    mu = torch.rand(dim, generator=gen, dtype=dtype)

    def draw(m):
        z = torch.randn(m, latent, generator=gen, dtype=dtype)
        return z @ W.T + mu + sigma_gen * torch.randn(m, dim, generator=gen, dtype=dtype)

    out = {"X": draw(n), "W": W, "mu": mu, "sigma2": sigma_gen ** 2}
    if n_test:
        out["X_test"] = draw(n_test)
    return out


def ppca_max_loglik(X: Tensor, latent: int) -> tuple[float, float]:
    """(max log-likelihood per sample, sigma^2_ML) of pPCA with ``latent`` components
    (Tipping & Bishop 1999; MATH.md §7), from the 1/N sample covariance."""
    X = X.double()
    n, dim = X.shape
    if not 0 < latent < dim:
        raise ValueError(f"need 0 < latent < dim, got latent={latent}, dim={dim}")
    Xc = X - X.mean(0)
    evals = torch.linalg.eigvalsh(Xc.T @ Xc / n).flip(0)
    s2 = float(evals[latent:].mean())
    ll = -0.5 * (dim * LOG_2PI + float(torch.log(evals[:latent]).sum()) + (dim - latent) * math.log(s2)
                 + dim)
    return ll, s2


def gaussian_loglik(X: Tensor, mean: Tensor, cov: Tensor) -> float:
    """Mean log N(x; mean, cov) over the rows of X."""
    dist = torch.distributions.MultivariateNormal(mean.double(), covariance_matrix=cov.double())
    return float(dist.log_prob(X.double()).mean())


class LinearVAE(nn.Module):
    """Their Eqs. 29-32: linear encoder mean, per-dimension learned log-variance, linear
    decoder with a learned (or fixed) scalar variance."""

    def __init__(self, dim: int, latent: int, *, sigma2: float = 1.0, learn_sigma2: bool = True,
                 dtype=torch.float64):
        super().__init__()
        self.encoder = nn.Linear(dim, latent, dtype=dtype)
        self.logvar = nn.Parameter(torch.zeros(latent, dtype=dtype))
        self.decoder = nn.Linear(latent, dim, dtype=dtype)
        log_s2 = torch.tensor(math.log(sigma2), dtype=dtype)
        if learn_sigma2:
            self.log_sigma2 = nn.Parameter(log_s2)
        else:
            self.register_buffer("log_sigma2", log_s2)

    @property
    def sigma2(self) -> Tensor:
        return torch.exp(self.log_sigma2)

    def moments(self, X: Tensor) -> LatentMoments:
        mu = self.encoder(X)
        return LatentMoments.gaussian(mu, logvar=self.logvar.expand_as(mu))

    def terms(self, X: Tensor) -> dict:
        """Per-sample means of the exact ELBO, the entropy sum and E_q||x - g(z)||^2."""
        q = self.moments(X)
        nll = analytic_nll(X, q, self.decoder.weight, self.decoder.bias, sigma2=self.sigma2,
                           reduction="mean")
        kl = 0.5 * (q.mean.square() + q.var - self.logvar - 1).sum(-1).mean()
        elbo = -(nll + kl)
        dim = X.shape[1]
        ent = entropy_sum(q, dim, sigma2=self.sigma2, reduction="mean")
        # E||x - g||^2 = 2 sigma^2 (nll - (D/2) log(2 pi sigma^2))
        sq = 2 * self.sigma2 * (nll - 0.5 * dim * torch.log(2 * math.pi * self.sigma2))
        return {"elbo": elbo, "entropy_sum": ent, "sq_err": sq}


def _downsample(n: int, keep: int = 400) -> list:
    """Indices 0..n-1: all when n <= keep, else a log-spaced subset with the ends."""
    if n <= keep:
        return list(range(n))
    idx = {0, n - 1}
    idx.update(int(round(math.exp(t * math.log(n) / (keep - 1)))) - 1 for t in range(keep))
    return sorted(i for i in idx if 0 <= i < n)


def train_linear_vae(X: Tensor, latent: int, *, sigma2: Optional[float] = None,
                     optimizer: str = "lbfgs", steps: int = 300, lr: Optional[float] = None,
                     batch_size: Optional[int] = None, seed: int = 0, init_sigma2: float = 1.0,
                     record_every: int = 1) -> dict:
    """Train the linear VAE on X (N, D) and return its history and final values.

    ``sigma2=None`` learns the decoder variance; a number holds it fixed there.
    ``optimizer``: "lbfgs" (full batch, strong-Wolfe line search; ``steps`` iterations) or
    "adam" (``lr`` default 1e-3, minibatches of ``batch_size`` rows, default full batch).
    The ELBO, entropy sum and gap are recorded on the full training set every
    ``record_every`` steps (and after the last).
    """
    X = X.to(torch.float64)
    n, dim = X.shape
    torch.manual_seed(seed)
    model = LinearVAE(dim, latent, sigma2=init_sigma2 if sigma2 is None else sigma2,
                      learn_sigma2=sigma2 is None)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed + 1)
    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(params, lr=1.0 if lr is None else lr, max_iter=1, max_eval=40,
                                history_size=50,
                                tolerance_grad=1e-12, tolerance_change=1e-15,
                                line_search_fn="strong_wolfe")
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=1e-3 if lr is None else lr)
    else:
        raise ValueError(f"optimizer: expected 'lbfgs' or 'adam', got {optimizer!r}")

    ll_ml, s2_ml = ppca_max_loglik(X, latent)
    hist = {k: [] for k in ("step", "elbo", "entropy_sum", "gap", "sigma2")}

    def record(step):
        with torch.no_grad():
            t = model.terms(X)
        hist["step"].append(step)
        hist["elbo"].append(float(t["elbo"]))
        hist["entropy_sum"].append(float(t["entropy_sum"]))
        hist["gap"].append(float(t["elbo"] - t["entropy_sum"]))
        hist["sigma2"].append(float(model.sigma2.detach()))

    t0 = time.perf_counter()
    record(0)
    for step in range(1, steps + 1):
        if optimizer == "lbfgs":
            def closure():
                opt.zero_grad()
                loss = -model.terms(X)["elbo"]
                loss.backward()
                return loss
            opt.step(closure)
        else:
            rows = X if not batch_size or batch_size >= n else \
                X[torch.randint(0, n, (batch_size,), generator=gen)]
            opt.zero_grad()
            (-model.terms(rows)["elbo"]).backward()
            opt.step()
        if step % record_every == 0 or step == steps:
            record(step)
    wall = time.perf_counter() - t0
    with torch.no_grad():
        t = model.terms(X)
    elbo, ent = float(t["elbo"]), float(t["entropy_sum"])
    s2 = float(model.sigma2.detach())
    return {
        "history": hist,
        "final": {"elbo": elbo, "entropy_sum": ent, "gap": elbo - ent, "ppca_max_loglik": ll_ml,
                  "elbo_minus_ppca": elbo - ll_ml, "sigma2": s2, "sigma2_ml": s2_ml,
                  "predicted_gap": 0.5 * dim - float(t["sq_err"]) / (2 * s2),
                  "tau2": torch.exp(model.logvar.detach()).tolist()},
        "learn_sigma2": sigma2 is None, "optimizer": optimizer, "steps": steps, "lr": lr,
        "batch_size": batch_size, "seed": seed, "wall_time_s": wall, "model": model,
    }


def run_experiment(*, n: int = 10_000, dim: int = 10, latent: int = 2, sigma_gen: float = 0.1,
                   seed: int = 0, optimizer: str = "lbfgs", steps: int = 300, lr: Optional[float] = None,
                   batch_size: Optional[int] = None, wrong_sigma2: Optional[float] = None,
                   n_test: int = 0, keep: int = 150) -> dict:
    """Fig. 1(a): one data set, the learned-sigma^2 run and the wrong-fixed-sigma^2 run.
    Returns a JSON-ready dict (histories downsampled to at most ``keep`` points).
    ``wrong_sigma2`` defaults to 4 sigma_gen^2."""
    data = make_ppca_data(n, dim, latent, sigma_gen=sigma_gen, seed=seed, n_test=n_test)
    X = data["X"]
    wrong = 4 * sigma_gen ** 2 if wrong_sigma2 is None else wrong_sigma2
    gt_cov = data["W"] @ data["W"].T + data["sigma2"] * torch.eye(dim, dtype=X.dtype)
    out = {"setting": {"n": n, "dim": dim, "latent": latent, "sigma_gen": sigma_gen, "seed": seed,
                       "optimizer": optimizer, "steps": steps, "lr": lr, "batch_size": batch_size,
                       "wrong_sigma2": wrong, "dtype": "float64"},
           "ground_truth_loglik": gaussian_loglik(X, data["mu"], gt_cov)}
    for name, s2 in (("learned", None), ("fixed", wrong)):
        res = train_linear_vae(X, latent, sigma2=s2, optimizer=optimizer, steps=steps, lr=lr,
                               batch_size=batch_size, seed=seed)
        model = res.pop("model")
        if n_test:
            with torch.no_grad():
                res["final"]["test_elbo"] = float(model.terms(data["X_test"])["elbo"])
        idx = _downsample(len(res["history"]["step"]), keep)
        res["history"] = {k: [v[i] for i in idx] for k, v in res["history"].items()}
        out[name] = res
    return out


def ppca_figure(results: list, path: str, title: Optional[str] = None) -> str:
    """Their Fig. 1(a) from ``run_experiment`` outputs: top, ELBO / entropy sum / pPCA
    optimum per step for the first seed (solid: learned sigma^2; dashed: fixed wrong
    sigma^2); bottom, |ELBO - entropy sum| and |ELBO - pPCA optimum| for every seed (log)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .plots import save_figure

    fig = Figure(figsize=(10, 3.6))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    r0 = results[0]
    ml = r0["learned"]["final"]["ppca_max_loglik"]
    for name, style in (("learned", "-"), ("fixed", "--")):
        h = r0[name]["history"]
        steps = [max(s, 1) for s in h["step"]]
        ax1.plot(steps, h["elbo"], style, color="C0", label=f"ELBO ({name} $\\sigma^2$)")
        ax1.plot(steps, h["entropy_sum"], style, color="C1", label=f"entropy sum ({name} $\\sigma^2$)")
    ax1.axhline(ml, color="k", lw=0.8, label="pPCA max log-lik")
    ax1.set_xscale("log")
    lo = min(ml, *(min(r0[n]["history"]["elbo"][-len(r0[n]["history"]["elbo"]) // 2:])
                   for n in ("learned", "fixed")))
    ax1.set_ylim(lo - 0.5 * abs(lo) - 1, ml + 0.1 * abs(ml) + 1)
    ax1.set_xlabel("step")
    ax1.set_ylabel("nats per sample")
    ax1.legend(fontsize=7)
    for i, r in enumerate(results):
        h = r["learned"]["history"]
        steps = [max(s, 1) for s in h["step"]]
        mlr = r["learned"]["final"]["ppca_max_loglik"]
        ax2.plot(steps, [abs(g) + 1e-16 for g in h["gap"]], color="C1", alpha=0.7,
                 label="|ELBO - entropy sum|" if i == 0 else None)
        ax2.plot(steps, [abs(e - mlr) + 1e-16 for e in h["elbo"]], color="C0", alpha=0.7,
                 label="|ELBO - pPCA optimum|" if i == 0 else None)
        hf = r["fixed"]["history"]
        ax2.plot([max(s, 1) for s in hf["step"]], [abs(g) + 1e-16 for g in hf["gap"]], "--",
                 color="C3", alpha=0.7, label="|gap|, fixed wrong $\\sigma^2$" if i == 0 else None)
    ax2.axhline(1e-3, color="k", lw=0.6, ls=":")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("step")
    ax2.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="The linear VAE on pPCA data (three-entropies Fig. 1(a)).")
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=10)
    p.add_argument("--latent", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer", choices=("lbfgs", "adam"), default="lbfgs")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--figure", default=None, help="write the figure here (png)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    res = run_experiment(n=args.n, dim=args.dim, latent=args.latent, seed=args.seed,
                         optimizer=args.optimizer, steps=args.steps, lr=args.lr,
                         batch_size=args.batch_size)
    print(json.dumps({"ground_truth_loglik": res["ground_truth_loglik"],
                      "learned": res["learned"]["final"], "fixed": res["fixed"]["final"]}, indent=2))
    if args.figure:
        print(ppca_figure([res], args.figure))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
