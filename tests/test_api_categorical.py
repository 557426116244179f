"""Categorical latents in the trainer: the posterior's draws, KL and relaxations, and a short
training run with every estimator that applies (silent, Gumbel-Softmax with and without
straight-through, REINFORCE, variance loss)."""

from __future__ import annotations

import math

import pytest
import torch

from silent_kernels.api.estimators import VALID_ESTIMATORS
from silent_kernels.api.models import Posterior
from silent_kernels.api.train import Trainer, make_config


def _posterior(B=3, G=4, K=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Posterior("categorical", torch.randn(B, G * K, generator=g), categories=K)


def test_gumbel_max_draws_follow_the_posterior_and_kl_is_to_the_uniform_prior():
    post = _posterior()
    u = torch.rand(40_000, 3, 20, generator=torch.Generator().manual_seed(1))
    z = post.hard_sample(u)
    assert set(z.unique().tolist()) == {0.0, 1.0} and (z.unflatten(-1, (4, 5)).sum(-1) == 1).all()
    assert (z.mean(0) - post.mean).abs().max() < 0.015
    pi = torch.softmax(post.group_logits, -1)
    want = (pi * torch.log(pi * 5)).sum((-1, -2))
    assert torch.allclose(post.kl(), want, atol=1e-5)
    assert torch.allclose(post.prior_log_prob(z[:2]), torch.full((2, 3), -4 * math.log(5)))


def test_gumbel_softmax_relaxation_and_straight_through():
    post = _posterior()
    u = torch.rand(3, 20, generator=torch.Generator().manual_seed(2))
    soft = post.relaxed_sample(u, 0.5)
    assert torch.allclose(soft.unflatten(-1, (4, 5)).sum(-1), torch.ones(3, 4))
    hard = post.relaxed_sample(u, 0.5, straight_through=True)
    assert torch.equal(hard, post.hard_sample(u))          # forward: the Gumbel-max draw


@pytest.mark.parametrize("estimator,extra", [("silent", {}), ("gumbel", {}),
                                             ("gumbel", {"straight_through": True}),
                                             ("reinforce", {}), ("variance-loss", {})])
def test_short_training_with_each_estimator(tmp_path, estimator, extra):
    assert estimator in VALID_ESTIMATORS["categorical"]
    cfg = make_config(None, {"dataset": "digits", "latent": "categorical", "groups": 4, "categories": 5,
                             "estimator": estimator, "epochs": 1, "train_limit": 256, "val_limit": 64,
                             "batch_size": 64, "figures": False, "progress": False, **extra})
    assert cfg.latent_dim == 20
    metrics = Trainer(cfg, str(tmp_path / "run"), log=lambda m: None).fit()
    last = metrics[-1]
    assert math.isfinite(last["val_bpd"]) and 0 <= last["val_kld"] <= 4 * math.log(5) + 1e-4


@pytest.mark.parametrize("decoder", ["linear", "dual"])
def test_the_training_step_uses_the_models_groups(tmp_path, decoder):
    """The loss a training step reports for a batch is the model's own exact loss on it: the
    step once rebuilt the posterior with K = 2 (100 groups of 2 instead of G groups of K), so
    categorical models were trained on another latent law than the one they were evaluated on."""
    cfg = make_config(None, {"dataset": "digits", "latent": "categorical", "groups": 3, "categories": 5,
                             "decoder": decoder, "estimator": "silent", "epochs": 1, "train_limit": 64,
                             "val_limit": 32, "batch_size": 32, "figures": False, "progress": False})
    trainer = Trainer(cfg, str(tmp_path / "run"), log=lambda m: None)
    x = trainer.data.train[:32].float().add(0.5).div(256.0)
    with torch.no_grad():
        post = trainer.model.posterior(x)
        want_nll = trainer.model.linear.nll(x, post.moments()).mean()
        want_kl = post.kl().mean()
    out = trainer.train_step(x, slice(None), 32, 0)
    assert out["kl"] == pytest.approx(float(want_kl), rel=1e-5)
    if decoder == "linear":
        assert out["nll"] == pytest.approx(float(want_nll), rel=1e-5)


def test_a_categorical_posterior_needs_its_category_count():
    with pytest.raises(ValueError, match="categories"):
        Posterior("categorical", torch.zeros(2, 20))
