"""The ``silent-vae`` CLI end to end on a tiny config (train, eval, gradvar, plot), presets,
the console-script declaration, and the README's main command (the demo) at tiny scale."""

import json
import os
import sys

import pytest
import torch

from silent_kernels.api import cli, demo
from silent_kernels.api.arguments import config_overrides
from silent_kernels.api.errors import EXIT_INPUT
from silent_kernels.api.train import make_config

TINY = ["--train-limit", "64", "--val-limit", "32", "--latent-dim", "6", "--enc-channels", "2,3,3",
        "--dec-channels", "2,3,3,3,3", "--batch-size", "32", "--no-progress", "--gradvar-draws", "3",
        "--gradvar-batch", "4"]


def _png(path):
    with open(path, "rb") as fh:
        return fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_train_eval_gradvar_plot(tmp_path, capsys):
    a, b = str(tmp_path / "silent"), str(tmp_path / "reinforce")
    assert cli.main(["train", "--preset", "cpu", "--epochs", "2", "--run-dir", a, "--gradvar-epochs", "2",
                     *TINY]) == 0
    assert cli.main(["train", "--preset", "cpu", "--epochs", "1", "--run-dir", b, "--latent", "bernoulli",
                     "--decoder", "dual", "--variance", "learned", "--estimator", "reinforce", "--keep-best",
                     *TINY]) == 0
    best = torch.load(os.path.join(b, "checkpoints", "best.pt"), weights_only=True)["val_bpd"]
    cfg = json.load(open(os.path.join(a, "config.json")))
    assert cfg["dataset"] == "digits" and cfg["epochs"] == 2 and cfg["enc_channels"] == [2, 3, 3]
    recs = [json.loads(line) for line in open(os.path.join(a, "metrics.jsonl"))]
    assert [r["epoch"] for r in recs] == [1, 2]
    for key in ("val_bpd", "val_mse", "val_kld", "val_nll", "train_loss", "train_kl", "step"):
        assert isinstance(recs[-1][key], (int, float)), key
    assert recs[-1]["gradvar"]["silent"]["total"] == 0.0
    assert recs[-1]["gradvar"]["reparam"]["total"] > 0
    rb = [json.loads(line) for line in open(os.path.join(b, "metrics.jsonl"))][-1]
    assert "val_bpd_linear" in rb and rb["w_lin"] == 1.0
    for run in (a, b):
        assert _png(os.path.join(run, "figures", "reconstructions.png"))
        assert _png(os.path.join(run, "figures", "curves.png"))
    capsys.readouterr()

    assert cli.main(["eval", a]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["bpd"] == pytest.approx(recs[-1]["val_bpd"]) and res["n"] == 32
    assert json.load(open(os.path.join(a, "eval_val.json")))["mse"] == pytest.approx(recs[-1]["val_mse"])
    assert cli.main(["eval", a, "--dequant", "center", "--limit", "8"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 8
    assert cli.main(["eval", b, "--limit", "8", "--iwae", "5", "--checkpoint",
                     os.path.join(b, "checkpoints", "best.pt")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["iwae_samples"] == 5 and res["iwae_bpd"] > 0 and res["mse_expected"] > 0
    assert best == pytest.approx(rb["val_bpd"])          # one epoch: the best is the last

    assert cli.main(["gradvar", b, "--draws", "3", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "bit-identical" in out
    gv = json.load(open(os.path.join(b, "gradvar.json")))
    assert set(gv["results"]) == {"silent", "gumbel", "reinforce", "variance-loss"}
    assert gv["results"]["silent"]["total"] == 0.0 and gv["results"]["reinforce"]["total"] > 0

    out_dir = str(tmp_path / "figs")
    assert cli.main(["plot", a, b, "--labels", "silent", "reinforce", "--out", out_dir, "--n", "4"]) == 0
    assert _png(os.path.join(out_dir, "reconstructions.png")) and _png(os.path.join(out_dir, "curves.png"))


def test_config_file_and_flag_precedence(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"lr": 0.123, "epochs": 7, "latent_dim": 9}))
    parser = cli.build_parser()
    args = parser.parse_args(["train", "--preset", "cpu", "--config", str(path), "--epochs", "3",
                              "--cutoff-epoch", "none", "--straight-through"])
    overrides = {**json.load(open(path)), **config_overrides(args)}
    cfg = make_config("cpu", overrides)
    assert (cfg.lr, cfg.epochs, cfg.latent_dim) == (0.123, 3, 9)
    assert cfg.cutoff_epoch is None and cfg.straight_through is True


def test_cli_errors_are_clear(tmp_path, capsys):
    code = cli.main(["train", "--decoder", "nonlinear", "--estimator", "silent", "--run-dir", str(tmp_path / "x")])
    assert code == cli.EXIT_USAGE
    assert "needs the linear analytic head" in capsys.readouterr().err
    code = cli.main(["train", "--latent", "gaussian", "--estimator", "gumbel", "--run-dir", str(tmp_path / "y")])
    assert code == cli.EXIT_USAGE and "does not apply" in capsys.readouterr().err
    code = cli.main(["train", "--dataset", "mnist", "--data-root", str(tmp_path / "none"),
                     "--run-dir", str(tmp_path / "z")])
    assert code == EXIT_INPUT and "does not exist" in capsys.readouterr().err
    assert cli.main(["eval", str(tmp_path / "missing")]) == EXIT_INPUT
    assert "no checkpoint" in capsys.readouterr().err


def test_presets():
    cpu = make_config("cpu")
    assert cpu.dataset == "digits" and cpu.enc_channels == [8, 16, 16]
    paper = make_config("paper")
    assert (paper.dataset, paper.batch_size, paper.epochs, paper.latent_dim, paper.sigma2) == \
        ("mnist", 64, 500, 200, 0.01)
    assert paper.betas == [0.9, 0.95]
    dual = make_config("paper", dict(decoder="dual", variance="learned", estimator="reparam"))
    assert dual.epochs == 200
    assert make_config("paper", dict(decoder="dual", variance="learned", latent="bernoulli",
                                     estimator="reinforce")).epochs == 300
    cifar = make_config("paper", dict(dataset="cifar10", decoder="dual", variance="learned", estimator="reparam"))
    assert (cifar.epochs, cifar.batch_size, cifar.enc_channels) == (2000, 256, [64, 128, 256, 512])
    inet = make_config("paper", dict(dataset="imagenet32", decoder="dual", variance="learned", estimator="reparam"))
    assert (inet.epochs, inet.batch_size) == (100, 128)
    assert make_config("paper", dict(epochs=3)).epochs == 3          # explicit values win
    with pytest.raises(ValueError, match="preset"):
        make_config("gpu")


def test_console_script_declared():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "pyproject.toml"), "rb") as fh:
        scripts = tomllib.load(fh)["project"]["scripts"]
    module, func = scripts["silent-vae"].split(":")
    assert module == "silent_kernels.api.cli" and getattr(sys.modules[module], func) is cli.main


def test_demo_tiny(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path), "--epochs", "1", "--train-limit", "64", "--draws", "3",
                      "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "silent" in out and "reparam" in out and "0 (exact)" in out
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["results"]["silent"]["gradvar"] == 0.0
    assert summary["results"]["reparam"]["gradvar"] > 0
    assert summary["config"]["decoder"] == "linear" and summary["config"]["variance"] == "fixed"
    assert _png(tmp_path / "figures" / "reconstructions.png") and _png(tmp_path / "figures" / "curves.png")
