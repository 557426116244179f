"""Table-driven fault tests of the ``silent-vae`` CLI and the trainer (issue 13).

Every user-caused failure must end with exactly one stderr line ``silent-vae: error: ...``
naming the argument or file, the documented exit code, and no traceback; no fault may lose
data (a checkpoint, a metrics record) or leave a non-finite checkpoint. Classes:
bad command-line input, corrupt or truncated files (checkpoints, configs, metrics, IDX/gz,
CIFAR pickles, ImageNet32 npz, digits CSV), concurrent runs, SIGKILL at several points then
--resume, a full disk (mocked ENOSPC), divergence, and bad inputs to the Python API.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from silent_kernels.api import cli
from silent_kernels.api.checkpoints import load_checkpoint, save_atomic
from silent_kernels.api.config import TrainConfig
from silent_kernels.api.errors import (EXIT_DIVERGED, EXIT_INPUT, EXIT_RUN_DIR, EXIT_USAGE, EXIT_WRITE,
                                       InputFileError, UsageError)
from silent_kernels.api.rundir import MetricsLog, RunDirLock
from silent_kernels.api.train import NonFiniteLossError, Trainer, make_config

TINY = ["--train-limit", "64", "--val-limit", "32", "--latent-dim", "6", "--enc-channels", "2,3,3",
        "--dec-channels", "2,3,3,3,3", "--batch-size", "32", "--no-progress", "--no-figures",
        "--gradvar-draws", "3", "--gradvar-batch", "4", "--epochs", "1", "--num-threads", "1"]


def run_cli(argv):
    """(exit code, stdout, stderr) of ``silent-vae argv`` in this process; an exception that
    escapes ``main`` fails the test (it would be a traceback)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def assert_one_error_line(err: str, *words: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("silent-vae: error: "), lines[0]
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished one-epoch tiny run, copied by the tests that change it."""
    run = tmp_path_factory.mktemp("faults") / "base"
    code, _, err = run_cli(["train", "--run-dir", run, *TINY])
    assert code == 0, err
    return run


@pytest.fixture
def run_copy(base_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(base_run, dst)
    return dst


# ------------------------------------------------------------ bad command-line input

def _train(*extra):
    return lambda tmp: ["train", "--run-dir", tmp / "new", *TINY, *extra]


CLI_CASES = [
    # (id, argv(tmp_path, base_run), exit code, words the line must contain)
    ("train-limit negative", _train("--train-limit", "-10"), EXIT_USAGE, ["--train-limit", ">= 1", "-10"]),
    ("train-limit zero", _train("--train-limit", "0"), EXIT_USAGE, ["--train-limit", "0"]),
    ("val-limit negative", _train("--val-limit", "-1"), EXIT_USAGE, ["--val-limit", "-1"]),
    ("epochs not an int", _train("--epochs", "1.5"), EXIT_USAGE, ["--epochs", "integer", "'1.5'"]),
    ("epochs zero", _train("--epochs", "0"), EXIT_USAGE, ["--epochs", ">= 1", "0"]),
    ("lr infinite", _train("--lr", "inf"), EXIT_USAGE, ["--lr", "finite", "inf"]),
    ("lr nan", _train("--lr", "nan"), EXIT_USAGE, ["--lr", "nan"]),
    ("lr negative", _train("--lr", "-1"), EXIT_USAGE, ["--lr", ">= 0", "-1"]),
    ("sigma2 zero", _train("--sigma2", "0"), EXIT_USAGE, ["--sigma2", "> 0"]),
    ("betas out of range", _train("--betas", "1.5,0.9"), EXIT_USAGE, ["--betas", "[0, 1)", "1.5"]),
    ("betas three values", _train("--betas", "0.9,0.9,0.9"), EXIT_USAGE, ["--betas", "two numbers"]),
    ("enc-channels empty", _train("--enc-channels", ""), EXIT_USAGE, ["--enc-channels", "[]"]),
    ("enc-channels zero width", _train("--enc-channels", "0,3,3"), EXIT_USAGE, ["--enc-channels", ">= 1"]),
    ("enc-channels fractional", _train("--enc-channels", "2.5,3,3"), EXIT_USAGE, ["--enc-channels", "2.5"]),
    ("enc-channels wrong count", _train("--enc-channels", "2,3"), EXIT_USAGE, ["--enc-channels", "3 widths"]),
    ("dec-channels letters", _train("--dec-channels", "a,b"), EXIT_USAGE, ["--dec-channels", "'a,b'"]),
    ("num-threads zero", _train("--num-threads", "0"), EXIT_USAGE, ["--num-threads", "0"]),
    ("save-epochs beyond the run", _train("--save-epochs", "5"), EXIT_USAGE, ["--save-epochs", "1..1", "[5]"]),
    ("gradvar-epochs zero", _train("--gradvar-epochs", "0"), EXIT_USAGE, ["--gradvar-epochs", "[0]"]),
    ("reinforce-decay out of range", _train("--latent", "bernoulli", "--estimator", "reinforce",
                                            "--reinforce-decay", "1.5"), EXIT_USAGE, ["--reinforce-decay", "1.5"]),
    ("cutoff without dual", _train("--cutoff-epoch", "2"), EXIT_USAGE, ["--cutoff-epoch", "--decoder dual"]),
    ("anneal-rate without dual", _train("--anneal-rate", "0.5"), EXIT_USAGE, ["--anneal-rate", "no effect"]),
    ("temperature without gumbel", _train("--temperature", "0.3"), EXIT_USAGE, ["--temperature", "gumbel"]),
    ("vl-samples without variance-loss", _train("--vl-samples", "8"), EXIT_USAGE, ["--vl-samples", "variance-loss"]),
    ("eval-samples with the exact head", _train("--eval-samples", "4"), EXIT_USAGE, ["--eval-samples", "exact"]),
    ("gumbel with gaussian latents", _train("--estimator", "gumbel"), EXIT_USAGE, ["gumbel", "gaussian"]),
    ("silent without a linear head", _train("--decoder", "nonlinear"), EXIT_USAGE, ["--estimator silent", "nonlinear"]),
    ("digits with a data folder", _train("--data-root", "/missing"), EXIT_USAGE, ["--data-root /missing", "digits"]),
    ("mnist without data-root", _train("--dataset", "mnist"), EXIT_USAGE, ["--dataset mnist", "--data-root"]),
    ("mnist missing folder", _train("--dataset", "mnist", "--data-root", "/nonexistent/x"), EXIT_INPUT,
     ["--data-root /nonexistent/x", "does not exist"]),
    ("val-split test on digits", _train("--val-split", "test"), EXIT_USAGE, ["--val-split test", "digits"]),
    ("val-size larger than the set", _train("--val-size", "5000"), EXIT_USAGE, ["--val-size", "5000"]),
    ("device cuda without CUDA", _train("--device", "cuda"), EXIT_USAGE, ["--device cuda", "not available"]),
    ("device unknown", _train("--device", "gpu0"), EXIT_USAGE, ["--device", "'gpu0'"]),
    ("backend cuda without CUDA", _train("--backend", "cuda"), EXIT_USAGE, ["--backend cuda", "not available"]),
    ("unknown flag", _train("--learning-rate", "0.1"), EXIT_USAGE, ["--learning-rate"]),
    ("unknown choice", _train("--estimator", "magic"), EXIT_USAGE, ["--estimator", "'magic'"]),
    ("no command", lambda tmp: [], EXIT_USAGE, ["COMMAND"]),
    ("resume without run-dir", lambda tmp: ["train", "--resume"], EXIT_USAGE, ["--resume", "--run-dir"]),
    ("resume a missing folder", lambda tmp: ["train", "--resume", "--run-dir", tmp / "nope"], EXIT_RUN_DIR,
     ["nope", "nothing to resume"]),
    ("resume changing the model", lambda tmp: ["train", "--resume", "--run-dir", tmp / "run", "--latent-dim", "9"],
     EXIT_USAGE, ["--resume", "--latent-dim"]),
    ("train into a finished run", lambda tmp: ["train", "--run-dir", tmp / "run", *TINY], EXIT_RUN_DIR,
     ["already holds a run", "--resume"]),
    ("run-dir is a file", lambda tmp: ["train", "--run-dir", tmp / "run" / "config.json", *TINY], EXIT_RUN_DIR,
     ["config.json", "not a folder"]),
    ("run-dir empty", lambda tmp: ["train", "--run-dir", "", *TINY], EXIT_USAGE, ["--run-dir", "''"]),
    ("resume to fewer epochs than trained", lambda tmp: ["train", "--resume", "--run-dir", tmp / "run", "--epochs", "0"],
     EXIT_USAGE, ["--epochs", ">= 1"]),
    ("seed negative", _train("--seed", "-1"), EXIT_USAGE, ["--seed", "-1"]),
    ("gradvar-batch beyond the validation set", _train("--gradvar-epochs", "1", "--gradvar-batch", "64"), EXIT_USAGE,
     ["--gradvar-batch", "32", "64"]),
    ("logvar-floor with the linear head", _train("--logvar-floor", "-5"), EXIT_USAGE, ["--logvar-floor", "no effect"]),
    ("config file of another type", lambda tmp: ["train", "--config", tmp / "run" / "checkpoints" / "last.pt",
                                                 "--run-dir", tmp / "new"], EXIT_INPUT, ["last.pt", "config file"]),
    ("reproduce an unknown arm", lambda tmp: ["reproduce", "run", "categorical", "--scale", "smoke", "--arms",
                                              "cat-silent,cat-gumbel", "--out", tmp / "r", "--runs", tmp / "rr"],
     EXIT_USAGE, ["--arms", "cat-silent,cat-gumbel", "separated by spaces"]),
    ("eval needs a run folder", lambda tmp: ["eval"], EXIT_USAGE, ["RUN_DIR or --run-dir"]),
    ("eval samples on the exact head", lambda tmp: ["eval", tmp / "run", "--samples", "4"], EXIT_USAGE,
     ["--samples", "linear"]),
    ("gradvar batch beyond the validation set", lambda tmp: ["gradvar", tmp / "run", "--batch", "1000"], EXIT_USAGE,
     ["--batch", "32", "1000"]),
    ("eval two run folders", lambda tmp: ["eval", tmp / "run", "--run-dir", tmp / "other"], EXIT_USAGE,
     ["two run folders"]),
    ("eval limit zero", lambda tmp: ["eval", "--run-dir", tmp / "run", "--limit", "0"], EXIT_USAGE, ["--limit", ">= 1"]),
    ("eval test split of digits", lambda tmp: ["eval", tmp / "run", "--split", "test"], EXIT_USAGE, ["--split test"]),
    ("eval on cuda without CUDA", lambda tmp: ["eval", tmp / "run", "--device", "cuda"], EXIT_USAGE, ["--device cuda"]),
    ("eval missing checkpoint", lambda tmp: ["eval", tmp / "run", "--checkpoint", tmp / "x.pt"], EXIT_INPUT,
     ["x.pt", "no checkpoint"]),
    ("gradvar one draw", lambda tmp: ["gradvar", "--run-dir", tmp / "run", "--draws", "1"], EXIT_USAGE, ["--draws", ">= 2"]),
    ("gradvar wrong estimator", lambda tmp: ["gradvar", tmp / "run", "--estimators", "gumbel"], EXIT_USAGE,
     ["gumbel", "gaussian"]),
    ("plot zero images", lambda tmp: ["plot", tmp / "run", "--n", "0"], EXIT_USAGE, ["--n", ">= 1"]),
    ("plot labels mismatch", lambda tmp: ["plot", tmp / "run", "--labels", "a", "b"], EXIT_USAGE, ["--labels"]),
    ("plot out is a file", lambda tmp: ["plot", tmp / "run", "--out", tmp / "run" / "config.json"], EXIT_USAGE,
     ["--out", "is a file"]),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_command_line(case, run_copy, tmp_path):
    _, argv, expected_code, words = case
    before = {p: digest(p) for p in run_copy.rglob("*") if p.is_file() and p.name != ".lock"}
    code, _, err = run_cli(argv(tmp_path))
    assert code == expected_code, err
    assert_one_error_line(err, *words)
    assert {p: digest(p) for p in before} == before           # the existing run is untouched
    assert not (tmp_path / "new" / "checkpoints").exists()     # nothing was trained


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UsageError, match="--train-limit"):
        cli.main(["train", "--run-dir", str(tmp_path / "d"), *TINY, "--train-limit", "-1", "--debug"])


# ------------------------------------------------------------ corrupt and truncated files

def _checkpoint(run):
    return run / "checkpoints" / "last.pt"


def truncate_half(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _edit_checkpoint(edit):
    def apply(path):
        ckpt = torch.load(path, weights_only=True)
        edit(ckpt)
        torch.save(ckpt, path)
    return apply


def _nan_weight(ckpt):
    key = next(iter(ckpt["model"]))
    ckpt["model"][key] = torch.full_like(ckpt["model"][key], float("nan"))


def _wrong_width(ckpt):
    ckpt["config"]["latent_dim"] = 7


def _future_field(ckpt):
    ckpt["config"]["warmup_epochs"] = 3


CHECKPOINT_FAULTS = [
    ("truncated", truncate_half, ["last.pt", "truncated or corrupt"]),
    ("empty", lambda p: p.write_bytes(b""), ["last.pt", "truncated or corrupt"]),
    ("random bytes", lambda p: p.write_bytes(os.urandom(2048)), ["last.pt", "truncated or corrupt"]),
    ("a pickled list", lambda p: torch.save([1, 2], p), ["last.pt", "not a silent-vae checkpoint"]),
    ("no config", _edit_checkpoint(lambda c: c.pop("config")), ["last.pt", "missing config"]),
    ("non-finite weights", _edit_checkpoint(_nan_weight), ["last.pt", "non-finite"]),
    ("weights of another shape", _edit_checkpoint(_wrong_width), ["last.pt", "do not match"]),
    ("a config field this version lacks", _edit_checkpoint(_future_field), ["last.pt", "warmup_epochs"]),
]


@pytest.mark.parametrize("command", ["eval", "gradvar", "resume"])
@pytest.mark.parametrize("fault", CHECKPOINT_FAULTS, ids=[f[0] for f in CHECKPOINT_FAULTS])
def test_corrupt_checkpoint(fault, command, run_copy):
    _, corrupt, words = fault
    corrupt(_checkpoint(run_copy))
    before = digest(_checkpoint(run_copy))
    argv = {"eval": ["eval", run_copy], "gradvar": ["gradvar", run_copy, "--draws", "3"],
            "resume": ["train", "--resume", "--run-dir", run_copy, "--epochs", "2"]}[command]
    code, _, err = run_cli(argv)
    assert code in (EXIT_INPUT, EXIT_USAGE), err
    assert_one_error_line(err, *words)
    assert digest(_checkpoint(run_copy)) == before


def test_resume_needs_only_the_checkpoint(run_copy):
    """config.json is a copy for people; resuming reads the config from the checkpoint."""
    (run_copy / "config.json").write_text("{trunc")
    code, _, err = run_cli(["train", "--resume", "--run-dir", run_copy, "--epochs", "2"])
    assert code == 0, err
    assert json.loads((run_copy / "config.json").read_text())["epochs"] == 2


CONFIG_FILE_FAULTS = [
    ("not JSON", "{not json", ["cfg.json", "not a readable config file"]),
    ("a list", "[1, 2]", ["cfg.json", "JSON object", "list"]),
    ("unknown field", json.dumps({"learning_rate": 1}), ["unknown config field", "learning_rate"]),
    ("string for a number", json.dumps({"lr": "fast"}), ["--lr", "'fast'"]),
    ("fraction for an int", json.dumps({"seed": 2.5}), ["--seed", "2.5"]),
    ("null for a required int", json.dumps({"eval_every": None}), ["--eval-every", "None"]),
    ("boolean for an int", json.dumps({"latent_dim": True}), ["--latent-dim", "True"]),
]


@pytest.mark.parametrize("fault", CONFIG_FILE_FAULTS, ids=[f[0] for f in CONFIG_FILE_FAULTS])
def test_bad_config_file(fault, tmp_path):
    _, text, words = fault
    (tmp_path / "cfg.json").write_text(text)
    code, _, err = run_cli(["train", "--config", tmp_path / "cfg.json", "--run-dir", tmp_path / "r"])
    assert code in (EXIT_USAGE, EXIT_INPUT), err
    assert_one_error_line(err, *words)


def test_missing_config_file(tmp_path):
    code, _, err = run_cli(["train", "--config", tmp_path / "none.json", "--run-dir", tmp_path / "r"])
    assert code == EXIT_INPUT
    assert_one_error_line(err, "none.json", "no such config file")


@pytest.mark.parametrize("where", ["last line", "first line", "cut short"])
def test_resume_never_drops_unreadable_metrics(where, run_copy):
    path = run_copy / "metrics.jsonl"
    good = path.read_text()
    bad = {"last line": good + "garbage line\n", "first line": "{bad\n" + good,
           "cut short": good + '{"epoch": 2, "val_b'}[where]
    path.write_text(bad)
    code, _, err = run_cli(["train", "--resume", "--run-dir", run_copy, "--epochs", "2"])
    assert code == 0, err
    assert "warning:" in err and "metrics.jsonl" in err and "moved to" in err
    aside = [p for p in run_copy.iterdir() if p.name.startswith("metrics.jsonl.corrupt-")]
    assert len(aside) == 1 and aside[0].read_text() == bad            # kept byte for byte
    assert [r["epoch"] for r in MetricsLog(str(path)).read()] == [1, 2]


def test_fresh_start_moves_earlier_records_aside(run_copy):
    """A start that wrote a record but no checkpoint (killed, or a full disk, between the two
    writes): starting again keeps those records in a side file."""
    (run_copy / "checkpoints" / "last.pt").unlink()
    records = (run_copy / "metrics.jsonl").read_text()
    code, _, err = run_cli(["train", "--run-dir", run_copy, *TINY])
    assert code == 0, err
    assert "moved to" in err
    aside = [p for p in run_copy.iterdir() if p.name.startswith("metrics.jsonl.old-")]
    assert len(aside) == 1 and aside[0].read_text() == records
    assert [r["epoch"] for r in MetricsLog(str(run_copy / "metrics.jsonl")).read()] == [1]


def test_resume_cannot_shrink_a_run(run_copy):
    code, _, err = run_cli(["train", "--resume", "--run-dir", run_copy, "--epochs", "2"])
    assert code == 0, err
    config = (run_copy / "config.json").read_text()
    code, _, err = run_cli(["train", "--resume", "--run-dir", run_copy, "--epochs", "1"])
    assert code == EXIT_USAGE
    assert_one_error_line(err, "already trained 2 epochs", "--epochs >= 2", "got 1")
    assert (run_copy / "config.json").read_text() == config


def test_unreadable_metrics_line_is_refused_by_plot(run_copy, tmp_path):
    with open(run_copy / "metrics.jsonl", "a") as fh:
        fh.write("not json\n")
    code, _, err = run_cli(["plot", run_copy, "--out", tmp_path / "figs"])
    assert code == EXIT_INPUT
    assert_one_error_line(err, "metrics.jsonl", "line 2")


def _idx(array: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _mnist_folder(root, images=None, test_images=None, gz=True, cut=None):
    images = np.zeros((40, 28, 28), np.uint8) if images is None else images
    test_images = images if test_images is None else test_images
    files = {"train-images-idx3-ubyte": _idx(images), "train-labels-idx1-ubyte": _idx(np.zeros(len(images), np.uint8)),
             "t10k-images-idx3-ubyte": _idx(test_images),
             "t10k-labels-idx1-ubyte": _idx(np.zeros(len(test_images), np.uint8))}
    root.mkdir()
    for name, blob in files.items():
        blob = gzip.compress(blob) if gz else blob
        if cut == name:
            blob = blob[:len(blob) // 2]
        (root / (name + (".gz" if gz else ""))).write_bytes(blob)
    return root


def _cifar_folder(root, test_blob=None, first_blob=None):
    batch = pickle.dumps({b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 10}, protocol=2)
    root.mkdir()
    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(first_blob if (i == 1 and first_blob) else batch)
    (root / "test_batch").write_bytes(test_blob if test_blob is not None else batch)
    return root


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


DATA_FAULTS = [
    ("truncated gz", lambda r: _mnist_folder(r, cut="train-images-idx3-ubyte"), "mnist",
     EXIT_INPUT, ["train-images-idx3-ubyte.gz", "truncated or corrupt"]),
    ("truncated raw IDX", lambda r: _mnist_folder(r, gz=False, cut="train-images-idx3-ubyte"), "mnist",
     EXIT_INPUT, ["train-images-idx3-ubyte", "needs exactly"]),
    ("not gzip inside .gz", lambda r: (_mnist_folder(r), (r / "t10k-images-idx3-ubyte.gz").write_bytes(
        b"\x1f\x8b" + os.urandom(64)))[0], "mnist", EXIT_INPUT, ["t10k-images-idx3-ubyte.gz"]),
    ("train and test sizes differ", lambda r: _mnist_folder(r, test_images=np.zeros((40, 20, 20), np.uint8)),
     "mnist", EXIT_INPUT, ["(1, 20, 20)", "(1, 28, 28)"]),
    ("test files missing", lambda r: (_mnist_folder(r), (r / "t10k-images-idx3-ubyte.gz").unlink())[0],
     "mnist", EXIT_INPUT, ["t10k images"]),
    ("truncated CIFAR pickle", lambda r: _cifar_folder(r, test_blob=pickle.dumps({b"data": 1}, protocol=2)[:9]),
     "cifar10", EXIT_INPUT, ["test_batch", "not a readable CIFAR-10 python batch"]),
    ("CIFAR pickle that runs code", lambda r: _cifar_folder(r, first_blob=pickle.dumps({b"data": _RunsCode()},
                                                                                      protocol=2)),
     "cifar10", EXIT_INPUT, ["data_batch_1", "refusing to load global"]),
    ("CIFAR batch missing", lambda r: (_cifar_folder(r), (r / "data_batch_3").unlink())[0], "cifar10",
     EXIT_INPUT, ["data_batch_3"]),
    ("ImageNet32 npz not a zip", lambda r: (r.mkdir(), (r / "train_data_batch_1.npz").write_bytes(b"PK\x03\x04x"), r)[2],
     "imagenet32", EXIT_INPUT, ["train_data_batch_1.npz"]),
]


@pytest.mark.parametrize("fault", DATA_FAULTS, ids=[f[0] for f in DATA_FAULTS])
def test_corrupt_data_files(fault, tmp_path, monkeypatch):
    _, make, dataset, expected_code, words = fault
    monkeypatch.chdir(tmp_path)
    root = make(tmp_path / "data")
    code, _, err = run_cli(["train", "--run-dir", tmp_path / "r", *TINY, "--dataset", dataset,
                            "--data-root", root, "--train-limit", "8", "--val-limit", "8", "--batch-size", "8"])
    assert code == expected_code, err
    assert_one_error_line(err, *words)
    assert not (tmp_path / "pwned").exists()


def test_plot_refuses_runs_of_different_image_shapes(base_run, tmp_path):
    cifar = _cifar_folder(tmp_path / "cifar")
    run = tmp_path / "cifar-run"
    code, _, err = run_cli(["train", "--run-dir", run, *TINY, "--dataset", "cifar10", "--data-root", cifar,
                            "--train-limit", "16", "--val-limit", "8", "--batch-size", "8",
                            "--enc-channels", "2,2,2,2", "--dec-channels", "2,2,2,2"])
    assert code == 0, err
    code, _, err = run_cli(["plot", base_run, run, "--out", tmp_path / "figs"])
    assert code == EXIT_USAGE
    assert_one_error_line(err, "different image shapes", "(1, 28, 28)", "(3, 32, 32)")


def test_corrupt_digits_csv(tmp_path):
    (tmp_path / "digits.csv").write_text("1,2,3\n")
    code, _, err = run_cli(["train", "--run-dir", tmp_path / "r", *TINY, "--data-root", tmp_path / "digits.csv"])
    assert code == EXIT_INPUT
    assert_one_error_line(err, "digits.csv", "785")


# ------------------------------------------------------------ full disk (mocked ENOSPC)

def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_on_checkpoint_keeps_the_last_one(run_copy, monkeypatch):
    before = digest(_checkpoint(run_copy))
    monkeypatch.setattr(torch, "save", _no_space)
    code, _, err = run_cli(["train", "--resume", "--run-dir", run_copy, "--epochs", "2"])
    assert code == EXIT_WRITE
    assert_one_error_line(err, "last.pt", "No space left on device")
    monkeypatch.undo()
    assert digest(_checkpoint(run_copy)) == before
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["last.pt"]    # no temp file
    # the metrics record of the epoch that could not be checkpointed is redone on resume
    code, _, err = run_cli(["train", "--resume", "--run-dir", run_copy, "--epochs", "2"])
    assert code == 0, err
    assert [r["epoch"] for r in MetricsLog(str(run_copy / "metrics.jsonl")).read()] == [1, 2]


def test_full_disk_on_metrics(run_copy, monkeypatch):
    real_write = os.write

    def write(fd, data):
        if data.startswith(b'{"epoch"'):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    code, _, err = run_cli(["train", "--resume", "--run-dir", run_copy, "--epochs", "2"])
    assert code == EXIT_WRITE
    assert_one_error_line(err, "metrics.jsonl", "No space left on device")
    assert load_checkpoint(str(_checkpoint(run_copy)))["epoch"] == 1


def test_full_disk_on_new_run(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _no_space)
    code, _, err = run_cli(["train", "--run-dir", tmp_path / "r", *TINY])
    assert code == EXIT_WRITE
    assert_one_error_line(err, "No space left on device")
    assert not (tmp_path / "r" / "checkpoints" / "last.pt").exists()


def test_full_disk_on_eval_output(run_copy, monkeypatch):
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("eval_val.json"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    code, _, err = run_cli(["eval", run_copy])
    assert code == EXIT_WRITE
    assert_one_error_line(err, "eval_val.json", "quota")
    assert not any(p.name.endswith(".tmp") for p in run_copy.iterdir())


# ------------------------------------------------------------ divergence

def test_divergence_from_a_huge_learning_rate(tmp_path):
    code, _, err = run_cli(["train", "--run-dir", tmp_path / "r", *TINY, "--lr", "1e30", "--epochs", "2"])
    assert code == EXIT_DIVERGED
    line = assert_one_error_line(err, "training diverged at epoch 1, step", "no checkpoint had been written")
    assert "--lr" in line
    assert not _checkpoint(tmp_path / "r").exists()


def test_divergence_keeps_the_last_good_checkpoint_and_resume_works(run_copy):
    good = digest(_checkpoint(run_copy))
    code, _, err = run_cli(["train", "--resume", "--run-dir", run_copy, "--epochs", "3", "--lr", "1e30"])
    assert code == EXIT_DIVERGED
    assert_one_error_line(err, "training diverged at epoch 2, step ", str(_checkpoint(run_copy)), "(epoch 1)",
                          "--resume")
    assert digest(_checkpoint(run_copy)) == good
    assert [r["epoch"] for r in MetricsLog(str(run_copy / "metrics.jsonl")).read()] == [1]
    code, _, err = run_cli(["train", "--resume", "--run-dir", run_copy, "--epochs", "3", "--lr", "1e-4"])
    assert code == 0, err
    recs = MetricsLog(str(run_copy / "metrics.jsonl")).read()
    assert [(r["epoch"], r["lr"]) for r in recs] == [(1, 5e-4), (2, 1e-4), (3, 1e-4)]


def test_non_finite_weights_after_a_step_are_caught(tmp_path, monkeypatch):
    """A finite loss can still leave non-finite weights (an optimiser overflow): checked after
    every step, before anything is written."""
    cfg = make_config(None, dict(train_limit=64, val_limit=32, latent_dim=6, enc_channels=[2, 3, 3],
                                 dec_channels=[2, 3, 3, 3, 3], batch_size=32, progress=False,
                                 figures=False, epochs=2))
    trainer = Trainer(cfg, str(tmp_path / "r"), log=lambda m: None)
    real_step = torch.optim.AdamW.step

    def poisoned_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        if trainer.step == 3:                       # the second step of epoch 2
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 4: the optimizer step made encoder\..* non-finite"):
        trainer.fit()
    ckpt = load_checkpoint(str(_checkpoint(tmp_path / "r")))
    assert ckpt["epoch"] == 1 and not RunDirLock(str(tmp_path / "r")).acquire().release()


# ------------------------------------------------------------ concurrent runs and SIGKILL

def _cli_process(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "silent_kernels.api.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


LONG = [*TINY, "--train-limit", "320", "--epochs", "3", "--seed", "4"]


def test_two_trainings_into_one_run_dir(tmp_path):
    """Two processes race for one folder: exactly one trains, the other is refused with one line.
    Which refusal it gets depends on timing (on a loaded machine the winner may have written its
    first checkpoint, or finished, before the loser starts); both keep the winner's run intact.
    The lock's own message is checked deterministically in the next test."""
    run = tmp_path / "shared"
    first, second = _cli_process("train", "--run-dir", run, *LONG), _cli_process("train", "--run-dir", run, *LONG)
    results = [(p.wait(timeout=600), p.communicate()[1]) for p in (first, second)]
    codes = sorted(code for code, _ in results)
    assert codes == [0, EXIT_RUN_DIR], results
    loser = next(err for code, err in results if code == EXIT_RUN_DIR)
    line = assert_one_error_line(loser, str(run))
    assert ("in use by another silent-vae process" in line) or ("already holds a run" in line), line
    assert [r["epoch"] for r in MetricsLog(str(run / "metrics.jsonl")).read()] == [1, 2, 3]


def test_lock_is_released_by_exit_and_refused_while_held(tmp_path):
    run = str(tmp_path / "locked")
    with RunDirLock(run):
        code, _, err = run_cli(["train", "--run-dir", run, *TINY])
        assert code == EXIT_RUN_DIR
        assert_one_error_line(err, f"pid {os.getpid()}")
    code, _, err = run_cli(["train", "--run-dir", run, *TINY])
    assert code == 0, err


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = _cli_process("train", "--run-dir", run, *LONG)
    assert proc.wait(timeout=600) == 0, proc.communicate()[1]
    return run


def _wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while not predicate() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)


