"""The errors a user can cause, each with the exit code ``silent-vae`` ends with.

Every class is also a standard exception (``ValueError``, ``OSError`` or ``RuntimeError``) so
library callers can catch what they already expect. ``EXIT_CODES`` is the table the README
documents (a test keeps the two equal).
"""

from __future__ import annotations

__all__ = ["SilentVAEError", "UsageError", "DivergenceError", "InputFileError", "RunDirError",
           "WriteError", "PeerFailure", "EXIT_OK", "EXIT_INTERNAL", "EXIT_USAGE", "EXIT_DIVERGED", "EXIT_INPUT",
           "EXIT_RUN_DIR", "EXIT_WRITE", "EXIT_INTERRUPTED", "EXIT_CODES"]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INPUT = 4
EXIT_RUN_DIR = 5
EXIT_WRITE = 6
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug: please report it with the output of --debug)",
    EXIT_USAGE: "bad command line or configuration (an argument, a value out of range, an "
                "option that does not apply, an unavailable device or backend)",
    EXIT_DIVERGED: "training diverged (non-finite loss or weights); the last good checkpoint is kept",
    EXIT_INPUT: "an input file is missing, unreadable, truncated or corrupt (checkpoint, "
                "config, metrics, data set)",
    EXIT_RUN_DIR: "the run folder is in use by another process, already holds a run, or holds "
                  "no run to resume",
    EXIT_WRITE: "an output could not be written (disk full, permission denied, read-only "
                "file system); files written before are intact",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); resume with --resume",
}


class SilentVAEError(Exception):
    """Base class: a failure the user can fix; ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_INTERNAL


class UsageError(SilentVAEError, ValueError):
    """A command-line argument or config value is invalid, out of range or does not apply."""

    exit_code = EXIT_USAGE


class DivergenceError(SilentVAEError, RuntimeError):
    """Training produced a non-finite loss or non-finite weights; nothing was written."""

    exit_code = EXIT_DIVERGED


class InputFileError(SilentVAEError, ValueError):
    """A file to read is missing, truncated or not in the expected format."""

    exit_code = EXIT_INPUT


class RunDirError(SilentVAEError, RuntimeError):
    """The run folder is locked by another process, already holds a run, or has none."""

    exit_code = EXIT_RUN_DIR


class WriteError(SilentVAEError, OSError):
    """Writing an output failed (disk full, permissions); earlier files are intact."""

    exit_code = EXIT_WRITE


class PeerFailure(SilentVAEError, RuntimeError):
    """Another process of the same torchrun job failed (it printed why); this one stops too,
    with that process's exit code."""

    def __init__(self, exit_code: int):
        super().__init__(f"another process of this torchrun job failed (exit code {exit_code}); "
                         "its own message says why")
        self.exit_code = exit_code
