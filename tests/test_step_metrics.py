"""The training log read a step late (`lsdr_repr.step_metrics`, `lsdr_repr.host_copy`): a record
holds its own step's values, the trainer writes it once the next step is queued, and every record
is written by the time `run` returns."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_accumulate import trainer_for

from lsdr_repr.host_copy import HostCopy
from lsdr_repr.objectives import embedding_diagnostics, one_intra_op_thread
from lsdr_repr.preemption import EXIT_DIVERGED
from lsdr_repr.step_metrics import PendingMetrics


def test_a_host_copy_of_a_cpu_tensor_holds_its_values():
    assert HostCopy(torch.tensor([1.5, -2.0])).get().tolist() == [1.5, -2.0]


@pytest.mark.parametrize("shape", [(40, 6), (6, 40)])  # the Gram matrix of the smaller side
def test_a_pending_record_holds_the_values_and_the_diagnostics_of_its_step(shape):
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    loss = torch.tensor(3.25)
    pending = PendingMetrics(7, {"lr": 0.1}, {"loss/total": loss, "skipped": torch.tensor(2.0)},
                             z)
    loss.add_(1.0)  # what a CUDA graph's next replay does to its output; the record copied it
    z.mul_(10.0)
    metrics = pending.metrics()
    assert pending.step == 7 and metrics["loss/total"] == 3.25 and metrics["lr"] == 0.1
    assert metrics["skipped"] == 2.0
    expected = embedding_diagnostics(z / 10.0)
    for key, value in expected.items():
        assert metrics[f"diag/{key}"] == pytest.approx(value, rel=1e-5), key


def test_a_pending_record_of_a_non_finite_embedding_reports_nan_diagnostics():
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    z[3, 2] = math.inf
    metrics = PendingMetrics(1, {}, {"loss/total": torch.tensor(math.nan)}, z).metrics()
    assert set(metrics) == {"loss/total", "diag/std_mean", "diag/std_min",
                            "diag/corr_offdiag_abs", "diag/rankme"}
    assert all(math.isnan(v) for v in metrics.values())


def test_the_trainer_writes_each_record_a_step_late_with_its_own_steps_values(sample_shards,
                                                                             tmp_path):
    run_dir = tmp_path / "run"
    trainer = trainer_for(sample_shards, run_dir, "train.total_steps=4",
                          "train.checkpoint_every=100")
    written: dict[int, list[int]] = {}
    diagnostics: dict[int, dict[str, float]] = {}

    def records() -> list[dict]:
        path = run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [r for r in map(json.loads, lines) if "loss/total" in r["metrics"]]

    def hook(t) -> None:
        written[t.step] = [r["step"] for r in records()]
        diagnostics[t.step] = embedding_diagnostics(t._last_projection)

    trainer.step_hook = hook
    assert trainer.run().exit_code == 0
    # Step k's record is written while step k + 1 runs; the last one before run() returns.
    assert written == {1: [], 2: [1], 3: [1, 2], 4: [1, 2, 3, 4]}
    for record in records():
        step, metrics = record["step"], record["metrics"]
        assert metrics["samples_seen"] == step * 16
        for key, value in diagnostics[step].items():  # that step's projection, not the next's
            assert metrics[f"diag/{key}"] == pytest.approx(value, rel=1e-4), (step, key)


# SGD (fused: the finite check deferred) and LARS (read at once): lr 1e30 makes every step after
# the first non-finite; the third in a row stops the run at step 4.
@pytest.mark.parametrize("optim", ["sgd", "lars"])
def test_each_record_counts_the_non_finite_steps_up_to_its_own(sample_shards, tmp_path, optim):
    run_dir = tmp_path / "run"
    trainer = trainer_for(sample_shards, run_dir, f"optim.name={optim}", "optim.lr=1e30",
                          "train.total_steps=8", "train.checkpoint_every=100",
                          "train.max_nonfinite_steps=3")
    assert trainer.stepper.deferred == (optim == "sgd")
    assert trainer.run().exit_code == EXIT_DIVERGED
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    counts = {r["step"]: r["metrics"]["nonfinite_steps"] for r in records
              if "nonfinite_steps" in r["metrics"]}
    # step 4's flag ends the run: the records of steps 1-3 were written before it was read
    assert counts == {1: 0, 2: 1, 3: 2}


def test_a_loop_that_fails_still_writes_the_record_of_its_last_log_step(sample_shards, tmp_path):
    run_dir = tmp_path / "run"
    trainer = trainer_for(sample_shards, run_dir, "train.total_steps=6",
                          "train.checkpoint_every=100")

    def hook(t) -> None:
        if t.step == 3:  # step 3 ran and its record is pending: what a lost peer looks like
            raise RuntimeError("peer lost")

    trainer.step_hook = hook
    with pytest.raises(RuntimeError, match="peer lost"):
        trainer.run()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss/total" in r["metrics"]] == [1, 2, 3]


def test_a_record_finds_its_eigenvalues_on_one_thread_and_restores_the_thread_count(monkeypatch):
    # many threads meet at LAPACK's barriers, which wait while loader workers hold the cores
    seen: list[int] = []
    eigvalsh = torch.linalg.eigvalsh

    def counting_eigvalsh(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return eigvalsh(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigvalsh", counting_eigvalsh)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        z = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
        metrics = PendingMetrics(1, {}, {"loss/total": torch.tensor(1.0)}, z).metrics()
        assert seen == [1] and torch.get_num_threads() == 2
        assert metrics["diag/rankme"] == pytest.approx(embedding_diagnostics(z)["rankme"])
    finally:
        torch.set_num_threads(before)


def test_a_failed_loops_record_that_cannot_be_read_is_reported_not_raised(sample_shards, tmp_path,
                                                                          monkeypatch, caplog):
    run_dir = tmp_path / "run"
    trainer = trainer_for(sample_shards, run_dir, "train.total_steps=6",
                          "train.checkpoint_every=100")

    def unreadable(self):
        raise RuntimeError("device lost")

    def hook(t) -> None:
        if t.step == 3:
            monkeypatch.setattr(PendingMetrics, "metrics", unreadable)
            raise RuntimeError("peer lost")

    trainer.step_hook = hook
    with pytest.raises(RuntimeError, match="peer lost"):  # the loop's own error, not the record's
        trainer.run()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss/total" in r["metrics"]] == [1, 2]
    assert "the log record of step 3 was lost: device lost" in caplog.text


def test_one_intra_op_thread_restores_the_count_when_its_block_raises():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError), one_intra_op_thread():
            assert torch.get_num_threads() == 1
            raise ValueError
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_spectrum_plot_gets_the_rankme_of_its_steps_projection(sample_shards, tmp_path):
    trainer = trainer_for(sample_shards, tmp_path / "run", "train.total_steps=2",
                          "train.checkpoint_every=100", "train.spectrum_every=2")
    plotted: dict[int, float] = {}
    trainer.tracker.log_spectrum = lambda eig, step, **kw: plotted.update({step: kw["rankme"]})
    expected: dict[int, float] = {}
    trainer.step_hook = lambda t: expected.update(
        {t.step: embedding_diagnostics(t._last_projection)["rankme"]})
    assert trainer.run().exit_code == 0
    assert plotted == pytest.approx({2: expected[2]})
