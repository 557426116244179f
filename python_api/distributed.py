"""Data parallelism for the trainer: process group, devices, sampling and the DDP wrapper.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process trains a replica; ``torch.nn.parallel.
DistributedDataParallel`` averages the gradients during ``backward`` (bucketed all-reduce,
gloo on CPU, nccl on CUDA). ``epoch_batches`` splits each epoch with
``torch.utils.data.DistributedSampler`` so that the union of the processes' j-th batches is
exactly the single-process run's j-th batch (the sampler deals a seeded permutation out
round-robin; see ``epoch_batches``), which is what makes 1, 2 or 4 processes give the same
result up to floating-point summation order.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from .errors import EXIT_INTERNAL, PeerFailure, SilentVAEError, UsageError

T = TypeVar("T")

__all__ = ["dist_info", "init_from_env", "shutdown", "local_device", "check_device",
           "epoch_batches", "all_reduce_sum", "barrier", "GradientSync", "describe",
           "run_together"]


def dist_info() -> tuple[int, int]:
    """(rank, world size): (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"environment variable {name}: expected an integer, got {text!r}") from None


def local_device(device: str) -> str:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun (one GPU per process)."""
    if device == "cuda" and _env_int("WORLD_SIZE", 1) > 1:
        return f"cuda:{_env_int('LOCAL_RANK', 0)}"
    return device


def check_device(device: str, option: str = "--device") -> torch.device:
    """The torch.device for ``device``; ``UsageError`` naming ``option`` when it is not a CPU
    or an available CUDA device."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"{option}: expected cpu, cuda or cuda:N, got {device!r}") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        raise UsageError(f"{option}: expected cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        raise UsageError(f"{option} {device}: CUDA is not available here (torch {torch.__version__}, "
                         f"{'a CPU-only build' if torch.version.cuda is None else 'no usable GPU'}); "
                         "use --device cpu")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise UsageError(f"{option} {device}: only {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return parsed


def init_from_env(device: str) -> None:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    if _env_int("WORLD_SIZE", 1) <= 1 or (dist.is_available() and dist.is_initialized()):
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    dist.init_process_group(backend=backend)


def describe() -> str | None:
    """"DistributedDataParallel (gloo)" / "(nccl)" under torchrun, None for one process."""
    if dist_info()[1] > 1:
        return f"DistributedDataParallel ({dist.get_backend()})"
    return None


def shutdown() -> None:
    """Leave the process group together: without the barrier a rank that tears down gloo while a
    peer is still sending can abort ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:   # a peer already failed: its error is what gets reported
            pass
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the processes in place (identity for one process)."""
    if dist_info()[1] > 1:
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if dist_info()[1] > 1:
        dist.barrier()


def run_together(work: Callable[[], T]) -> T:
    """``work()`` on every process, then a collective check: when it raised on any process,
    it raises everywhere (the others raise ``PeerFailure`` with the failing exit code) instead
    of leaving them waiting in the next collective for a peer that is gone. Also a barrier."""
    error, code = None, 0
    try:
        result = work()
    except SilentVAEError as exc:
        error, code = exc, exc.exit_code
    except Exception as exc:    # noqa: BLE001 - re-raised below after the peers are told
        error, code = exc, EXIT_INTERNAL
    if dist_info()[1] > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        flag = torch.tensor([code], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        worst = int(flag.item())
    else:
        worst = code
    if error is not None:
        raise error
    if worst:
        raise PeerFailure(worst)
    return result


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int) -> list[torch.Tensor]:
    """This process's index batches for 0-based ``epoch`` over ``n`` training images.

    ``DistributedSampler(shuffle=True, seed=seed)`` permutes ``range(n)`` with a generator
    seeded ``seed + epoch`` and gives rank r the positions r, r + W, r + 2W, ... (W processes).
    Rank r's j-th batch of ``batch_size / W`` indices is therefore the rows r::W of the
    permutation's j-th block of ``batch_size``: the union over ranks is the single-process
    batch j. When ``n`` is not a multiple of W the sampler repeats the first few indices of
    the permutation to even out the last batch (torch's documented padding)."""
    rank, world = dist_info()
    if batch_size % world:
        raise UsageError(f"--batch-size {batch_size}: the global batch must split evenly over the "
                         f"{world} processes (a multiple of {world})")
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    local = torch.tensor(list(sampler), dtype=torch.long)
    per_rank = batch_size // world
    return list(local.split(per_rank))


class GradientSync:
    """The module that computes a training step's loss, wrapped in DistributedDataParallel
    when there is more than one process.

    ``module(parts)`` must build an ``nn.Module`` whose registered submodules are exactly the
    ``parts`` that train in the current phase. Algorithm 1 freezes the encoder at its cut-off
    epoch; DDP expects every registered parameter to receive a gradient in every step, so the
    wrapper is rebuilt (over the smaller set of modules) when the set of trained parts changes.
    """

    def __init__(self, build, device: torch.device):
        self.build = build
        self.device = device
        self.parts: Optional[tuple] = None
        self.module: Optional[nn.Module] = None

    def __call__(self, parts: tuple[str, ...]) -> nn.Module:
        if parts != self.parts:
            module = self.build(parts)
            if dist_info()[1] > 1:
                ids = [self.device.index] if self.device.type == "cuda" else None
                module = DistributedDataParallel(module, device_ids=ids)
            self.parts, self.module = parts, module
        return self.module
