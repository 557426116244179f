"""Companion 1 (elbo-converges-to-three-entropies.txt): the entropy sum of MATH.md §8, its
trainer metric, and their Fig. 1(a) experiment: the linear VAE trained with analytic_nll on
pPCA data converges to the closed-form pPCA optimum and to the entropy sum; with a wrong
fixed sigma^2 a finite gap remains."""

import math
import tempfile

import pytest
import torch

from silent_kernels import LatentMoments, analytic_nll
from silent_kernels.api.entropies import (entropy_gap, entropy_sum, expected_log_precision_sq,
                                          head_entropy_sum)
from silent_kernels.api.ppca import make_ppca_data, ppca_max_loglik, run_experiment, train_linear_vae
from silent_kernels.api.train import Trainer, make_config

TOL = 1e-3   # nats per sample


@pytest.fixture(scope="module")
def experiment():
    torch.set_num_threads(1)
    return run_experiment(n=500, dim=6, latent=2, seed=0, steps=300, keep=1000)


def test_linear_vae_converges_to_ppca_optimum_and_entropy_sum(experiment):
    fin = experiment["learned"]["final"]
    assert abs(fin["elbo"] - fin["ppca_max_loglik"]) <= TOL
    assert abs(fin["elbo"] - fin["entropy_sum"]) <= TOL
    assert fin["sigma2"] == pytest.approx(fin["sigma2_ml"], rel=1e-3)
    # the entropy sum of a linear VAE with x-independent tau^2 (their Eq. 33)
    eq33 = -0.5 * 6 * math.log(2 * math.pi * math.e * fin["sigma2"]) + 0.5 * sum(map(math.log, fin["tau2"]))
    assert fin["entropy_sum"] == pytest.approx(eq33, abs=1e-9)
    # recorded every step, and the ELBO never exceeds the maximum likelihood
    hist = experiment["learned"]["history"]
    assert hist["step"] == list(range(301))
    assert max(hist["elbo"]) <= fin["ppca_max_loglik"] + 1e-9


def test_wrong_fixed_sigma2_leaves_a_finite_gap(experiment):
    fin = experiment["fixed"]["final"]
    assert fin["sigma2"] == pytest.approx(0.04)
    assert abs(fin["gap"]) >= 0.1
    # the gap is the failed sigma^2-stationarity condition D/2 - E||x - g||^2 / (2 sigma^2)
    assert fin["gap"] == pytest.approx(fin["predicted_gap"], abs=TOL)
    assert fin["elbo"] < fin["ppca_max_loglik"] - 0.1


def test_ppca_closed_form_matches_direct_likelihood():
    data = make_ppca_data(300, 5, 2, seed=3)
    X = data["X"]
    ll, s2 = ppca_max_loglik(X, 2)
    Xc = X - X.mean(0)
    S = Xc.T @ Xc / X.shape[0]
    evals, evecs = torch.linalg.eigh(S)
    evals, evecs = evals.flip(0), evecs.flip(1)
    W = evecs[:, :2] * torch.sqrt(evals[:2] - s2)
    C = W @ W.T + s2 * torch.eye(5, dtype=X.dtype)
    direct = torch.distributions.MultivariateNormal(X.mean(0), C).log_prob(X).mean()
    assert ll == pytest.approx(float(direct), abs=1e-10)


def test_adam_minibatch_schedule_runs():
    data = make_ppca_data(200, 4, 1, seed=1)
    res = train_linear_vae(data["X"], 1, optimizer="adam", lr=1e-2, steps=50, batch_size=64, record_every=10)
    assert res["history"]["step"] == [0, 10, 20, 30, 40, 50]
    assert all(math.isfinite(v) for v in res["history"]["elbo"])
    assert res["history"]["elbo"][-1] > res["history"]["elbo"][0]


# ------------------------------------------------------------------ the entropy sum

def test_entropy_sum_fixed_and_per_pixel_variance():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    q = LatentMoments.gaussian(mu, logvar=logvar)
    k = 5
    want = 0.5 * logvar.sum(-1) - 0.5 * k * math.log(2 * math.pi * math.e * 0.3)
    assert torch.allclose(entropy_sum(q, k, sigma2=0.3), want)
    s2 = torch.full((k,), 0.3, dtype=torch.float64)
    assert torch.allclose(entropy_sum(q, k, sigma2=s2), want)
    assert entropy_sum(q, k, sigma2=0.3, reduction="mean") == pytest.approx(float(want.mean()))
    with pytest.raises(ValueError):
        entropy_sum(q, k)


