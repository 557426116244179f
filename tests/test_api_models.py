"""silent_kernels.api.models: shapes (paper Tables 5-8), the linear heads against Monte Carlo,
the log-variance floor, posteriors and KL."""

import math

import pytest
import torch
from torch import distributions as D

from silent_kernels.api.models import (LOGVAR_FLOOR, AnalyticLinearDecoder, ConvDecoder, ConvEncoder,
                                       Posterior, StridedDecoder, StridedEncoder, build_model)
from silent_kernels.api.train import make_config


@pytest.mark.parametrize("latent,mult", [("gaussian", 2), ("bernoulli", 1)])
def test_conv_encoder_table5_shapes(latent, mult):
    enc = ConvEncoder((1, 28, 28), 7, latent, channels=(2, 3, 4))
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.padding) for c in convs] == [((3, 3), (1, 1), (1, 1))] * 3
    assert enc.head.in_features == 4 * 28 * 28
    assert enc(torch.rand(5, 1, 28, 28)).shape == (5, mult * 7)


def test_strided_encoder_table7_shapes():
    enc = StridedEncoder((3, 32, 32), 6, "gaussian", channels=(4, 5, 6, 7))
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.padding) for c in convs] == \
        [((4, 4), (2, 2), (1, 1))] * 3 + [((4, 4), (1, 1), (0, 0))]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules()) == 4
    assert enc(torch.rand(3, 3, 32, 32)).shape == (3, 12)
    with pytest.raises(ValueError, match="32x32"):
        StridedEncoder((1, 28, 28), 6)


@pytest.mark.parametrize("variance", ["fixed", "scalar", "learned"])
def test_nonlinear_decoders_shapes_and_floor(variance):
    dec = ConvDecoder(5, (1, 28, 28), variance, channels=(2, 3, 3, 3, 3))
    z = torch.randn(4, 5)
    mean, logvar = dec(z)
    assert mean.shape == logvar.shape == (4, 1, 28, 28)
    assert dec(torch.randn(2, 4, 5))[0].shape == (2, 4, 1, 28, 28)     # (S, B, d) samples
    x = torch.rand(4, 1, 28, 28)
    assert dec.sample_nll(x, z).shape == (4,)
    sdec = StridedDecoder(5, (3, 32, 32), variance, channels=(8, 4, 4, 4))
    assert sdec(z)[0].shape == (4, 3, 32, 32)
    if variance == "learned":
        with torch.no_grad():
            dec.net[-1].bias.fill_(-1e4)            # drive the raw log-variance far below the floor
        assert torch.all(dec(z)[1] >= LOGVAR_FLOOR)
        assert math.isclose(LOGVAR_FLOOR, math.log(1 / (12 * 256 ** 2)))


def _mc_nll(head, x, post, n=200_000):
    with torch.no_grad():
        total = torch.zeros(x.shape[0], dtype=torch.float64)
        for _ in range(n // 20_000):
            if post.latent == "gaussian":
                z = post.rsample(torch.randn(20_000, *post.mu.shape, dtype=torch.float64))
            else:
                z = post.hard_sample(torch.rand(20_000, *post.logits.shape, dtype=torch.float64))
            total += head.sample_nll(x, z).sum(0)
        return total / n


@pytest.mark.parametrize("latent", ["gaussian", "bernoulli"])
@pytest.mark.parametrize("variance", ["fixed", "scalar", "learned"])
def test_analytic_head_matches_monte_carlo(latent, variance):
    torch.manual_seed(0)
    d, shape = 3, (1, 2, 2)
    head = AnalyticLinearDecoder(d, shape, variance, sigma2=0.2).double()
    x = torch.rand(4, *shape, dtype=torch.float64)
    params = torch.randn(4, 2 * d if latent == "gaussian" else d, dtype=torch.float64) * 0.5
    post = Posterior(latent, params)
    exact = head.nll(x, post.moments())
    mc = _mc_nll(head, x, post)
    if variance == "learned":   # the log term is the paper's second-order Taylor expansion
        assert torch.allclose(exact, mc, rtol=0, atol=0.05 * exact.abs().max().item() + 0.05)
    else:
        assert torch.allclose(exact, mc, rtol=0, atol=0.05)
    mean, prec = head(post.mean)
    assert mean.shape == (4, *shape)
    assert (prec is not None) == (variance == "learned")
    assert head.std(post.mean).shape == (4, *shape)


def test_linear_head_forward_is_posterior_predictive_mean():
    torch.manual_seed(1)
    head = AnalyticLinearDecoder(4, (1, 3, 3)).double()
    post = Posterior("gaussian", torch.randn(6, 8, dtype=torch.float64))
    z = post.rsample(torch.randn(100_000, 6, 4, dtype=torch.float64))
    with torch.no_grad():
        mc = head(z)[0].mean(0)
        assert torch.allclose(head(post.mean)[0], mc, atol=0.02)


def test_posterior_kl_and_sampling():
    torch.manual_seed(2)
    g = Posterior("gaussian", torch.randn(5, 6))
    mu, logvar = g.mu, g.logvar
    closed = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(-1)
    assert torch.allclose(g.kl(), closed, atol=1e-5)
    b = Posterior("bernoulli", torch.randn(5, 3))
    p = torch.sigmoid(b.logits)
    closed = (p * torch.log(2 * p) + (1 - p) * torch.log(2 * (1 - p))).sum(-1)
    assert torch.allclose(b.kl(), closed, atol=1e-5)
    u = torch.rand(5, 3)
    hard = b.hard_sample(u)
    assert set(hard.unique().tolist()) <= {0.0, 1.0} and not hard.requires_grad
    soft = b.relaxed_sample(u, 0.5)
    assert torch.all((soft > 0) & (soft < 1))
    st = b.relaxed_sample(u, 0.5, straight_through=True)
    assert set(st.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(st, (soft > 0.5).float())
    b.logits.requires_grad_(True)
    st = Posterior("bernoulli", b.logits).relaxed_sample(u, 0.5, straight_through=True)
    (g_st,) = torch.autograd.grad(st.sum(), b.logits)
    soft = Posterior("bernoulli", b.logits).relaxed_sample(u, 0.5)
    (g_soft,) = torch.autograd.grad(soft.sum(), b.logits)
    assert torch.allclose(g_st, g_soft)            # straight-through: relaxed gradient
    assert isinstance(g.distribution(), D.Normal)


@pytest.mark.parametrize("decoder", ["linear", "nonlinear", "dual"])
def test_build_model_variants(decoder):
    cfg = make_config(None, dict(decoder=decoder, variance="learned", latent_dim=4,
                                 estimator="reparam", enc_channels=[2, 2, 2], dec_channels=[2, 2, 2, 2, 2]))
    m = build_model(cfg, (1, 28, 28))
    assert (m.linear is not None) == (decoder in ("linear", "dual"))
    assert (m.nonlinear is not None) == (decoder in ("nonlinear", "dual"))
    mean, std = m.reconstruct(torch.rand(3, 1, 28, 28))
    assert mean.shape == std.shape == (3, 1, 28, 28)
    assert m.inference_decoder is (m.nonlinear if decoder != "linear" else m.linear)
    c = build_model(make_config(None, dict(decoder=decoder, latent_dim=4, estimator="reparam",
                                           enc_channels=[2, 2, 2, 2], dec_channels=[4, 2, 2, 2])),
                    (3, 32, 32))
    assert isinstance(c.encoder, StridedEncoder)
