"""Turn SIGTERM, the preemption signal and (for `lsdr train`) Ctrl-C into a flag the training
loop checks between steps.

The handler only sets a flag: the step in flight finishes, every rank agrees on the stop step
(an all-reduce of the flag), the checkpoint is written, and the process exits with
`EXIT_PREEMPTED` so the SLURM script knows to requeue, or with `EXIT_INTERRUPTED` when the only
signal was Ctrl-C (SIGINT: a person stopped it; no requeue). Ctrl-C during start-up, or a
second one, stops at once (KeyboardInterrupt), as Python's own handler would.

One wait is cut short instead: the trainer blocked on its data (`PreemptionFlag.waiting()`,
around fetching the next batch). A stalled source can keep that wait going for
`data.stall_timeout_s` (10 minutes by default), longer than SLURM's grace before its SIGKILL, so
the signal there raises `StopWhileWaiting`: the batch is left unread and the checkpoint is written
now.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import types
from collections.abc import Iterator

from lsdr_repr.errors import ConfigError, LsdrError

log = logging.getLogger(__name__)

# Exit statuses of `lsdr train`, here (not in train.py) so the SLURM side needs no torch import.
EXIT_OK = 0
EXIT_PREEMPTED = 3  # checkpoint written after SIGTERM / the preemption signal: requeue me
EXIT_DIVERGED = 4  # too many non-finite steps in a row; the last good checkpoint is untouched
EXIT_BAD_INPUT = 2  # an LsdrError: bad config, data or run directory (one line names it)
EXIT_FAILED = 1  # anything else (a bug: the traceback is printed)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, the shell's convention); checkpoint written


# What gloo and NCCL say when another rank of the job has gone (killed, crashed, preempted
# without its checkpoint): not a bug of this rank. Timeouts and aborted communicators are left
# out: this rank's own watchdog says those for a deadlock too.
LOST_PEER = re.compile(r"Connection (?:closed|reset) by peer|remote process exited")


def lost_peer(exc: BaseException) -> str | None:
    """The words of a collective's error that mean another rank left, else None."""
    if not isinstance(exc, RuntimeError):
        return None
    found = LOST_PEER.search(str(exc))
    return found.group(0) if found else None


def exit_code_for(exc: BaseException) -> int:
    """The exit status `lsdr train` ends with when `exc` escapes the run."""
    if isinstance(exc, (LsdrError, OSError)):  # train() reports an OSError as RunDirError
        return EXIT_BAD_INPUT
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_FAILED


class StopWhileWaiting(BaseException):
    """A stop signal came while the trainer waited for data (`PreemptionFlag.waiting()`).

    A BaseException, like KeyboardInterrupt, so that no `except Exception` in the loader's code
    on the way up takes it for a bad sample."""


def parse_signal(name: str) -> signal.Signals:
    """'SIGUSR2', 'USR2' or '12' -> signal.SIGUSR2, for `train.preempt_signal`, which cannot be
    SIGINT: that is Ctrl-C, which stops a run without requeueing it."""
    text = name.strip().upper()
    if text.isdigit():
        try:
            sig = signal.Signals(int(text))
        except ValueError:
            raise ConfigError(f"train.preempt_signal: unknown signal number {name!r}") from None
    else:
        try:
            sig = signal.Signals[text if text.startswith("SIG") else "SIG" + text]
        except KeyError:
            raise ConfigError(f"train.preempt_signal: unknown signal {name!r}") from None
    if sig == signal.SIGINT:
        raise ConfigError(f"train.preempt_signal: {name!r} is Ctrl-C, which stops a run without "
                          "requeueing it; use SIGUSR2 (the default), SIGUSR1 or SIGTERM")
    return sig


class PreemptionFlag:
    """Handlers for SIGTERM and `preempt_signal`, and with `interrupt=True` (`lsdr train`) for
    Ctrl-C; the previous handlers come back on `close()`.

    Ctrl-C stops at once (KeyboardInterrupt, nothing to save) until `hold_interrupts()`, which
    the trainer calls when its first step starts; from then on the first Ctrl-C sets the flag
    like a preemption and a second one stops at once. A SIGINT the process inherited as ignored
    (a background job of a script) stays ignored. Without `interrupt` (the library's default:
    benchmarks, notebooks, tests) Ctrl-C keeps Python's behaviour.
    """

    def __init__(self, preempt_signal: str, *, interrupt: bool = False) -> None:
        self.received: signal.Signals | None = None
        self.requeue = False  # a signal other than Ctrl-C came: the SLURM script should requeue
        self._holding = False
        self._waiting = False
        # Only this process raises: a loader worker forked while it waited inherits the flag
        self._pid = os.getpid()
        self._previous: dict[signal.Signals, object] = {}
        sigs = {signal.SIGTERM, parse_signal(preempt_signal)}
        if interrupt and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            sigs.add(signal.SIGINT)
        for sig in sigs:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        sig = signal.Signals(signum)
        if sig == signal.SIGINT:
            if not self._holding or self.received is not None:
                raise KeyboardInterrupt  # start-up, or a second signal: stop now
        else:
            self.requeue = True
        if self.received is None:
            self.received = sig
            again = " (Ctrl-C again to stop without it)" if sig == signal.SIGINT else ""
            log.warning("received %s: finishing this step, then checkpoint and exit%s",
                        sig.name, again)
        if self._waiting and os.getpid() == self._pid:
            self._waiting = False
            raise StopWhileWaiting

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Around a wait for data: a stop signal inside raises `StopWhileWaiting` there (the flag
        is set as usual), and so does entering once one has come, so no new wait starts."""
        if self.received is not None:
            raise StopWhileWaiting
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    def hold_interrupts(self) -> None:
        """From now on the first Ctrl-C is a stop with a checkpoint (the training loop)."""
        self._holding = True

    def watch(self, preempt_signal: str) -> None:
        """Also handle `preempt_signal` (the config's, known once it is loaded)."""
        sig = parse_signal(preempt_signal)
        if sig not in self._previous:
            self._previous[sig] = signal.signal(sig, self._handle)

    @property
    def signals(self) -> list[signal.Signals]:
        """The signals this flag handles (while installed)."""
        return list(self._previous)

    @property
    def is_set(self) -> bool:
        return self.received is not None

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
