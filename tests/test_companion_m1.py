"""Companion 2 (variational-score-matching-failure.txt, Prop. 3.1): the analytic M1 objective
of the linear decoder equals its definition E_q[0.5 ||grad_x log p(x|z)||^2 + div_x grad_x
log p(x|z)] (brute-force Monte Carlo with autograd scores), its gamma-profile is h_F, the
gradients split as stated (decoder: M1, encoder: negative ELBO), and the trainer runs it."""

import math
import tempfile

import pytest
import torch

from silent_kernels import LatentMoments
from silent_kernels.api import cli
from silent_kernels.api.models import AnalyticLinearDecoder, Posterior
from silent_kernels.api.objectives import (expected_sq_error, m1_loss, m1_profiled, m1_reconstruction)
from silent_kernels.api.train import Trainer, make_config


def _head(d=3, shape=(1, 1, 5), variance="scalar", sigma2=0.4, seed=0):
    torch.manual_seed(seed)
    head = AnalyticLinearDecoder(d, shape, variance=variance, sigma2=sigma2, backend="torch").double()
    return head


def test_expected_sq_error_is_the_fixed_variance_quantity():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    q = LatentMoments.gaussian(torch.randn(4, 3, generator=g, dtype=torch.float64),
                               logvar=torch.randn(4, 3, generator=g, dtype=torch.float64))
    W = torch.randn(6, 3, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    want = ((x - (q.mean @ W.T + b)).square() + q.var @ W.square().T).sum(-1)
    for backend in ("torch", "auto"):
        assert torch.allclose(expected_sq_error(x, q, W, b, backend=backend), want, rtol=1e-12)


def test_m1_equals_its_definition_by_brute_force_monte_carlo():
    """Scores s = grad_x log N(x; W z + b, gamma I) and their divergence by autograd, averaged
    over R draws z ~ q; the analytic M1 must lie within 4 standard errors per image."""
    head = _head()
    g = torch.Generator().manual_seed(1)
    B, d, k, R = 3, 3, 5, 20_000
    x = torch.randn(B, 1, 1, k, generator=g, dtype=torch.float64)
    mu = torch.randn(B, d, generator=g, dtype=torch.float64)
    logvar = torch.randn(B, d, generator=g, dtype=torch.float64) - 0.5
    post = Posterior("gaussian", torch.cat([mu, logvar], -1))
    gamma = float(head._sigma2().detach())
    with torch.no_grad():
        analytic = m1_reconstruction(x, post, head, scale=1.0).m1

    z = mu + torch.exp(0.5 * logvar) * torch.randn(R, B, d, generator=g, dtype=torch.float64)
    xr = x.reshape(1, B, k).expand(R, B, k).clone().requires_grad_(True)
    with torch.no_grad():
        mean = z @ head.mu.weight.T + head.mu.bias
    logp = torch.distributions.Normal(mean, math.sqrt(gamma)).log_prob(xr).sum()
    (score,) = torch.autograd.grad(logp, xr, create_graph=True)
    div = sum(torch.autograd.grad(score[..., p].sum(), xr, retain_graph=True)[0][..., p] for p in range(k))
    per_draw = (0.5 * score.square().sum(-1) + div).detach()          # (R, B)
    mc, se = per_draw.mean(0), per_draw.std(0) / math.sqrt(R)
    assert torch.all((analytic - mc).abs() <= 4 * se), (analytic, mc, se)
    # and the closed form of the divergence term: -k / gamma
    assert torch.allclose(div.detach(), torch.full_like(div, -k / gamma))


def test_m1_profile_over_gamma_is_h_F():
    L = torch.tensor(7.3, dtype=torch.float64)
    k = 5
    gammas = torch.logspace(-2, 2, 20001, dtype=torch.float64)
    brute = m1_loss(L, gammas, k).min()
    assert float(brute) == pytest.approx(float(m1_profiled(L, k)), rel=1e-6)
    assert float(m1_loss(L, L / k, k)) == pytest.approx(float(m1_profiled(L, k)), rel=1e-12)


def test_m1_gradients_split_between_encoder_and_decoder():
    """Encoder inputs get the negative-ELBO gradient, decoder parameters the M1 gradient."""
    head = _head()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 1, 1, 5, generator=g, dtype=torch.float64)
    params = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    post = Posterior("gaussian", params)
    terms = m1_reconstruction(x, post, head, scale=0.25)
    terms.loss.backward()
    got_enc, got_W = params.grad.clone(), head.mu.weight.grad.clone()
    got_s = head.log_sigma2.grad.clone()

    p2 = params.detach().clone().requires_grad_(True)
    nll = head.nll(x, Posterior("gaussian", p2).moments())
    (want_enc,) = torch.autograd.grad(nll.sum() * 0.25, p2)
    q = Posterior("gaussian", params.detach()).moments()
    sq = expected_sq_error(x, q, head.mu.weight, head.mu.bias, backend="torch")
    m1 = m1_loss(sq, head._sigma2(), 5).sum() * 0.25
    want_W, want_s = torch.autograd.grad(m1, [head.mu.weight, head.log_sigma2])
    assert torch.allclose(got_enc, want_enc)
    assert torch.allclose(got_W, want_W)
    assert torch.allclose(got_s, want_s)
    assert torch.allclose(terms.nll, nll.detach())


TINY = dict(dataset="digits", train_limit=96, val_limit=32, latent_dim=6, enc_channels=[2, 3, 3],
            dec_channels=[2, 3, 3, 3, 3], batch_size=32, eval_batch_size=64, progress=False,
            figures=False, objective="m1", variance="scalar", epochs=4, lr=3e-3)


def test_trainer_m1_tiny_run_is_finite_and_decreasing():
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        metrics = Trainer(make_config(None, TINY), d, log=lambda m: None).fit()
    m1 = [m["train_m1"] for m in metrics]
    assert all(math.isfinite(v) for v in m1)
    assert all(b < a for a, b in zip(m1, m1[1:])), m1
    assert all(math.isfinite(m["train_loss"]) and math.isfinite(m["val_bpd"]) for m in metrics)
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]   # the negative ELBO falls too


@pytest.mark.parametrize("bad", [dict(decoder="nonlinear", estimator="reparam"), dict(variance="learned"),
                                 dict(estimator="reparam"), dict(objective="fisher")])
def test_m1_config_validation(bad):
    with pytest.raises(ValueError):
        make_config(None, {**TINY, **bad})


def test_cli_accepts_objective_flag():
    args = cli.build_parser().parse_args(["train", "--objective", "m1", "--variance", "scalar"])
    assert args.objective == "m1"
    with pytest.raises((SystemExit, ValueError)):   # argparse's exit, or a usage error
        cli.build_parser().parse_args(["train", "--objective", "fisher"])
