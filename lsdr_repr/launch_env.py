"""Where this process sits in the job, read from torchrun's or srun's variables; no torch here.

    env = read_dist_env()      # torchrun > srun (SLURM) > one process
    env.rank, env.world_size, env.local_rank, env.master_addr, ...

Kept free of torch so the command line can ask for the rank (to decide how much each rank logs)
before the heavy imports; `lsdr_repr.distributed` builds the process group from it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from lsdr_repr.errors import LsdrError

logger = logging.getLogger(__name__)


class DistributedError(LsdrError):
    """The distributed environment is malformed or the rendezvous cannot be reached."""


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # "torchrun" | "slurm" | "single"
    # torchrun's agent already serves the TCPStore at MASTER_ADDR:MASTER_PORT; every rank is then
    # a client (rank 0 binding the port again would fail with "address already in use").
    agent_store: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


# ------------------------------------------------------------------------------ environment
def read_dist_env(environ: Mapping[str, str] | None = None, *, quiet: bool = False) -> DistEnv:
    """The process's place in the job: torchrun variables first, then srun's, else one process.

    SLURM variables count only inside an srun step (SLURM_PROCID and SLURM_STEP_ID set): a batch
    script also carries SLURM_JOB_ID and SLURM_NTASKS, but a python started there directly is one
    process, not rank 0 of SLURM_NTASKS (which would wait forever for the others); it is told so
    with a warning, unless `quiet`.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return _torchrun_env(env)
    under_srun = "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env)
    if under_srun:
        return _slurm_env(env)
    if not quiet and "SLURM_JOB_ID" in env and _int(env, "SLURM_NTASKS", 1) > 1:
        logger.warning(
            "SLURM_NTASKS=%s but this process was not started by srun: running as one process",
            env["SLURM_NTASKS"],
        )
    return DistEnv()


def _torchrun_env(env: Mapping[str, str]) -> DistEnv:
    rank = _int(env, "RANK")
    world_size = _int(env, "WORLD_SIZE")
    local_rank = _int(env, "LOCAL_RANK", 0)
    local_world_size = _int(env, "LOCAL_WORLD_SIZE", world_size)
    if world_size > 1:
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if not env.get(key):
                raise DistributedError(f"WORLD_SIZE={world_size} but {key} is not set")
    out = DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
        master_port=_int(env, "MASTER_PORT", 29500),
        source="torchrun",
        agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
    )
    _check(out)
    return out


def _slurm_env(env: Mapping[str, str]) -> DistEnv:
    rank = _int(env, "SLURM_PROCID")
    # An srun step may use fewer tasks than the allocation: the step's own count comes first.
    tasks_key = next((k for k in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
                      if k in env), None)
    world_size = _int(env, tasks_key) if tasks_key else 1
    local_rank = _int(env, "SLURM_LOCALID", 0)
    local_world_size = _slurm_local_world_size(env, world_size)
    if env.get("MASTER_ADDR"):
        master_addr = env["MASTER_ADDR"]
    else:
        nodelist_key = next((k for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST",
                                         "SLURM_NODELIST") if env.get(k)), None)
        if nodelist_key is None:
            if world_size > 1:
                raise DistributedError(
                    "srun step without SLURM_STEP_NODELIST/SLURM_JOB_NODELIST/SLURM_NODELIST "
                    "and no MASTER_ADDR: cannot tell where rank 0 runs"
                )
            master_addr = "127.0.0.1"
        else:
            # Task 0 runs on the first node of the step (SLURM's default block distribution).
            master_addr = expand_nodelist(env[nodelist_key], source=nodelist_key)[0]
    if env.get("MASTER_PORT"):
        master_port = _int(env, "MASTER_PORT")
    else:
        # Every task of a job derives the same port without talking to the others; jobs that
        # share a node get different ports unless their ids collide modulo 20000.
        master_port = 10000 + _int(env, "SLURM_JOB_ID", 0) % 20000
    out = DistEnv(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_addr=master_addr,
        master_port=master_port,
        source="slurm",
    )
    _check(out)
    return out


def _slurm_local_world_size(env: Mapping[str, str], world_size: int) -> int:
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if env.get(key):
            counts = parse_tasks_per_node(env[key], source=key)
            node = _int(env, "SLURM_NODEID", 0)
            if 0 <= node < len(counts):
                return counts[node]
    if env.get("SLURM_NTASKS_PER_NODE"):
        return _int(env, "SLURM_NTASKS_PER_NODE")
    nodes = _int(env, "SLURM_STEP_NUM_NODES", _int(env, "SLURM_NNODES", 1))
    return max(1, world_size // max(1, nodes))


def _check(e: DistEnv) -> None:
    if e.world_size < 1:
        raise DistributedError(f"{e.source}: world size must be >= 1, got {e.world_size}")
    if not 0 <= e.rank < e.world_size:
        raise DistributedError(f"{e.source}: rank {e.rank} is outside 0..{e.world_size - 1}")
    if e.local_rank < 0:
        raise DistributedError(f"{e.source}: local rank {e.local_rank} is negative")
    if not 0 < e.master_port < 2**16:
        raise DistributedError(f"{e.source}: master port {e.master_port} is not a TCP port")


def _int(env: Mapping[str, str], key: str, default: int | None = None) -> int:
    text = env.get(key)
    if text is None or text == "":
        if default is None:
            raise DistributedError(f"environment variable {key} is not set")
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"environment variable {key}={text!r} is not an integer") from None


_NODE_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_nodelist(nodelist: str, source: str = "nodelist") -> list[str]:
    """Expand SLURM's compressed host list, in order: 'gpu[01-03,07],cpu5' ->
    ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'cpu5']. Zero padding follows the lower bound's width (as
    SLURM does); several bracket groups in one name expand as their product
    ('r[1-2]n[1-2]' -> r1n1, r1n2, r2n1, r2n2)."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip(), source):
        hosts.extend(_expand_host(item, nodelist, source))
    if not hosts:
        raise DistributedError(f"{source}={nodelist!r}: no host names in it")
    return hosts


def _split_top_level(text: str, source: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise DistributedError(f"{source}={text!r}: nested '[' in host list")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise DistributedError(f"{source}={text!r}: unmatched ']' in host list")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise DistributedError(f"{source}={text!r}: unmatched '[' in host list")
    items.append(text[start:])
    return [s for s in (item.strip() for item in items) if s]


def _expand_host(item: str, whole: str, source: str) -> list[str]:
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)  # _split_top_level checked the brackets balance
    head, body, tail = item[:open_at], item[open_at + 1:close_at], item[close_at + 1:]
    numbers: list[str] = []
    for part in body.split(","):
        m = _NODE_RANGE.match(part.strip())
        if not m:
            raise DistributedError(f"{source}={whole!r}: cannot read range '{part}' in host list")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            numbers.append(lo)
            continue
        if int(hi) < int(lo):
            raise DistributedError(f"{source}={whole!r}: range '{part}' runs backwards")
        numbers.extend(str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1))
    return [head + n + rest for n in numbers for rest in _expand_host(tail, whole, source)]


_TASKS = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def parse_tasks_per_node(text: str, source: str = "tasks per node") -> list[int]:
    """SLURM's tasks-per-node form, '2(x3),1' -> [2, 2, 2, 1] (one count per node, in order)."""
    counts: list[int] = []
    for part in text.split(","):
        m = _TASKS.match(part.strip())
        if not m:
            raise DistributedError(f"{source}={text!r}: cannot read '{part}'")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    return counts
