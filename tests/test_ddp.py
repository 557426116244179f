"""Data parallelism with DistributedDataParallel (gloo on CPU) under torchrun: 1, 2 and 4
processes train the same global batches (DistributedSampler + seeded global draws) and end
with the same weights up to floating-point summation order, through Algorithm 1's dual
decoder and its encoder freeze (the DDP wrapper is rebuilt at the cut-off)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from silent_kernels.api.checkpoints import load_checkpoint

# 96 training images, global batch 32: 3 steps per epoch for every world size; the encoder
# trains in epoch 1 and is frozen in epoch 2 (cutoff_epoch 2).
ARGS = ["--dataset", "digits", "--train-limit", "96", "--val-limit", "32", "--latent", "bernoulli",
        "--decoder", "dual", "--variance", "learned", "--estimator", "gumbel", "--latent-dim", "6",
        "--enc-channels", "2,3,3", "--dec-channels", "2,3,3,3,3", "--batch-size", "32",
        "--anneal-rate", "0.5", "--cutoff-epoch", "2", "--epochs", "2", "--num-threads", "1",
        "--no-progress", "--no-figures", "--seed", "7"]


def _train(run_dir, processes: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = ["-m", "silent_kernels.api.cli", "train", "--run-dir", str(run_dir), *ARGS]
    if processes == 1:
        cmd = [sys.executable, *cli]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(processes), *cli]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    procs = {n: _train(root / f"world{n}", n) for n in (1, 2, 4)}
    for n, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{n} processes:\n{out}\n{err}"
    return {n: root / f"world{n}" for n in procs}


def test_one_two_four_processes_agree(runs):
    ckpts = {n: load_checkpoint(str(path / "checkpoints" / "last.pt")) for n, path in runs.items()}
    ref = ckpts[1]
    assert ref["step"] == 6
    for n in (2, 4):
        got = ckpts[n]
        assert got["step"] == ref["step"] and got["epoch"] == 2
        for key, value in ref["model"].items():
            assert torch.allclose(value, got["model"][key], rtol=1e-4, atol=1e-6), (n, key)
        metrics = [json.loads(line) for line in open(runs[n] / "metrics.jsonl")]
        ref_metrics = [json.loads(line) for line in open(runs[1] / "metrics.jsonl")]
        for a, b in zip(metrics, ref_metrics):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5), n
            assert a["val_bpd"] == pytest.approx(b["val_bpd"], rel=1e-5), n
        assert [r["encoder_frozen"] for r in metrics] == [False, True]


def test_frozen_encoder_stays_put_under_ddp(runs):
    """Epoch 2 is past the cut-off: the encoder and the linear head keep their epoch-1 weights
    in every world size, while the nonlinear decoder keeps training."""
    run = runs[4]
    info = json.load(open(run / "run_info.json"))
    assert info["world_size"] == 4 and info["data_parallel"] == "DistributedDataParallel (gloo)"
    assert json.load(open(runs[1] / "run_info.json"))["data_parallel"] is None
    final = load_checkpoint(str(run / "checkpoints" / "last.pt"))
    assert final["optimizers"]["encoder"]["state"]  # the encoder did train in epoch 1
    steps = {name: [s["step"] for s in opt["state"].values()]
             for name, opt in final["optimizers"].items()}
    # AdamW's per-parameter step counters: 3 steps for the encoder and heads (epoch 1 only),
    # 6 for the nonlinear decoder (both epochs)
    assert {float(s) for s in steps["encoder"]} == {3.0}
    assert {float(s) for s in steps["mu"]} == {3.0}
    assert {float(s) for s in steps["nonlinear"]} == {6.0}


def test_batch_size_must_split_over_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = list(ARGS)
    args[args.index("--batch-size") + 1] = "31"              # odd: does not split over 2 processes
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "-m", "silent_kernels.api.cli", "train",
                          "--run-dir", str(tmp_path / "r"), *args],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    line = "silent-vae: error: --batch-size: expected a multiple of the 2 processes, got 31"
    assert res.stderr.count(line) == 2          # one line per process (torchrun adds its summary)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_failure_of_rank_zero_stops_every_process(runs):
    """Only rank 0 checks the run folder; the other processes must not wait for it forever."""
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "silent_kernels.api.cli", "train", "--run-dir", str(runs[2]), *ARGS],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert res.stderr.count("silent-vae: error: --run-dir") == 1 and "already holds a run" in res.stderr
    assert "silent-vae: error: another process of this torchrun job failed (exit code 5)" in res.stderr
    assert "Connection closed by peer" not in res.stderr
