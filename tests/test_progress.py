"""data_pipelines.progress: a bar on a terminal, throttled log lines anywhere else."""

from __future__ import annotations

import io
import logging

import pytest

from data_pipelines.progress import LoggedProgress, make_progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_pass_logs_lines_with_its_count_rate_and_postfix(caplog):
    caplog.set_level(logging.INFO, logger="data_pipelines.progress")
    bar = LoggedProgress(10, "writing out/", "img", interval_s=0.0)  # a line every update
    bar.update(1)
    bar.set_postfix(skipped=1, refresh=False)
    bar.update(4)
    bar.close()
    bar.close()  # a second close says nothing more
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].startswith("writing out/: 1/10 img (") and "img/s" in lines[0]
    assert lines[1].startswith("writing out/: 5/10 img (") and lines[1].endswith(", skipped=1)")
    assert lines[2].startswith("writing out/: 5/10 img")  # the closing line
    assert not any("\r" in line for line in lines)


def test_a_pass_shorter_than_the_interval_stays_silent(caplog):
    caplog.set_level(logging.INFO, logger="data_pipelines.progress")
    bar = LoggedProgress(None, "features of val", "img")  # 30 s
    bar.update(100)
    bar.set_postfix_str("rotate", refresh=False)
    bar.close()
    assert caplog.records == []


@pytest.mark.parametrize("enabled", [True, False])
def test_make_progress_draws_on_a_terminal_and_logs_elsewhere(monkeypatch, enabled):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    bar = make_progress(3, "verifying shards", "shard", enabled, mininterval=0)
    bar.update(3)
    bar.close()
    assert not isinstance(bar, LoggedProgress)
    assert ("3/3" in terminal.getvalue()) == enabled  # a disabled bar draws nothing

    log_file = io.StringIO()  # isatty() is False: SLURM's output, nohup's
    monkeypatch.setattr("sys.stderr", log_file)
    bar = make_progress(3, "verifying shards", "shard", enabled)
    assert isinstance(bar, LoggedProgress) == enabled and bar.disable
    bar.update(3)
    bar.close()
    assert log_file.getvalue() == ""
