"""torch.compile(fullgraph=True) (inductor, CPU) of a module that calls analytic_nll with the
cpp backend: the compiled forward and backward equal the eager ones (one compile, both heads)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from silent_kernels import LatentMoments, analytic_nll

if os.environ.get("SILENT_KERNELS_NO_EXTENSION") == "1":
    pytest.skip("silent_kernels built without its compiled extension", allow_module_level=True)


class TinyVAELoss(nn.Module):
    """Encoder -> Bernoulli and Gaussian posteriors -> both analytic heads, summed."""

    def __init__(self, k=12, d=3):
        super().__init__()
        self.encoder = nn.Linear(k, 2 * d)
        self.mean_head = nn.Linear(d, k)
        self.precision_head = nn.Linear(d, k)
        self.log_sigma2 = nn.Parameter(torch.tensor(-1.0))
        with torch.no_grad():
            self.precision_head.bias.fill_(1.5)

    def forward(self, x):
        logits, logvar = self.encoder(x).chunk(2, dim=-1)
        q_bern = LatentMoments.bernoulli(logits=logits)
        q_gauss = LatentMoments.gaussian(logits, logvar=logvar)
        precision = analytic_nll(x, q_bern, self.mean_head.weight, self.mean_head.bias,
                                 precision_weight=self.precision_head.weight,
                                 precision_bias=self.precision_head.bias, backend="cpp")
        fixed = analytic_nll(x, q_gauss, self.mean_head.weight, self.mean_head.bias,
                             sigma2=self.log_sigma2.exp(), reduction="sum", backend="cpp")
        return precision + fixed


@pytest.mark.slow
def test_compiled_module_matches_eager():
    torch.manual_seed(0)
    model = TinyVAELoss()
    x = torch.rand(5, 12)

    def run(fn):
        model.zero_grad()
        loss = fn(x)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    eager_loss, eager_grads = run(model)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    compiled_loss, compiled_grads = run(compiled)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for g, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