@pytest.mark.parametrize("family", ["gaussian", "bernoulli"])
@pytest.mark.parametrize("log_term", ["taylor", "auto"])
def test_expected_log_precision_is_the_packages_log_term(family, log_term):
    """With a zero mean head and x = 0, analytic_nll is exactly sum_p (-0.5 E[log v^2]) +
    (k/2) log 2 pi with the package's own log term (Taylor asked for by name; "auto" is the
    exact term for Gaussian latents): ours must agree with it."""
    g = torch.Generator().manual_seed(1)
    B, d, k = 4, 3, 6
    if family == "gaussian":
        q = LatentMoments.gaussian(torch.randn(B, d, generator=g, dtype=torch.float64),
                                   logvar=torch.randn(B, d, generator=g, dtype=torch.float64) - 1)
    else:
        q = LatentMoments.bernoulli(logits=torch.randn(B, d, generator=g, dtype=torch.float64))
    C = 0.3 * torch.randn(k, d, generator=g, dtype=torch.float64)
    bp = 2 + torch.rand(k, generator=g, dtype=torch.float64)
    x = torch.zeros(B, k, dtype=torch.float64)
    nll = analytic_nll(x, q, torch.zeros(k, d, dtype=torch.float64), None, precision_weight=C,
                       precision_bias=bp, log_term=log_term, reduction="none", backend="torch")
    from_package = -2 * (nll - 0.5 * k * math.log(2 * math.pi))
    ours = expected_log_precision_sq(q, C, bp, log_term=log_term).sum(-1)
    assert torch.allclose(ours, from_package, rtol=1e-12, atol=1e-12)


def test_expected_log_precision_close_to_monte_carlo_for_small_spread():
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(2, 3, generator=g, dtype=torch.float64)
    logvar = torch.full((2, 3), math.log(0.01), dtype=torch.float64)
    C = 0.5 * torch.randn(4, 3, generator=g, dtype=torch.float64)
    bp = torch.full((4,), 3.0, dtype=torch.float64)
    z = mu + 0.1 * torch.randn(200_000, 2, 3, generator=g, dtype=torch.float64)
    mc = torch.log((z @ C.T + bp).square()).mean(0)
    ours = expected_log_precision_sq(LatentMoments.gaussian(mu, logvar=logvar), C, bp)
    assert torch.allclose(ours, mc, atol=2e-3)


# ------------------------------------------------------------------ trainer metric

TINY = dict(dataset="digits", train_limit=64, val_limit=32, latent_dim=4, enc_channels=[2, 3, 3],
            dec_channels=[2, 3, 3, 3, 3], batch_size=32, eval_batch_size=64, progress=False,
            figures=False, epochs=2, lr=1e-3)


@pytest.mark.parametrize("variance", ["fixed", "scalar", "learned"])
def test_trainer_logs_entropy_gap_for_the_linear_head(variance):
    cfg = make_config(None, {**TINY, "variance": variance})
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, d, log=lambda m: None)
        metrics = tr.fit()
        assert all(math.isfinite(m["val_entropy_gap"]) for m in metrics)
        last = metrics[-1]
        assert last["val_entropy_gap"] == pytest.approx(last["val_elbo"] - last["val_entropy_sum"])
        # the standalone helper agrees on the same (fixed-noise) evaluation images
        from silent_kernels.api.evaluate import eval_images
        x = eval_images(tr.data.val, "noise", cfg.seed)
        direct = entropy_gap(tr.model, x)
        assert direct["entropy_gap"] == pytest.approx(last["val_entropy_gap"], rel=1e-4, abs=1e-3)


def test_no_entropy_gap_for_bernoulli_latents_or_nonlinear_decoders():
    with tempfile.TemporaryDirectory() as d:
        m = Trainer(make_config(None, {**TINY, "epochs": 1, "latent": "bernoulli"}), d,
                    log=lambda m: None).fit()
    assert "val_entropy_gap" not in m[-1]
    with tempfile.TemporaryDirectory() as d:
        m = Trainer(make_config(None, {**TINY, "epochs": 1, "decoder": "nonlinear", "estimator": "reparam",
                                       "variance": "learned"}), d, log=lambda m: None).fit()
    assert "val_entropy_gap" not in m[-1]
    q = LatentMoments.bernoulli(probs=torch.full((2, 3), 0.3))
    from silent_kernels.api.models import AnalyticLinearDecoder
    assert head_entropy_sum(AnalyticLinearDecoder(3, (1, 2, 2)), q) is None