KILL_POINTS = [
    ("after start, before any checkpoint", lambda run: (run / "config.json").exists()),
    ("after the first checkpoint", lambda run: (run / "checkpoints" / "last.pt").exists()),
    ("after the second epoch's record", lambda run: (run / "metrics.jsonl").exists()
     and (run / "metrics.jsonl").read_text().count("\n") >= 2),
]


@pytest.mark.parametrize("point", KILL_POINTS, ids=[p[0] for p in KILL_POINTS])
def test_sigkill_then_resume_is_bit_identical(point, reference_run, tmp_path):
    _, reached = point
    run = tmp_path / "killed"
    proc = _cli_process("train", "--run-dir", run, *LONG)
    _wait_for(lambda: reached(run), proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    if (run / "checkpoints" / "last.pt").exists():
        resumed = _cli_process("train", "--resume", "--run-dir", run)
    else:   # killed before its first checkpoint: --resume says so, a fresh start takes the folder
        code, _, err = run_cli(["train", "--resume", "--run-dir", run])
        assert code == EXIT_RUN_DIR
        assert_one_error_line(err, "holds no checkpoint", "without --resume")
        resumed = _cli_process("train", "--run-dir", run, *LONG)
    assert resumed.wait(timeout=600) == 0, resumed.communicate()[1]
    a, b = (load_checkpoint(str(_checkpoint(r))) for r in (reference_run, run))
    assert a["step"] == b["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    strip = lambda r: {k: v for k, v in r.items() if "time" not in k}   # noqa: E731
    assert [strip(r) for r in MetricsLog(str(run / "metrics.jsonl")).read()] == \
        [strip(r) for r in MetricsLog(str(reference_run / "metrics.jsonl")).read()]


# ------------------------------------------------------------ bad inputs to the Python API

API_CASES = [
    ("config from a list", lambda: TrainConfig.from_dict([1]), UsageError, "JSON object"),
    ("config unknown field", lambda: TrainConfig.from_dict({"lrr": 1}), UsageError, "lrr"),
    ("config string epochs", lambda: TrainConfig(epochs="5").validate(), UsageError, "--epochs"),
    ("config negative seed", lambda: TrainConfig(seed=-1).validate(), UsageError, "--seed"),
    ("config nan sigma2", lambda: TrainConfig(sigma2=float("nan")).validate(), UsageError, "--sigma2"),
    ("checkpoint garbage", lambda: load_checkpoint(__file__), InputFileError, "not a readable checkpoint"),
    ("checkpoint missing", lambda: load_checkpoint("/nonexistent/last.pt"), InputFileError, "no checkpoint"),
    ("save under a file", lambda: save_atomic({}, __file__ + "/x.pt"), OSError, "cannot write"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_bad_api_input(case):
    _, call, error, words = case
    with pytest.raises(error, match=words):
        call()


def test_metrics_log_names_the_bad_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": "two"}\n')
    with pytest.raises(InputFileError, match=r"metrics.jsonl: line 2 is not a metrics record"):
        MetricsLog(str(path)).read()
