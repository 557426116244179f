"""BPD / MSE / KLD conventions (MATH.md §9) on hand-computable models."""

import math

import pytest
import torch
from torch import nn

from silent_kernels.api.evaluate import bits_per_dim, eval_images, evaluate
from silent_kernels.api.models import AnalyticLinearDecoder, ConvDecoder, VAE
from silent_kernels.api.train import make_config


class ConstEncoder(nn.Module):
    """Posterior parameters independent of x."""

    def __init__(self, params):
        super().__init__()
        self.params = nn.Parameter(torch.as_tensor(params, dtype=torch.float32))

    def forward(self, x):
        return self.params.expand(x.shape[0], -1)


def test_bits_per_dim_formula():
    k = 784
    # a model assigning density 1 to every y in [0,1)^k (NLL = 0, KL = 0) has 8 bits/dim
    assert bits_per_dim(0.0, 0.0, k) == 8.0
    assert bits_per_dim(k * math.log(2), 0.0, k) == pytest.approx(9.0)
    assert bits_per_dim(-k * math.log(2), k * math.log(2), k) == pytest.approx(8.0)


def test_fixed_variance_linear_head_by_hand():
    k, c, s2 = 4, 0.25, 0.1
    head = AnalyticLinearDecoder(2, (1, 2, 2), "fixed", sigma2=s2)
    with torch.no_grad():
        head.mu.weight.zero_()
        head.mu.bias.fill_(c)
    model = VAE(ConstEncoder([0.0, 0.0, 0.0, 0.0]), "gaussian", linear=head)   # q = N(0, I) = prior
    images = torch.tensor([[0, 64, 128, 255], [10, 20, 30, 40]], dtype=torch.uint8).reshape(2, 1, 2, 2)
    cfg = make_config(None, dict(eval_dequant="center", latent_dim=2))
    res = evaluate(model, images, cfg)
    y = (images.double() + 0.5) / 256
    sq = (y - c).square().flatten(1).sum(1)
    nll = sq / (2 * s2) + 0.5 * k * math.log(2 * math.pi * s2)
    assert res["kld"] == pytest.approx(0.0, abs=1e-7)
    assert res["mse"] == pytest.approx(sq.mean().item(), rel=1e-6)
    assert res["nll"] == pytest.approx(nll.mean().item(), rel=1e-6)
    assert res["bpd"] == pytest.approx(nll.mean().item() / (k * math.log(2)) + 8, rel=1e-6)
    assert res["elbo"] == pytest.approx(-nll.mean().item(), rel=1e-6)


def test_latent_variance_enters_nll_not_mse():
    # W = 1 column of ones: E||y - W z - b||^2 = ||y - b - W mu||^2 + k var
    head = AnalyticLinearDecoder(1, (1, 1, 3), "fixed", sigma2=1.0)
    with torch.no_grad():
        head.mu.weight.fill_(1.0)
        head.mu.bias.zero_()
    mu, var = 0.2, 0.5
    model = VAE(ConstEncoder([mu, math.log(var)]), "gaussian", linear=head)
    images = torch.tensor([[[[100, 50, 200]]]], dtype=torch.uint8)
    res = evaluate(model, images, make_config(None, dict(eval_dequant="center", latent_dim=1)))
    y = (images.double().flatten() + 0.5) / 256
    sq = (y - mu).square().sum().item()
    assert res["mse"] == pytest.approx(sq, rel=1e-6)
    assert res["mse_expected"] == pytest.approx(sq + 3 * var, rel=1e-6)   # the other MSE reading
    assert res["nll"] == pytest.approx((sq + 3 * var) / 2 + 1.5 * math.log(2 * math.pi), rel=1e-6)
    # the report recovers the expected one from a fixed-variance NLL: 2 s2 (NLL - k/2 log(2 pi s2))
    assert 2 * (res["nll"] - 1.5 * math.log(2 * math.pi)) == pytest.approx(res["mse_expected"], rel=1e-5)
    assert "floor_fraction" not in res
    kl = 0.5 * (mu ** 2 + var - 1 - math.log(var))
    assert res["kld"] == pytest.approx(kl, rel=1e-5)


