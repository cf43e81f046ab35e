"""Turn SIGTERM, the preemption signal and Ctrl-C into a flag the training loop checks between
steps.

The handler only sets a flag: the step in flight finishes, every rank agrees on the stop step
(an all-reduce of the flag), the checkpoint is written, and the process exits with
`EXIT_PREEMPTED` so the SLURM script knows to requeue, or with `EXIT_INTERRUPTED` after Ctrl-C
(SIGINT: a person stopped it; no requeue). A second Ctrl-C aborts at once (KeyboardInterrupt).
"""

from __future__ import annotations

import logging
import signal
import types

from lsdr_repr.errors import ConfigError, LsdrError

log = logging.getLogger(__name__)

# Exit statuses of `lsdr train`, here (not in train.py) so the SLURM side needs no torch import.
EXIT_OK = 0
EXIT_PREEMPTED = 3  # checkpoint written after SIGTERM / the preemption signal: requeue me
EXIT_DIVERGED = 4  # too many non-finite steps in a row; the last good checkpoint is untouched
EXIT_BAD_INPUT = 2  # an LsdrError: bad config, data or run directory (one line names it)
EXIT_FAILED = 1  # anything else (a bug: the traceback is printed)
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, the shell's convention); checkpoint written


def exit_code_for(exc: BaseException) -> int:
    """The exit status `lsdr train` ends with when `exc` escapes the run."""
    if isinstance(exc, LsdrError):
        return EXIT_BAD_INPUT
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_FAILED


def parse_signal(name: str) -> signal.Signals:
    """'SIGUSR2', 'USR2' or '12' -> signal.SIGUSR2."""
    text = name.strip().upper()
    if text.isdigit():
        try:
            return signal.Signals(int(text))
        except ValueError:
            raise ConfigError(f"train.preempt_signal: unknown signal number {name!r}") from None
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return signal.Signals[text]
    except KeyError:
        raise ConfigError(f"train.preempt_signal: unknown signal {name!r}") from None


class PreemptionFlag:
    """Installs handlers for SIGTERM, SIGINT and `preempt_signal`; restores the old ones on
    `close()`."""

    def __init__(self, preempt_signal: str) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}
        for sig in {signal.SIGTERM, signal.SIGINT, parse_signal(preempt_signal)}:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        sig = signal.Signals(signum)
        if self.received is None:
            self.received = sig
            again = " (Ctrl-C again to abort without it)" if sig == signal.SIGINT else ""
            log.warning("received %s: finishing this step, then checkpoint and exit%s",
                        sig.name, again)
        elif sig == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, as Python would

    @property
    def exit_code(self) -> int:
        """The status a run stopped by this flag exits with: Ctrl-C is not requeued."""
        return EXIT_INTERRUPTED if self.received == signal.SIGINT else EXIT_PREEMPTED

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
