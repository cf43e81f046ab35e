"""One writer per run directory: an exclusive kernel lock on RUN_DIR/.lock, held for the run.

    lock = RunDirLock(run_dir)
    lock.acquire()                 # raises RunDirLocked naming the holder's pid and host
    ...train...
    lock.release()                 # or the process ends

The lock is the kernel's, not the file's existence: when the holder dies, even by SIGKILL, the
kernel drops the lock with the process, so a stale RUN_DIR/.lock left by a killed run is taken
over at once, without any pid-liveness guessing (a pid may be reused, and a pid on another host
cannot be checked). The file only carries "pid host" of the current holder so that a refused
second writer can say who holds it.

It is a POSIX record lock (`fcntl.lockf`, F_SETLK) rather than `flock`: an flock belongs to the
open file description, which the data loader's forked workers inherit, so workers outliving their
parent for a moment (or a loader kept alive) would keep the run locked; a POSIX lock belongs to
the process and is not inherited by fork. (Its one trap, that closing *any* descriptor of the
file drops the lock, is avoided by opening the file in this module only.) POSIX locks also work
across hosts on NFS (through the NFS lock manager), so two nodes sharing a run directory exclude
each other too.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from lsdr_repr.errors import LsdrError

LOCK_NAME = ".lock"


class RunDirLocked(LsdrError):
    """Another live process holds the run directory (exit status 2)."""


def holder_text(text: str) -> str:
    """'1234 node07' -> 'pid 1234 on host node07' (what a refused writer prints)."""
    parts = text.split()
    if len(parts) >= 2 and parts[0].isdigit():
        return f"pid {parts[0]} on host {parts[1]}"
    return "a process that did not record its pid"


class RunDirLock:
    """Exclusive, non-blocking lock of a run directory, held until `release()` or process exit."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirLocked(f"{self.path}: cannot open the run-directory lock "
                               f"({exc.strerror or exc})") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held
            holder = holder_text(os.pread(fd, 256, 0).decode(errors="replace"))
            os.close(fd)
            raise RunDirLocked(
                f"{self.path.parent} is in use by {holder} (another `lsdr train` on this run "
                "directory); stop it or choose another train.run_dir"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise RunDirLocked(f"{self.path}: cannot lock the run directory "
                               f"({exc.strerror or exc})") from None
        # Ours now: replace a dead holder's "pid host" with our own.
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only the holder's name is missing
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the lock
            self._fd = None