def test_bernoulli_kld_by_hand():
    p = 0.75
    head = AnalyticLinearDecoder(3, (1, 2, 2), "fixed")
    model = VAE(ConstEncoder([math.log(p / (1 - p))] * 3), "bernoulli", linear=head)
    res = evaluate(model, torch.zeros(4, 1, 2, 2, dtype=torch.uint8),
                   make_config(None, dict(latent="bernoulli", latent_dim=3)))
    per_latent = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert res["kld"] == pytest.approx(3 * per_latent, rel=1e-5)


def _nonlinear_model(n_images: int, samples: int):
    torch.manual_seed(0)
    dec = ConvDecoder(2, (1, 28, 28), "learned", channels=(2, 2, 2, 2, 2))
    model = VAE(ConstEncoder([0.1, -0.2, -1.0, -2.0]), "gaussian", nonlinear=dec)
    images = torch.randint(0, 256, (n_images, 1, 28, 28), dtype=torch.uint8)
    cfg = make_config(None, dict(decoder="nonlinear", estimator="reparam", latent_dim=2, eval_samples=samples))
    return dec, model, images, cfg


def test_nonlinear_decoder_metrics_and_fixed_eval_noise():
    dec, model, images, cfg = _nonlinear_model(6, 3)
    a, b = evaluate(model, images, cfg), evaluate(model, images, cfg)
    assert a == b                                    # fixed-seed noise and latent draws
    y = eval_images(images, "noise", cfg.seed)
    with torch.no_grad():
        mean = dec(model.encoder(y)[:, :2])[0]
    assert a["mse"] == pytest.approx((y - mean).square().flatten(1).sum(1).mean().item(), rel=1e-5)
    assert a["bpd"] == pytest.approx(bits_per_dim(a["nll"], a["kld"], 784))
    assert torch.all((y >= 0) & (y < 1))


def _learned_model(variance, latent, log_term="taylor"):
    torch.manual_seed(0)
    head = AnalyticLinearDecoder(3, (1, 2, 2), variance, sigma2=0.05, log_term=log_term)
    if variance == "learned":
        with torch.no_grad():          # E[v] near 0 relative to sd(v): where the Taylor term errs
            head.alpha.bias.fill_(0.3)
            head.alpha.weight.normal_()
    params = [0.3, -0.2, 0.1, -1.0, -0.5, -2.0] if latent == "gaussian" else [0.3, -1.2, 2.0]
    return VAE(ConstEncoder(params), latent, linear=head)


def test_linear_learned_variance_bpd_is_a_bound_or_labelled():
    images = torch.randint(0, 256, (5, 1, 2, 2), dtype=torch.uint8)
    cfg = make_config(None, {"decoder": "linear", "variance": "learned", "eval_samples": 4000})
    # Gaussian latents, trained with the Taylor term: evaluated exactly, Taylor value beside it
    out = evaluate(_learned_model("learned", "gaussian"), images, cfg)
    assert out["bpd_kind"] == "exact" and "bpd_taylor" in out and "bpd_sampled" not in out
    assert out["bpd_taylor"] < out["bpd"] - 0.01     # the Taylor term understates the NLL
    exact_model = _learned_model("learned", "gaussian", log_term="exact")
    assert "bpd_taylor" not in evaluate(exact_model, images, cfg)
    # Bernoulli latents: no closed form; the Taylor value is labelled, a sampled bound beside it
    out = evaluate(_learned_model("learned", "bernoulli"), images, cfg)
    assert out["bpd_kind"] == "taylor-approximation"
    assert abs(out["bpd_sampled"] - out["bpd"]) < 0.5
    # the log-variance head is exact for both families, and equals a Monte Carlo estimate
    for latent in ("gaussian", "bernoulli"):
        model = _learned_model("logvar", latent)
        out = evaluate(model, images, cfg)
        assert out["bpd_kind"] == "exact"
        y = eval_images(images, "noise", 0)
        post = model.posterior(y)
        u = torch.randn(20000, *post.mean.shape) if latent == "gaussian" else torch.rand(20000, *post.mean.shape)
        with torch.no_grad():
            mc = model.linear.sample_nll(y, post.hard_sample(u)).mean()
        assert abs(float(mc) - out["nll"]) < 0.05 * abs(out["nll"]) + 0.5


