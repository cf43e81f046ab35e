"""`lsdr submit` / `lsdr status` without a cluster: rendering, quoting, dry runs, errors, status.

The rendered scripts are checked by bash itself (`bash -n`, and running the settings block);
tests/test_slurm_cluster.py submits them to a real SLURM.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lsdr_repr import submit as sub
from lsdr_repr.config import load_config
from lsdr_repr.errors import LsdrError, SubmitError

REPO = Path(__file__).resolve().parents[1]
HOSTILE = "a b 'q' \"dq\" $(touch {marker}) `touch {marker}`; touch {marker} # x %j \\ end"


def _config(tmp_path: Path, **sections) -> Path:
    """A minimal valid config file (CPU demo-like) with `sections` merged in."""
    raw = {
        "data": {"train_shards": "data/sample/train", "batch_size": 8},
        "train": {"run_dir": str(tmp_path / "run")},
        "slurm": {"gpus_per_node": 0, "cpus_per_task": 1, "time": "00:10:00"},
    }
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _sbatch_lines(script: str) -> dict[str, str | None]:
    out = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            out[key] = value if _ else None
    return out


def _bash_syntax_ok(script: str, tmp_path: Path) -> None:
    path = tmp_path / "check.sbatch"
    path.write_text(script)
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_render_multi_node_gpu_script(tmp_path):
    cfg_path = _config(tmp_path, data={"batch_size": 256})
    opts = sub.SubmitOptions(nodes=4, gpus_per_node=8, cpus_per_task=12, partition="gpu",
                             time="2-00:00:00", account="proj1", qos="high", constraint="a100",
                             mem="480G", exclusive=True)
    cfg = sub.resolve_job_config(cfg_path, [], opts)
    script = sub.render_script(cfg, python="/opt/venv/bin/python", workdir=tmp_path)
    lines = _sbatch_lines(script)
    assert lines["nodes"] == "4"
    assert lines["ntasks-per-node"] == "8" and lines["gpus-per-node"] == "8"
    assert lines["cpus-per-task"] == "12" and lines["time"] == "2-00:00:00"
    assert (lines["partition"], lines["account"], lines["qos"], lines["constraint"],
            lines["mem"]) == ("gpu", "proj1", "high", "a100", "480G")
    assert "exclusive" in lines and "requeue" in lines
    assert lines["signal"] == "USR2@120"  # to the tasks, not "B:" (the batch shell)
    assert lines["open-mode"] == "append"
    assert lines["output"] == f"{tmp_path}/run/slurm-%j.out"
    assert lines["error"] == f"{tmp_path}/run/slurm-%j.err"
    assert lines["chdir"] == str(tmp_path)
    # One block of #SBATCH lines, all before the first command (sbatch stops reading at it).
    first_cmd = next(i for i, ln in enumerate(script.splitlines())
                     if ln.strip() and not ln.startswith("#"))
    assert all(i < first_cmd for i, ln in enumerate(script.splitlines())
               if ln.startswith("#SBATCH"))
    assert "LSDR_PYTHON=/opt/venv/bin/python\n" in script
    assert "LSDR_MAX_REQUEUES=20\n" in script
    _bash_syntax_ok(script, tmp_path)


def test_render_cpu_only_tasks_and_signal(tmp_path):
    cfg_path = _config(tmp_path, train={"preempt_signal": "SIGUSR1"},
                       slurm={"signal_seconds": 30, "max_requeues": 2,
                              "setup": ["module load cuda/12.4", "export NCCL_DEBUG=WARN"],
                              "extra_sbatch": ["--mail-type=END"]})
    cfg = sub.resolve_job_config(cfg_path, [], sub.SubmitOptions(tasks_per_node=2))
    script = sub.render_script(cfg, workdir=tmp_path, array="0-3%2")
    lines = _sbatch_lines(script)
    assert "gpus-per-node" not in lines
    assert lines["ntasks-per-node"] == "2"
    assert lines["signal"] == "USR1@30"
    assert lines["array"] == "0-3%2"
    assert lines["output"].endswith("/slurm-%A_%a.out")
    assert lines["mail-type"] == "END"
    assert "LSDR_MAX_REQUEUES=2\n" in script
    setup = script.split("# >>> setup", 1)[1].split("# <<< setup", 1)[0]
    assert "module load cuda/12.4\nexport NCCL_DEBUG=WARN\n" in setup
    _bash_syntax_ok(script, tmp_path)


def test_template_is_the_repository_script_and_exit_code_matches_trainer():
    assert (REPO / "slurm" / "train.sbatch").read_text() == sub.template_text()
    from lsdr_repr.train import EXIT_PREEMPTED

    assert f"LSDR_EXIT_PREEMPTED={EXIT_PREEMPTED} " in sub.template_text()


def test_hostile_values_never_reach_a_shell(tmp_path):
    marker = tmp_path / "pwned"
    hostile = HOSTILE.format(marker=marker)
    run_dir = tmp_path / f"run {hostile}".replace("/", "_")
    python = tmp_path / f"py {hostile}".replace("/", "_")
    cfg_path = _config(tmp_path, log={"wandb": {"name": hostile, "tags": [hostile, ";"]}})
    cfg = sub.resolve_job_config(cfg_path, [f"train.run_dir={json.dumps(str(run_dir))}"],
                                 sub.SubmitOptions(job_name=hostile))
    script = sub.render_script(cfg, python=str(python), workdir=tmp_path)
    # Config values are not in the script at all: the job reads RUN_DIR/config.yaml.
    assert "dq" not in script.split("# <<< settings")[1]
    _bash_syntax_ok(script, tmp_path)
    # The settings block, run by bash, yields the interpreter path literally and runs nothing.
    settings = script.split("# >>> settings", 1)[1].split("# <<< settings", 1)[0]
    proc = subprocess.run(["bash", "-c", settings + '\nprintf %s "$LSDR_PYTHON"'],
                          capture_output=True, text=True, check=True)
    assert proc.stdout == str(python)
    assert not marker.exists()


def test_sbatch_quoting_follows_sbatch_tokenizer():
    # sbatch splits #SBATCH lines itself: quotes group, backslash escapes, unquoted # comments.
    assert sub._sbatch_quote("plain-name_1.2", "k") == "plain-name_1.2"
    quoted = sub._sbatch_quote('/r un/"x" #c\\', "k")
    assert quoted == '"/r un/\\"x\\" #c\\\\"'
    with pytest.raises(SubmitError, match="line break"):
        sub._sbatch_quote("a\nb", "train.run_dir")
    assert sub._sbatch_filename(Path("/r/100%")) == "/r/100%%"


def test_job_plan_passes_values_through_literally(tmp_path):
    marker = tmp_path / "pwned"
    hostile = HOSTILE.format(marker=marker)
    cfg_path = _config(tmp_path, train={"run_dir": str(tmp_path / "runs" / "r: #1 'x'"),
                                        "seed": 7})
    override = f"log.wandb.name={json.dumps(hostile)}"
    proc = subprocess.run(
        [sys.executable, "-m", "lsdr_repr", "_job-plan", "--array-task", "3",
         "--", str(cfg_path), override],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    )
    fields = proc.stdout.split("\0")[:-1]
    log_dir, run_dir, config, *overrides = fields
    assert log_dir == str(tmp_path / "runs" / "r: #1 'x'")
    assert run_dir == log_dir + "/task-3"
    assert config == str(cfg_path) and overrides[0] == override
    # What the trainer will load: the task's own run dir and seed, the hostile name verbatim.
    cfg = load_config(config, overrides)
    assert cfg.train.run_dir == run_dir and cfg.train.seed == 10
    assert cfg.log.wandb.name == hostile
    assert not marker.exists()


def test_dry_run_cli_prints_script_and_writes_nothing(tmp_path):
    cfg_path = _config(tmp_path)
    env = dict(os.environ, PATH=str(tmp_path))  # no sbatch needed for a dry run
    proc = subprocess.run(
        [sys.executable, "-m", "lsdr_repr", "submit", str(cfg_path), "optim.lr=0.5",
         "--nodes", "2", "--tasks-per-node", "2", "slurm.cpus_per_task=3",  # any order
         "--gpus-per-node", "0", "--dry-run"],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("#!/bin/bash\n")
    assert "#SBATCH --nodes=2\n#SBATCH --ntasks-per-node=2\n#SBATCH --cpus-per-task=3\n" \
        in proc.stdout
    assert not (tmp_path / "run").exists()
    run = tmp_path / "run"  # stderr names what a real submit would write and run
    assert f"run: sbatch --parsable {run / 'train.sbatch'} {run / 'config.yaml'}" in proc.stderr


def test_submit_without_sbatch_is_one_clear_error(tmp_path, monkeypatch):
    cfg_path = _config(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SubmitError, match="sbatch not found"):
        sub.submit(cfg_path, workdir=tmp_path)
    proc = subprocess.run([sys.executable, "-m", "lsdr_repr", "submit", str(cfg_path)],
                          capture_output=True, text=True, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "sbatch not found" in proc.stderr


@pytest.mark.parametrize(("overrides", "options", "message"), [
    ([], sub.SubmitOptions(nodes=3, tasks_per_node=1), "not divisible by the 3 ranks"),
    ([], sub.SubmitOptions(gpus_per_node=8, tasks_per_node=4), "must equal slurm.gpus_per_node"),
    (["slurm.time=00:01:00"], sub.SubmitOptions(), "signal_seconds"),
    ([], sub.SubmitOptions(partition="gpu; rm -rf /"), "slurm.partition"),
    ([], sub.SubmitOptions(mem="lots"), "slurm.mem"),
    ([], sub.SubmitOptions(nodes=0), "slurm.nodes"),
    (['train.run_dir="a\\nb"'], sub.SubmitOptions(), "line break"),
    (["train.preempt_signal=SIGNOPE"], sub.SubmitOptions(), "preempt_signal"),
    ([], sub.SubmitOptions(array="0-3; x"), "array spec"),
    ([], sub.SubmitOptions(time="48h"), "slurm.time: '48h' is not a SLURM time limit"),
])
def test_bad_requests_fail_before_sbatch(tmp_path, overrides, options, message):
    cfg_path = _config(tmp_path)
    with pytest.raises(LsdrError, match=re.escape(message)) as info:
        sub.submit(cfg_path, overrides, options, dry_run=True, workdir=tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("text", "seconds"), [
    ("30", 1800), ("30:15", 1815), ("1:00:00", 3600), ("2-00:00:00", 172800), ("1-2", 93600),
    ("1-2:30", 95400), ("UNLIMITED", None), ("abc", None), ("1:2:3:4", None),
])
def test_parse_slurm_time(text, seconds):
    assert sub.parse_slurm_time(text) == seconds


def test_status_reads_jobs_metrics_and_checkpoints(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for step in (100, 200):
        (run / "checkpoints" / f"step-{step:08d}.pt").write_bytes(b"x")
    records = [{"step": s, "time": 1.0e9 + s, "metrics": {"loss": 1.0, "samples_per_s": 50.0 + s}}
               for s in (20, 40, 240)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records)
                                       + '\n{"step": 260, "ti')  # torn by a kill
    cfg = load_config(_config(tmp_path), [f"train.run_dir={run}", "train.total_steps=1000"])
    from lsdr_repr.config import dump_config

    dump_config(cfg, run / "config.yaml")
    (run / sub.JOBS_FILE).write_text("41\t2025-01-01T00:00:00\tlsdr submit\n41\tx\tsbatch\n")
    (run / "task-1" / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol/sacct here: state UNKNOWN
    status = sub.run_status(run)
    assert [j.job_id for j in status.jobs] == ["41"] and status.jobs[0].state == "UNKNOWN"
    assert (status.step, status.total_steps, status.samples_per_s) == (240, 1000, 290.0)
    assert status.checkpoints == ["step-00000100.pt", "step-00000200.pt"]
    assert [t.run_dir.name for t in status.tasks] == ["task-1"]
    text = sub.format_status(status)
    assert "job 41: UNKNOWN" in text and "step 240/1000, loss 1, 290.0 samples/s" in text
    assert "checkpoints: step-00000100.pt, step-00000200.pt" in text
    with pytest.raises(SubmitError, match="no such run directory"):
        sub.run_status(tmp_path / "missing")


def test_status_takes_each_field_from_the_newest_record_that_has_it(tmp_path, monkeypatch):
    """metrics.jsonl ends with a kNN record and holds a resume (steps repeated after the
    checkpoint): loss, throughput and RankMe come from the last training record, the kNN from
    the last kNN record, the ETA from the step rate since the resume only."""
    run = tmp_path / "run"
    run.mkdir()
    train = [(20, 1000.0, 2.0), (40, 1010.0, 1.8), (60, 1020.0, 1.6),  # 2 steps/s, then killed
             (40, 5000.0, 1.8), (60, 5040.0, 1.5), (80, 5080.0, 1.25)]  # resumed: 0.5 steps/s
    records = [{"step": s, "time": t, "metrics": {"loss/total": loss, "samples_per_s": 64.0,
                                                   "diag/rankme": 12.34}} for s, t, loss in train]
    records.insert(2, {"step": 40, "time": 1010.5, "metrics": {"knn/top1": 0.25}})
    records.append({"step": 80, "time": 5085.0, "metrics": {"knn/top1": 0.5, "knn/top5": 0.75}})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = load_config(_config(tmp_path), [f"train.run_dir={run}", "train.total_steps=1000"])
    from lsdr_repr.config import dump_config

    dump_config(cfg, run / "config.yaml")
    monkeypatch.setenv("PATH", str(tmp_path))
    status = sub.run_status(run)
    assert (status.step, status.loss, status.samples_per_s, status.rankme) == (80, 1.25, 64.0,
                                                                                12.34)
    assert status.knn == {"top1": 0.5, "top5": 0.75} and status.knn_step == 80
    assert status.eta_s == pytest.approx((1000 - 80) / 0.5)
    text = sub.format_status(status)
    assert "step 80/1000, loss 1.25, 64.0 samples/s, eta 0:30:40" in text
    assert "kNN at step 80: top1 0.500, top5 0.750; RankMe 12.3" in text
    assert "jobs: none recorded" in text and "W&B upload" not in text  # no offline run here
