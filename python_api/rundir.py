"""Ownership of a run folder and its ``metrics.jsonl``.

``RunDirLock``: an exclusive ``fcntl.flock`` on ``RUN_DIR/.lock`` held by the one process
that trains into the folder. The kernel drops the lock when the process exits, however it
exits (SIGKILL included), so a stale lock file never blocks a later ``--resume``.

``MetricsLog``: one JSON object per line, each appended with a single ``write`` on an
``O_APPEND`` descriptor and fsynced, so a line is either wholly there or absent. Reading is
strict: an unreadable line raises ``InputFileError`` naming the file and line number.
``MetricsLog.truncate_after`` (used by ``--resume``) keeps the records up to the checkpoint's
epoch; if the file holds unreadable lines it is first moved aside to
``metrics.jsonl.corrupt-<time>`` (nothing is deleted) and a warning names it.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from typing import Callable, Optional

from .checkpoints import fsync_folder
from .errors import InputFileError, RunDirError, WriteError

__all__ = ["RunDirLock", "MetricsLog", "LOCK_NAME", "epoch_line"]

LOCK_NAME = ".lock"


class RunDirLock:
    """Exclusive, non-blocking ownership of a run folder (``with RunDirLock(path): ...``)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunDirLock":
        if self._fd is not None:
            return self
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileExistsError:
            raise RunDirError(f"--run-dir {self.run_dir}: exists and is not a folder") from None
        except NotADirectoryError:
            raise RunDirError(f"--run-dir {self.run_dir}: a parent of it is a file, not a folder") from None
        except OSError as exc:
            raise WriteError(exc.errno, f"--run-dir {self.run_dir}: cannot create the run folder "
                                        f"({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise RunDirError(f"--run-dir {self.run_dir}: in use by another silent-vae process "
                              f"(pid {owner}); wait for it to finish or choose another --run-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)       # closing the descriptor releases the flock

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        self.release()


class MetricsLog:
    """Append-only JSON-lines file of per-epoch records (see the module docstring)."""

    def __init__(self, path: str):
        self.path = path

    def create(self, warn: Callable[[str], None]) -> None:
        """Start an empty log (a new run). Records left by an earlier start that never wrote a
        checkpoint are moved aside to ``metrics.jsonl.old-<time>`` (with a warning), not erased."""
        try:
            if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
                aside = f"{self.path}.old-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
                os.replace(self.path, aside)
                warn(f"warning: {self.path} held records of an earlier start without a checkpoint; "
                     f"moved to {aside}")
            with open(self.path, "w"):
                pass
        except OSError as exc:
            raise WriteError(exc.errno, f"cannot write {self.path}: {exc.strerror or exc}") from None

    def append(self, record: dict) -> None:
        data = (json.dumps(record) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(28, f"short write ({written} of {len(data)} bytes)")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise WriteError(exc.errno, f"cannot append to {self.path}: {exc.strerror or exc}") from None

    def _lines(self) -> list[tuple[int, str, Optional[dict]]]:
        """(line number, text, record or None when unreadable) for every non-blank line."""
        if not os.path.exists(self.path):
            return []
        try:
            with open(self.path, encoding="utf-8", errors="replace") as fh:
                text = fh.read()
        except OSError as exc:
            raise InputFileError(f"{self.path}: cannot read ({exc.strerror or exc})") from None
        out = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
                record = None
            out.append((number, line, record))
        return out

    def read(self) -> list[dict]:
        """Every record; an unreadable line raises ``InputFileError`` with its line number."""
        records = []
        for number, line, record in self._lines():
            if record is None:
                raise InputFileError(f"{self.path}: line {number} is not a metrics record "
                                     f"(expected a JSON object with an integer 'epoch', got {line[:60]!r})")
            records.append(record)
        return records

    def truncate_after(self, epoch: int, warn: Callable[[str], None]) -> None:
        """Keep the records of epochs <= ``epoch`` (the checkpoint's): later ones belong to an
        epoch that was cut short and will be redone. Unreadable lines are never dropped: the
        whole file is first moved aside and ``warn`` names it and the lines."""
        lines = self._lines()
        bad = [number for number, _, record in lines if record is None]
        kept = [line + "\n" for _, line, record in lines if record is not None and record["epoch"] <= epoch]
        if bad:
            aside = f"{self.path}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
            os.replace(self.path, aside)
            warn(f"warning: {self.path}: line(s) {', '.join(map(str, bad[:10]))} unreadable; the file "
                 f"was moved to {aside} unchanged and the {len(kept)} readable record(s) up to epoch "
                 f"{epoch} were kept in {os.path.basename(self.path)}")
        elif len(kept) == len(lines):
            return
        tmp = self.path + f".{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as fh:
                fh.writelines(kept)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            raise WriteError(exc.errno, f"cannot write {self.path}: {exc.strerror or exc}") from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        fsync_folder(os.path.dirname(os.path.abspath(self.path)))


def epoch_line(rec: dict, epochs: int) -> str:
    """The one-line progress report of a metrics record (an estimated or approximate BPD labelled)."""
    parts = [f"epoch {rec['epoch']}/{epochs}", f"loss {rec.get('train_loss', float('nan')):.4f}"]
    for key in ("val_bpd", "val_mse", "val_kld"):
        if key in rec:
            parts.append(f"{key[4:]} {rec[key]:.4f}")
            if key == "val_bpd" and rec.get("val_bpd_kind", "exact") != "exact":
                parts[-1] += f" ({rec['val_bpd_kind']})"   # an estimate or the Taylor approximation
    if "gradvar" in rec:
        parts.append("gradvar " + ", ".join(f"{k} {v['total']:.3g}" for k, v in rec["gradvar"].items()))
    parts.append(f"{rec.get('time_s', rec.get('train_time_s', 0)):.1f}s")
    return "  ".join(parts)