@pytest.mark.parametrize("latent", ["bernoulli", "categorical"])
def test_expected_squared_error_of_a_linear_head_against_sampling(latent):
    torch.manual_seed(1)
    d = 6
    head = AnalyticLinearDecoder(d, (1, 2, 2), "fixed")
    model = VAE(ConstEncoder(torch.randn(d)), latent, linear=head, categories=3 if latent == "categorical" else 2)
    y = torch.rand(3, 1, 2, 2)
    with torch.no_grad():
        post = model.posterior(y)
        exact = head.expected_sq_error(y, post.moments())
        z = post.distribution().sample((200_000,))
        z = z.flatten(-2) if latent == "categorical" else z
        sampled = (y - head(z)[0]).square().flatten(-3).sum(-1).mean(0)
    torch.testing.assert_close(exact, sampled, rtol=1e-2, atol=0)


def test_floor_fraction_of_a_nonlinear_learned_variance_decoder():
    dec, model, images, cfg = _nonlinear_model(4, 2)
    assert evaluate(model, images, cfg)["floor_fraction"] == 0.0       # starts at log(0.01), far above
    with torch.no_grad():
        dec.net[-1].bias[1:].fill_(-60.0)                              # raw far below the floor
    res = evaluate(model, images, cfg)
    assert res["floor_fraction"] > 0.99
    assert res["mse_expected"] > 0


def test_importance_weighted_bound_is_exact_at_the_true_posterior():
    # linear Gaussian model with orthogonal columns: the true posterior is mean-field, so with
    # q = p(z|y) every importance weight equals p(y) and the bound is log p(y) for any S
    from silent_kernels.api.evaluate import importance_weighted_bound
    s2, b = 0.05, 0.3
    w = torch.tensor([[0.8, 0.0], [0.0, 0.5], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    head = AnalyticLinearDecoder(2, (1, 2, 2), "fixed", sigma2=s2)
    with torch.no_grad():
        head.mu.weight.copy_(w)
        head.mu.bias.fill_(b)
    images = torch.tensor([[[[200, 30], [90, 140]]]], dtype=torch.uint8)
    y = ((images.double() + 0.5) / 256).flatten()
    cov = torch.linalg.inv(torch.eye(2, dtype=torch.float64) + w.T @ w / s2)
    mu = cov @ w.T @ (y - b) / s2
    model = VAE(ConstEncoder([*mu.tolist(), *cov.diagonal().log().tolist()]), "gaussian", linear=head)
    cfg = make_config(None, dict(eval_dequant="center", latent_dim=2))
    marginal = torch.distributions.MultivariateNormal(torch.full((4,), b, dtype=torch.float64),
                                                      w @ w.T + s2 * torch.eye(4, dtype=torch.float64))
    exact_nll = -marginal.log_prob(y).item()
    for samples in (1, 7):
        res = importance_weighted_bound(model, images, cfg, samples=samples)
        assert res["nll"] == pytest.approx(exact_nll, abs=2e-4)
        assert res["bpd"] == pytest.approx(bits_per_dim(exact_nll, 0.0, 4), abs=1e-4)
    # away from the true posterior the bound is looser than log p(y) and tightens with S
    model.encoder.params.data[0] += 1.0
    many = images.expand(400, -1, -1, -1)          # averages over 400 independent estimates
    loose = [importance_weighted_bound(model, many, cfg, samples=s)["nll"] for s in (1, 100)]
    elbo_nll = evaluate(model, images, cfg)
    assert loose[0] == pytest.approx(elbo_nll["nll"] + elbo_nll["kld"], abs=0.05)   # S = 1: the ELBO
    assert loose[0] > loose[1] > exact_nll - 1e-3
    assert loose[1] - exact_nll < 0.5 * (loose[0] - exact_nll)
    with pytest.raises(ValueError, match="samples"):
        importance_weighted_bound(model, images, cfg, samples=0)
