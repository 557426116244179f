"""The trainer: Algorithm 1 (Eq. 8 weighting, each decoder on its own loss, freezing, separate
optimisers), atomic checkpoints, --resume after SIGKILL of a real subprocess ending bit-identical,
the NaN guard, and 2-process gloo data parallelism matching the 1-process run."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from silent_kernels.api import cli
from silent_kernels.api.errors import RunDirError, UsageError
from silent_kernels.api.estimators import Noise, reconstruction
from silent_kernels.api.models import AnalyticLinearDecoder, Posterior
from silent_kernels.api.train import (NonFiniteLossError, Trainer, encoder_frozen_at, load_checkpoint,
                                      make_config, prepare_data, save_atomic, scale_grad, w_lin_at)

TINY = dict(dataset="digits", train_limit=96, val_limit=32, latent_dim=6, enc_channels=[2, 3, 3],
            dec_channels=[2, 3, 3, 3, 3], batch_size=32, eval_batch_size=64, progress=False,
            figures=False, gradvar_draws=4, gradvar_batch=8)


def tiny_cfg(**kw):
    return make_config(None, {**TINY, **kw})


@pytest.fixture(scope="module")
def tiny_data():
    return prepare_data(tiny_cfg())


# ------------------------------------------------------------------ Algorithm 1

def test_w_lin_schedule_and_cutoff():
    cfg = tiny_cfg(decoder="dual", estimator="reparam", variance="learned", anneal_rate=0.3,
                   cutoff_epoch=3)
    assert [w_lin_at(cfg, e) for e in range(5)] == pytest.approx([1.0, 0.7, 0.4, 0.1, 0.0])
    assert [encoder_frozen_at(cfg, e) for e in range(4)] == [False, False, True, True]
    assert w_lin_at(cfg.replace(estimator="silent"), 4) == 1.0           # SG alone
    assert w_lin_at(cfg.replace(decoder="linear"), 4) == 1.0


def test_scale_grad():
    x = torch.randn(4, requires_grad=True)
    y = scale_grad(x, 0.25)
    assert torch.equal(y, x)
    (g,) = torch.autograd.grad((y * 3).sum(), x)
    assert torch.allclose(g, torch.full((4,), 0.75))
    assert not scale_grad(x, 0.0).requires_grad and scale_grad(x, 1.0) is x


@pytest.mark.parametrize("latent,estimator", [("gaussian", "reparam"), ("bernoulli", "reinforce"),
                                              ("gaussian", "variance-loss")])
def test_dual_gradients_follow_eq8(tiny_data, latent, estimator):
    cfg = tiny_cfg(decoder="dual", variance="learned", latent=latent, estimator=estimator,
                   anneal_rate=0.35, lr=0.0)                 # lr 0: parameters never move
    with tempfile.TemporaryDirectory() as d:
        tr = Trainer(cfg, d, data=tiny_data)
    assert set(tr.optimizers) == {"encoder", "nonlinear", "mu", "alpha"}
    epoch = 1
    w = w_lin_at(cfg, epoch)
    assert w == pytest.approx(0.65)
    x = (tiny_data.train[:8].float() + 0.5) / 256
    state = tr.sample_gen.get_state()
    baseline = tr.baseline.value
    tr.train_step(x, slice(None), 8, epoch)
    got = {n: p.grad.clone() for n, p in tr.model.named_parameters()}

    # the same computation by hand, with the same noise
    m = tr.model
    tr.sample_gen.set_state(state)
    tr.baseline.value = baseline
    params = m.encoder(x)
    post = Posterior(latent, params)
    lin = m.linear.nll(x, post.moments()).sum() / 8
    terms = reconstruction(estimator, x, post, m.nonlinear, Noise(tr.sample_gen, 8), scale=1 / 8,
                           baseline=tr.baseline, samples=cfg.vl_samples)
    kl = post.kl().sum() / 8
    enc = list(m.encoder.parameters())
    g_lin = torch.autograd.grad(lin, enc, retain_graph=True)
    g_nl = torch.autograd.grad(terms.loss, enc, retain_graph=True)
    g_kl = torch.autograd.grad(kl, enc, retain_graph=True)
    for (name, _), a, b, c in zip(m.encoder.named_parameters(), g_lin, g_nl, g_kl):
        assert torch.allclose(got["encoder." + name], w * a + (1 - w) * b + c, rtol=1e-4, atol=1e-6), name
    head = list(m.linear.parameters())
    for (name, _), g in zip(m.linear.named_parameters(), torch.autograd.grad(lin, head, retain_graph=True)):
        assert torch.allclose(got["linear." + name], g, rtol=1e-5, atol=1e-7), name    # full own loss
    dec = list(m.nonlinear.parameters())
    for (name, _), g in zip(m.nonlinear.named_parameters(), torch.autograd.grad(terms.loss, dec)):
        assert torch.allclose(got["nonlinear." + name], g, rtol=1e-5, atol=1e-7), name


def test_encoder_frozen_from_cutoff(tiny_data, tmp_path):
    cfg = tiny_cfg(decoder="dual", variance="learned", estimator="reparam", cutoff_epoch=2, epochs=2,
                   anneal_rate=0.5)
    tr = Trainer(cfg, str(tmp_path), data=tiny_data)
    tr.fit()
    frozen_before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    ckpt1 = tr.state_dict()
    # train one more frozen epoch: encoder and linear head unchanged, nonlinear decoder moves
    tr.cfg = tr.cfg.replace(epochs=3)
    tr.fit()
    after = tr.model.state_dict()
    for k in frozen_before:
        same = torch.equal(frozen_before[k], after[k])
        if k.startswith(("encoder.", "linear.")):
            assert same, k
        elif k.startswith("nonlinear.") and "weight" in k:
            assert not same, k
    recs = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["encoder_frozen"] for r in recs] == [False, True, True]
    assert recs[0]["w_lin"] == 1.0
    assert ckpt1["epoch"] == 2


# ----------------------------------------------------------------- checkpoints

def test_atomic_checkpoint_write(tmp_path, monkeypatch):
    path = str(tmp_path / "ck" / "last.pt")
    save_atomic({"format": 1, "a": torch.arange(3)}, path)
    before = open(path, "rb").read()

    def exploding_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"format": 1, "a": torch.arange(5)}, path)
    monkeypatch.undo()
    assert open(path, "rb").read() == before                       # old file intact
    assert os.listdir(tmp_path / "ck") == ["last.pt"]              # no temp file left
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.arange(3))


def test_checkpoint_is_weights_only_loadable(tiny_data, tmp_path):
    cfg = tiny_cfg(latent="bernoulli", decoder="dual", variance="learned", estimator="reinforce",
                   epochs=1, save_epochs=[1])
    tr = Trainer(cfg, str(tmp_path), data=tiny_data)
    tr.fit()
    ck = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and ck["baseline"] is not None
    assert set(ck["rng"]) == {"data", "sample", "torch"}
    assert os.path.exists(tmp_path / "checkpoints" / "epoch_0001.pt")
    assert json.load(open(tmp_path / "config.json"))["enc_channels"] == [2, 3, 3]
    with pytest.raises(RunDirError, match="--resume"):
        Trainer(cfg, str(tmp_path), data=tiny_data)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    cfg = tiny_cfg(epochs=1)
    Trainer(cfg, str(tmp_path), data=tiny_data).fit()
    ck = tmp_path / "checkpoints" / "last.pt"
    digest = hashlib.sha256(ck.read_bytes()).hexdigest()
    tr = Trainer(cfg.replace(epochs=2), str(tmp_path), resume=True, data=tiny_data)
    tr.model.linear.nll = lambda x, q, reduction="none": torch.full((x.shape[0],), float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 4: the training loss became nan; the last good checkpoint .*last.pt \(epoch 1\)"):
        tr.fit()
    assert hashlib.sha256(ck.read_bytes()).hexdigest() == digest
    assert len(open(tmp_path / "metrics.jsonl").read().splitlines()) == 1
    # the CLI reports it and exits with code 3
    monkeypatch.setattr(AnalyticLinearDecoder, "nll",
                        lambda self, x, q, reduction="none": torch.full((x.shape[0],), float("inf")))
    code = cli.main(["train", "--resume", "--run-dir", str(tmp_path), "--epochs", "2", "--no-progress"])
    assert code == cli.EXIT_NONFINITE
    err = capsys.readouterr().err
    assert "training loss became inf" in err and len(err.strip().splitlines()) == 1
    assert hashlib.sha256(ck.read_bytes()).hexdigest() == digest


# ------------------------------------------------------- resume after SIGKILL

RESUME_ARGS = ["--dataset", "digits", "--train-limit", "1500", "--val-limit", "64", "--latent", "bernoulli",
               "--decoder", "dual", "--variance", "learned", "--estimator", "reinforce",
               "--latent-dim", "8", "--enc-channels", "2,4,4", "--dec-channels", "2,4,4,4,4",
               "--batch-size", "32", "--anneal-rate", "0.3", "--cutoff-epoch", "3", "--epochs", "4",
               "--num-threads", "1", "--no-progress", "--no-figures", "--seed", "3"]


def _cli(*args):
    return [sys.executable, "-m", "silent_kernels.api.cli", *args]


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _assert_same_state(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], list):
            assert len(a[k]) == len(b[k])
            for x, y in zip(a[k], b[k]):
                if isinstance(x, dict):
                    _assert_same_state(x, y)
                else:
                    assert x == y
        else:
            assert a[k] == b[k], k


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    ref = subprocess.Popen(_cli("train", "--run-dir", str(full), *RESUME_ARGS),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen(_cli("train", "--run-dir", str(killed), *RESUME_ARGS),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ck = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while not ck.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    epoch_at_kill = load_checkpoint(str(ck))["epoch"]
    assert 1 <= epoch_at_kill < 4
    res = _run(_cli("train", "--run-dir", str(killed), "--resume", "--no-progress"))
    assert res.returncode == 0, res.stderr
    out, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err
    a = load_checkpoint(str(full / "checkpoints" / "last.pt"))
    b = load_checkpoint(str(killed / "checkpoints" / "last.pt"))
    assert a["epoch"] == b["epoch"] == 4
    _assert_same_state(a["model"], b["model"])
    _assert_same_state(a["optimizers"], b["optimizers"])
    assert torch.equal(a["baseline"], b["baseline"])
    ma = [json.loads(l) for l in open(full / "metrics.jsonl")]
    mb = [json.loads(l) for l in open(killed / "metrics.jsonl")]
    strip = lambda r: {k: v for k, v in r.items() if "time" not in k}   # noqa: E731
    assert [strip(r) for r in ma] == [strip(r) for r in mb]


def test_resume_drops_metrics_of_unfinished_epochs(tmp_path, tiny_data):
    Trainer(tiny_cfg(epochs=1), str(tmp_path), data=tiny_data).fit()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 2, "val_bpd": 9.0}\n{"epoch": 3, "val_b')    # killed mid-write
    for name in (".last.pt.123.tmp",):
        (tmp_path / "checkpoints" / name).write_bytes(b"partial")
    Trainer(tiny_cfg(epochs=2), str(tmp_path), resume=True, data=tiny_data).fit()
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["epoch"] for r in recs] == [1, 2] and "val_mse" in recs[1]
    assert os.listdir(tmp_path / "checkpoints") == ["last.pt"]


def test_resume_refuses_a_changed_config(tmp_path, tiny_data):
    Trainer(tiny_cfg(epochs=1), str(tmp_path), data=tiny_data).fit()
    code = cli.main(["train", "--resume", "--run-dir", str(tmp_path), "--latent-dim", "9"])
    assert code == cli.EXIT_USAGE
    with pytest.raises(UsageError, match="differs from the checkpoint"):
        Trainer(tiny_cfg(epochs=2, sigma2=0.1), str(tmp_path), resume=True, data=tiny_data)


# ------------------------------------------------------------ data parallel

DDP_ARGS = ["--dataset", "digits", "--train-limit", "96", "--val-limit", "32", "--latent", "bernoulli",
            "--decoder", "dual", "--variance", "learned", "--estimator", "reinforce", "--latent-dim", "6",
            "--enc-channels", "2,3,3", "--dec-channels", "2,3,3,3,3", "--batch-size", "32",
            "--anneal-rate", "0.5", "--cutoff-epoch", "2", "--epochs", "2", "--num-threads", "1",
            "--no-progress", "--no-figures", "--seed", "5"]


def test_two_process_gloo_matches_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p1 = subprocess.Popen(_cli("train", "--run-dir", str(one), *DDP_ARGS), env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    res = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "silent_kernels.api.cli", "train", "--run-dir", str(two), *DDP_ARGS], env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    _, err = p1.communicate(timeout=600)
    assert p1.returncode == 0, err
    a = load_checkpoint(str(one / "checkpoints" / "last.pt"))
    b = load_checkpoint(str(two / "checkpoints" / "last.pt"))
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-5), k
    assert float(a["baseline"]) == pytest.approx(float(b["baseline"]), rel=1e-5)
    info = json.load(open(two / "run_info.json"))
    assert info["world_size"] == 2
    ma = [json.loads(l) for l in open(one / "metrics.jsonl")]
    mb = [json.loads(l) for l in open(two / "metrics.jsonl")]
    assert ma[-1]["val_bpd"] == pytest.approx(mb[-1]["val_bpd"], rel=1e-4)


# ------------------------------------------------------ Bernoulli code collapse

def _codes_after_training(scale, steps=30):
    """Silent Gradients, Bernoulli d = 200, sigma^2 = 0.01 (the Table 2 setting) on digits:
    the posterior probabilities of 64 held-out images after ``steps`` Adam steps."""
    torch.manual_seed(0)
    cfg = make_config(None, {**TINY, "train_limit": 64 * steps, "val_limit": 64, "latent_dim": 200,
                             "enc_channels": [8, 16, 16], "latent": "bernoulli", "sigma2": 0.01,
                             "batch_size": 64, "lr": 5e-4, "linear_init_scale": scale})
    trainer = Trainer(cfg, tempfile.mkdtemp(), log=lambda m: None)
    torch.set_num_threads(1)
    train = trainer.data.train
    for i in range(steps):
        x = (train[64 * i:64 * (i + 1)].float() + 0.5) / 256
        trainer.train_step(x, slice(0, 64), 64, 0)
    with torch.no_grad():
        return torch.sigmoid(trainer.model.posterior((trainer.data.val.float() + 0.5) / 256).logits)


def test_bernoulli_default_init_keeps_codes_image_dependent():
    """nn.Linear's default W makes every code saturate to one constant code within a few
    dozen steps (the negative control); the default 0.01x init for Bernoulli latents
    (models.linear_init_scale) keeps the codes image-dependent."""
    assert make_config(None, {"latent": "bernoulli"}).linear_init_scale is None
    collapsed = _codes_after_training(1.0, steps=60)
    learning = _codes_after_training(None, steps=60)
    saturated = lambda p: ((p < 0.01) | (p > 0.99)).float().mean()   # noqa: E731
    assert saturated(collapsed) > 0.95 and collapsed.std(0).mean() < 1e-3   # one constant code
    # measured: 0 saturated, mean std over images 0.138
    assert saturated(learning) < 0.05 and learning.std(0).mean() > 0.05


def test_epoch_line_labels_an_estimated_or_approximate_bpd():
    from silent_kernels.api.rundir import epoch_line as _epoch_line
    rec = {"epoch": 2, "train_loss": 1.0, "val_bpd": 3.0, "val_bpd_kind": "monte-carlo", "time_s": 1.0}
    assert "bpd 3.0000 (monte-carlo)" in _epoch_line(rec, 5)
    assert "bpd 3.0000 (taylor-approximation)" in _epoch_line({**rec, "val_bpd_kind": "taylor-approximation"}, 5)
    assert "bpd 3.0000  " in _epoch_line({**rec, "val_bpd_kind": "exact"}, 5)


def test_freed_memory_is_kept_on_glibc():
    import platform
    from silent_kernels.api.allocator import keep_freed_memory
    accepted = keep_freed_memory()
    assert accepted == keep_freed_memory()                      # idempotent
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert accepted
