"""Progress of one long pass: a tqdm bar on a terminal, a throttled log line anywhere else.

    bar = make_progress(total, "writing shards/", "img", enabled=True)
    bar.update(1)
    bar.set_postfix(skipped=2, refresh=False)
    bar.close()

Why two forms: a bar redrawn into a log file (SLURM's output, nohup's) leaves every frame in it,
joined by carriage returns; a log with nothing in it is no better for a shard write or a
feature pass that runs for hours. So where stderr is not a terminal the same calls write
`desc: n/total unit (postfix)` through `logging`, at most every `LOG_INTERVAL_S` seconds, as the
training loop's own progress does. Torch-free, so that `data_pipelines` can use it.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 30.0


class LoggedProgress:
    """The part of tqdm's interface the passes use, reported as log lines.

    A line at most every `interval_s` seconds of updates, and one at `close()` when any was
    written (a pass shorter than the interval stays silent: its own result line says it all).
    `disable` is True, as for a tqdm bar that draws nothing: no log redirection is needed.
    """

    disable = True

    def __init__(self, total: int | None, desc: str, unit: str,
                 interval_s: float = LOG_INTERVAL_S) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.interval_s = interval_s
        self.n = 0
        self._postfix = ""
        self._started = self._last = time.monotonic()
        self._logged = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            self._log(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:
        self._postfix = ", ".join(f"{k}={v}" for k, v in {**(ordered_dict or {}), **kwargs}.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self._postfix = str(s)

    def close(self) -> None:
        if self._logged:
            self._log(time.monotonic())
            self._logged = False  # a second close() says nothing more

    def _log(self, now: float) -> None:
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        rate = self.n / max(now - self._started, 1e-9)
        extra = f", {self._postfix}" if self._postfix else ""
        log.info("%s: %s %s (%.1f %s/s%s)", self.desc, done, self.unit, rate, self.unit, extra)
        self._logged = True


def make_progress(total: int | None, desc: str, unit: str = "it", enabled: bool = True,
                  interval_s: float = LOG_INTERVAL_S, **tqdm_kwargs: Any) -> Any:
    """A tqdm bar where stderr is a terminal (or a notebook's widget under `tqdm.auto`), a
    `LoggedProgress` elsewhere, and a tqdm bar that draws nothing when not `enabled`."""
    from tqdm.auto import tqdm

    if not enabled:
        return tqdm(total=total, desc=desc, unit=unit, disable=True)
    if sys.stderr.isatty() or tqdm.__module__.startswith("tqdm.notebook"):
        return tqdm(total=total, desc=desc, unit=unit, **tqdm_kwargs)
    return LoggedProgress(total, desc, unit, interval_s)
