"""Run the real `lsdr` command with its stderr on a pseudo-terminal, as in a user's shell.

The progress bars are drawn on a terminal only (`data_pipelines.progress` asks stderr's
isatty(); elsewhere it logs lines), so a test that reads a bar needs stderr to be one: a pty,
not pytest's capture.
"""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Finished:
    returncode: int
    out: str  # stdout (a pipe)
    err: str  # the bytes the terminal received on stderr, bar redraws ("\r...") and all


def lsdr_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "lsdr_repr", *args]


def lsdr_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors on 2 shared cores


def run_on_a_terminal(args: list[str], timeout: float = 240, columns: int = 200) -> Finished:
    """`lsdr ARGS` with stderr on the slave end of a new pty (`columns` wide, so a bar and its
    description fit on one line) and stdout on a pipe; returns when it exits."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST  # the text as written: no "\n" -> "\r\n" translation
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    try:
        proc = subprocess.Popen(lsdr_command(args), cwd=REPO, env=lsdr_env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=slave)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)  # the child holds the only copy: its exit ends the reads below
    received: list[bytes] = []

    def read_terminal() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO on Linux once no process has the slave end open
                return
            if not data:
                return
            received.append(data)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    finally:
        reader.join(timeout=30)
        if not reader.is_alive():
            os.close(master)
    return Finished(proc.returncode, out.decode(), b"".join(received).decode(errors="replace"))


def run_into_a_log(args: list[str], log: Path, timeout: float = 240) -> Finished:
    """`lsdr ARGS` with stderr redirected to the file `log` (as SLURM's or nohup's output)."""
    with open(log, "wb") as f:
        proc = subprocess.run(lsdr_command(args), cwd=REPO, env=lsdr_env(), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=f, timeout=timeout, check=False)
    return Finished(proc.returncode, proc.stdout.decode(), log.read_text())


def final_bars(err: str) -> dict[str, str]:
    """The last frame of each tqdm bar in `err`, by its description."""
    frames = [f.strip() for f in err.replace("\r", "\n").splitlines() if "|" in f]
    return {f.split(":", 1)[0]: f for f in frames}
