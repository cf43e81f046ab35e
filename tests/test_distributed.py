"""Environment parsing (torchrun, srun, none), SLURM host lists, and real gloo collectives."""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest
import torch

from lsdr_repr.distributed import (
    DistEnv,
    DistributedError,
    all_gather_cat,
    all_gather_with_grad,
    all_reduce_mean,
    all_sum,
    all_true,
    any_true,
    any_true_on_host,
    barrier,
    broadcast_object,
    expand_nodelist,
    gather_objects,
    get_rank,
    get_world_size,
    init_distributed,
    is_distributed,
    parse_tasks_per_node,
    read_dist_env,
)


# ------------------------------------------------------------------------------ host lists
@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("single", ["single"]),
    ("a,b[1-2]", ["a", "b1", "b2"]),
    ("r[1-2]-n[01-02]", ["r1-n01", "r1-n02", "r2-n01", "r2-n02"]),
    ("gpu-a100-[001,003]", ["gpu-a100-001", "gpu-a100-003"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-03", "gpu01]", "gpu[a-b]", "gpu[3-1]", ""])
def test_expand_nodelist_rejects(bad):
    with pytest.raises(DistributedError, match="SLURM_JOB_NODELIST"):
        expand_nodelist(bad, source="SLURM_JOB_NODELIST")


def test_parse_tasks_per_node():
    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("8") == [8]
    with pytest.raises(DistributedError, match="cannot read"):
        parse_tasks_per_node("2(y3)")


# ------------------------------------------------------------------------------ environments
def test_no_launcher_is_one_process():
    assert read_dist_env({}) == DistEnv()
    assert not read_dist_env({}).is_distributed


def test_torchrun_variables():
    env = read_dist_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                         "MASTER_ADDR": "node3", "MASTER_PORT": "29555",
                         "TORCHELASTIC_USE_AGENT_STORE": "True",
                         # torchrun inside an srun step: torchrun's variables win
                         "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"})
    assert env == DistEnv(5, 8, 1, 4, "node3", 29555, "torchrun", agent_store=True)
    with pytest.raises(DistributedError, match="MASTER_ADDR is not set"):
        read_dist_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"})
    with pytest.raises(DistributedError, match="RANK='x' is not an integer"):
        read_dist_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(DistributedError, match="rank 2 is outside 0..1"):
        read_dist_env({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})


SRUN = {
    "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "6", "SLURM_LOCALID": "2",
    "SLURM_NTASKS": "8", "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "4(x2)",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
}


def test_slurm_variables_under_srun():
    env = read_dist_env(SRUN)
    assert env == DistEnv(6, 8, 2, 4, "gpu07", 10000 + 123456 % 20000, "slurm")
    over = read_dist_env({**SRUN, "MASTER_PORT": "23456", "MASTER_ADDR": "10.0.0.1"})
    assert (over.master_addr, over.master_port) == ("10.0.0.1", 23456)
    # an srun step narrower than the allocation: the step's own task count and node list
    step = read_dist_env({**SRUN, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1",
                          "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu08",
                          "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_NODEID": "0"})
    assert (step.rank, step.world_size, step.local_world_size, step.master_addr) == (
        1, 2, 2, "gpu08")


def test_batch_script_without_srun_is_one_process():
    # sbatch sets the job's variables, but no step: a python run there is not rank 0 of 8.
    batch = {k: v for k, v in SRUN.items() if k not in ("SLURM_STEP_ID", "SLURM_PROCID",
                                                          "SLURM_LOCALID")}
    assert read_dist_env(batch) == DistEnv()


# ------------------------------------------------------------------------------ processes
def test_single_process_helpers_are_identities():
    x = torch.arange(6.0).view(3, 2)
    assert not is_distributed() and get_rank() == 0 and get_world_size() == 1
    assert all_gather_with_grad(x) is x
    assert all_gather_cat(x) is x
    assert all_true(True) and not all_true(torch.tensor(False)) and any_true(torch.tensor(True))
    assert any_true_on_host(True) and not any_true_on_host(False)
    assert float(all_sum(3)) == 3.0
    assert torch.equal(all_reduce_mean(x), x)
    assert broadcast_object({"a": 1}) == {"a": 1}
    assert gather_objects(3) == [3]
    barrier()
    assert init_distributed(DistEnv(), "cpu") == torch.device("cpu")
    assert not torch.distributed.is_initialized()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_master_fails_fast_naming_it():
    port = _free_port()
    env = read_dist_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": str(port)})
    start = time.monotonic()
    with pytest.raises(DistributedError, match=f"connecting to 127.0.0.1:{port} within 1s"):
        init_distributed(env, "cpu", connect_timeout_s=1.0)
    assert time.monotonic() - start < 20
    assert not torch.distributed.is_initialized()


