"""silent_kernels.nn.LinearGaussianDecoder: each variance is one analytic_nll call, every
parameter gets a gradient from the start (no head initialised where its gradient vanishes)."""

from __future__ import annotations

import pytest
import torch

from silent_kernels import LatentMoments, analytic_nll
from silent_kernels.nn import VARIANCES, LinearGaussianDecoder


@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("family", ["gaussian", "bernoulli"])
def test_decoder_nll_is_the_functional_loss_and_trains_every_parameter(variance, family):
    torch.manual_seed(0)
    d, k, B = 4, 6, 3
    dec = LinearGaussianDecoder(d, k, variance=variance, sigma2=0.05)
    x = torch.rand(B, k)
    enc = torch.randn(B, 2 * d, requires_grad=True)
    mu, lv = enc.chunk(2, -1)
    q = LatentMoments.gaussian(mu, logvar=lv) if family == "gaussian" else LatentMoments.bernoulli(logits=mu)
    loss = dec.nll(x, q)
    kwargs = {"fixed": dict(sigma2=dec.sigma2) if variance == "fixed" else {},
              "scalar": dict(sigma2=dec.log_sigma2.exp()) if variance == "scalar" else {},
              "precision": dict(precision_weight=dec.head.weight, precision_bias=dec.head.bias)
              if dec.head is not None else {},
              "logvar": dict(logvar_weight=dec.head.weight, logvar_bias=dec.head.bias)
              if dec.head is not None else {}}[variance]
    want = analytic_nll(x, q, dec.mean.weight, dec.mean.bias, reduction="none", **kwargs)
    assert torch.allclose(loss, want)
    loss.sum().backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert enc.grad.abs().sum() > 0
    assert dec(torch.zeros(2, d)).shape == (2, k) and dec.std(torch.zeros(2, d)).shape == (2, k)


def test_decoder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="variance: expected one of"):
        LinearGaussianDecoder(2, 3, variance="learned")
    with pytest.raises(ValueError, match="sigma2: expected a positive variance"):
        LinearGaussianDecoder(2, 3, sigma2=0.0)