def _worker(rank: int, port: int, folder: str) -> None:
    from lsdr_repr import distributed as d

    torch.set_num_threads(1)
    env = d.read_dist_env({"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank),
                           "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2",
                           "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": str(port)})
    device = d.init_distributed(env, "cpu", connect_timeout_s=60)
    out = {"device": str(device), "rank": d.get_rank(), "world": d.get_world_size(),
           "is_distributed": d.is_distributed()}
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = d.all_gather_with_grad(x)
    weights = torch.arange(12.0).view(4, 3)
    (gathered * weights).sum().backward()
    out["gathered"] = gathered.detach()
    out["grad"] = x.grad
    out["flags"] = (d.all_true(rank == 0), d.all_true(torch.tensor(True)),
                    d.any_true(rank == 1), d.any_true(False))
    # the host-flag agreement goes over its own gloo group (beside NCCL on GPUs)
    out["host_flags"] = (d.any_true_on_host(rank == 1), d.any_true_on_host(False))
    out["host_group"] = torch.distributed.get_backend(d._host_group())
    out["sum"] = float(d.all_sum(rank + 1))
    out["cat"] = d.all_gather_cat(torch.full((rank + 1, 2), float(rank)))  # shares differ
    out["mean"] = d.all_reduce_mean(torch.tensor([float(rank), 10.0 * rank]))
    out["broadcast"] = d.broadcast_object({"seed": 1234 + rank}, src=1)
    out["gathered_objects"] = d.gather_objects({"rank": rank, "rng": torch.get_rng_state()[:4]})
    d.barrier()
    torch.save(out, f"{folder}/rank{rank}.pt")
    d.cleanup()


@pytest.mark.distributed
def test_two_gloo_processes(tmp_path):
    torch.multiprocessing.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2,
                                          start_method="spawn")
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    weights = torch.arange(12.0).view(4, 3)
    for rank, out in enumerate(outs):
        assert (out["device"], out["rank"], out["world"], out["is_distributed"]) == (
            "cpu", rank, 2, True)
        assert torch.equal(out["gathered"], torch.tensor([[1.0] * 3] * 2 + [[2.0] * 3] * 2))
        # every rank computes the same loss on the gathered batch: each slice's gradient is the
        # sum over ranks (2x), which DDP's averaging turns back into the one-process gradient
        assert torch.equal(out["grad"], 2 * weights[2 * rank:2 * rank + 2])
        assert torch.equal(out["mean"], torch.tensor([0.5, 5.0]))
        assert out["flags"] == (False, True, True, False) and out["sum"] == 3.0
        assert out["host_flags"] == (True, False) and out["host_group"] == "gloo"
        assert torch.equal(out["cat"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]))
        assert out["broadcast"] == {"seed": 1235}
    assert [o["rank"] for o in outs[0]["gathered_objects"]] == [0, 1]
    assert outs[1]["gathered_objects"] is None


def _dying_worker(rank: int, port: int, folder: str) -> None:
    """Rank 1 joins and dies at once (a failed start-up); rank 0 then asks for a stop agreement."""
    import os

    from lsdr_repr import distributed as d
    from lsdr_repr.preemption import lost_peer

    env = d.read_dist_env({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port)})
    d.init_distributed(env, "cpu", connect_timeout_s=60, timeout_s=300)
    if rank == 1:
        os._exit(1)
    time.sleep(1.0)
    start = time.monotonic()
    try:
        d.any_true_on_host(False)
        outcome = "agreed"
    except RuntimeError as exc:
        outcome = lost_peer(exc) or f"other: {exc}"
    Path(folder, "rank0.txt").write_text(f"{outcome}\n{time.monotonic() - start:.1f}")
    os._exit(0)


@pytest.mark.distributed
def test_a_rank_lost_after_start_up_fails_the_stop_agreement_fast(tmp_path):
    """The agreement's gloo group is made while every rank is there (init_distributed): made at
    its first use, the survivor would wait for the dead rank to join it until the timeout."""
    ctx = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_dying_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
        if proc.is_alive():
            proc.kill()
            pytest.fail("a rank still waits for its dead peer")
    outcome, seconds = (tmp_path / "rank0.txt").read_text().splitlines()
    assert re.fullmatch(r"Connection (reset|closed) by peer", outcome), outcome
    assert float(seconds) < 20
