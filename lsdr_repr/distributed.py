"""Distributed set-up in one place: the process group and the collectives the training uses.

    env = read_dist_env()                 # torchrun > srun (SLURM) > one process
    device = init_distributed(env, "cuda")
    ...
    z_global = all_gather_with_grad(z)    # [N_local, D] -> [N_global, D], differentiable
    cleanup()

Every helper is a no-op (or the identity) when no process group is initialised, so the same code
runs on one CPU, one GPU, torchrun and srun. The job's variables are read by
`lsdr_repr.launch_env` (no torch), re-exported here.
"""

from __future__ import annotations

import gc
import logging
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from lsdr_repr.launch_env import (  # noqa: F401  (re-exported: the one import for callers)
    DistEnv,
    DistributedError,
    expand_nodelist,
    parse_tasks_per_node,
    read_dist_env,
)

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ process group
_HOST_GROUP: list[Any] = []  # the gloo group of every rank for host flags (init_distributed)


def init_distributed(
    env: DistEnv,
    device_type: str,
    *,
    connect_timeout_s: float = 300.0,
    timeout_s: float = 1800.0,
) -> torch.device:
    """Join the process group described by `env` and return this process's device.

    NCCL on CUDA, gloo otherwise. The TCP rendezvous at master_addr:master_port fails after
    `connect_timeout_s` with a `DistributedError` naming the address (instead of hanging), while
    collectives keep the longer `timeout_s`. With one process no group is created.
    """
    device = _pick_device(env, device_type)
    if not env.is_distributed:
        return device
    if dist.is_initialized():
        if dist.get_world_size() != env.world_size or dist.get_rank() != env.rank:
            raise DistributedError(
                f"a process group (rank {dist.get_rank()} of {dist.get_world_size()}) is already "
                f"initialised, but the environment says rank {env.rank} of {env.world_size}"
            )
        return device
    backend = "nccl" if device.type == "cuda" else "gloo"
    where = f"{env.master_addr}:{env.master_port}"
    role = "hosting" if env.rank == 0 and not env.agent_store else "connecting to"
    try:
        store = dist.TCPStore(
            host_name=env.master_addr,
            port=env.master_port,
            world_size=env.world_size,
            is_master=env.rank == 0 and not env.agent_store,
            timeout=timedelta(seconds=connect_timeout_s),
            multi_tenant=True,
        )
    except (RuntimeError, TimeoutError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistributedError(
            f"rank {env.rank}/{env.world_size} ({env.source}): rendezvous failed {role} "
            f"{where} within {connect_timeout_s:g}s: {first}"
        ) from exc
    store.set_timeout(timedelta(seconds=timeout_s))
    # The same key prefix torch uses for init_method rendezvous: the store may be torchrun's.
    store = dist.PrefixStore("default_pg", store)
    dist.init_process_group(
        backend=backend,
        store=store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    # The gloo group for host flags (`any_true_on_host`), made now while every rank is here: made
    # at its first use, a rank that died before then would leave the others waiting for it.
    _HOST_GROUP[:] = [dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))]
    logger.info("rank %d/%d joined the %s group at %s", env.rank, env.world_size, backend, where)
    return device


def _pick_device(env: DistEnv, device_type: str) -> torch.device:
    if device_type != "cuda":
        return torch.device(device_type)
    count = torch.cuda.device_count()
    if count == 0:
        raise DistributedError("device 'cuda' requested but no CUDA device is visible")
    if env.local_rank < count:
        index = env.local_rank
    elif count == 1:
        # srun --gpus-per-task / CUDA_VISIBLE_DEVICES binding: each task sees only its own GPU.
        index = 0
    else:
        raise DistributedError(
            f"local rank {env.local_rank} but only {count} CUDA devices are visible"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def cleanup() -> None:
    """Leave the process group (safe to call when none was created).

    Garbage is collected first: DDP reducers and autograd graphs caught in reference cycles still
    hold gloo work objects, and when those die only at interpreter shutdown the process aborts
    ("terminate called without an active exception", SIGABRT) after a successful run; measured
    here in 8 of 30 two-rank runs without the collection, 0 of 30 with it. Objects a caller still
    references are not freed by this: drop DDP-wrapped models before calling it."""
    _HOST_GROUP.clear()  # destroyed with the default group below
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# ------------------------------------------------------------------------------ collectives
def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[N, ...] per rank -> [world_size * N, ...] in rank order, differentiable: the backward
    sums each rank's gradient for the slice it contributed (every rank computes the loss on the
    whole gathered batch). After DDP averages the parameter gradients the result equals one
    process on the whole batch (as facebookresearch/vicreg's FullGatherLayer).

    Every rank must pass the same shape. The identity when not distributed."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


class _GatherWithGrad(torch.autograd.Function):
    """What `torch.distributed.nn.functional.all_gather` did before torch 2.14 deprecated it
    for a private module: all-gather forward; backward the sum over ranks of the gradient of
    this rank's slice, as an all-reduce, then the slice. (A reduce-scatter would move half the
    bytes on NCCL; it is left for when a multi-GPU machine can test it: gloo, the CPU tests'
    backend, has none.)"""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        summed = grad.clone(memory_format=torch.contiguous_format)  # autograd may hold `grad` elsewhere: reduce a copy
        dist.all_reduce(summed)
        return summed[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_true(flag: bool | torch.Tensor, device: torch.device | str | None = None) -> bool:
    """Whether `flag` holds on every rank (a bool, or a 0-d tensor kept on its device until
    here: one host sync). The same answer on every rank; `flag` itself when alone."""
    return not any_true(_not(flag), device)


def all_true_on_device(flag: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: whether `flag` (0-d bool) holds on every rank, left on the device, so
    a caller that reads it later (the deferred finite check) does not wait for the GPU now."""
    if not is_distributed():
        return flag
    t = flag.detach().float()
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.bool()


def any_true(flag: bool | torch.Tensor, device: torch.device | str | None = None,
             group: Any = None) -> bool:
    """Whether `flag` holds on any rank (e.g. one saw the preemption signal): the same answer on
    every rank, so they all stop at the same step. `group`: the process group (default: all)."""
    if not is_distributed():
        return bool(flag)
    t = _as_float(flag, device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def any_true_on_host(flag: bool) -> bool:
    """`any_true` for a flag the host holds (a stop signal seen), agreed over a CPU (gloo) group.

    Why: on the NCCL group the reduce is queued on the GPU stream behind the step just launched,
    and reading it makes the host wait for that step, so an agreement every step would keep the
    host from running a step ahead (the GPU then idles while it launches the next one; measured
    for the deferred finite check, benchmarks/RESULTS.md, issue 18, fourteenth session). The gloo
    reduce waits only for the other ranks' hosts. Every rank must call it at the same points (it
    is a collective)."""
    if not is_distributed():
        return bool(flag)
    return any_true(flag, "cpu", group=_host_group())


def _host_group() -> Any:
    """The gloo group of every rank that `init_distributed` made (its own group even when the
    default is gloo, so the CPU tests run the path an NCCL job takes); made here at the first
    call when the process group was initialised elsewhere (collective: every rank makes that
    first call at the same point, in `any_true_on_host`)."""
    if not _HOST_GROUP:
        _HOST_GROUP.append(dist.new_group(backend="gloo"))
    return _HOST_GROUP[0]


def all_sum(x: torch.Tensor | float, device: torch.device | str | None = None) -> torch.Tensor:
    """The sum over ranks of `x` (a number or a tensor), as a new tensor; a copy when alone."""
    # torch.full, not torch.tensor: a fill on the device, no copy the host would wait for
    t = (x.detach().clone() if isinstance(x, torch.Tensor)
         else torch.full((), float(x), device=device))
    if is_distributed():
        dist.all_reduce(t)
    return t


def _not(flag: bool | torch.Tensor) -> bool | torch.Tensor:
    return ~flag.bool() if isinstance(flag, torch.Tensor) else not flag


def _as_float(flag: bool | torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    """A float tensor for the collective (NCCL reduces float, not bool), on the flag's device
    or `device` (NCCL needs the rank's GPU)."""
    if isinstance(flag, torch.Tensor):
        return flag.detach().float().reshape(1)
    return torch.tensor([1.0 if flag else 0.0], device=device)


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """[N_r, ...] per rank, N_r free to differ -> [sum of N_r, ...] in rank order on every rank,
    without gradient (evaluation features); `x` itself when alone. The trailing shape must agree."""
    if not is_distributed():
        return x
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    counts = [int(n) for n in sizes]
    # all_gather needs one shape on every rank: pad to the largest share, then cut.
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[:x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a (float) tensor over ranks, as a new tensor without gradient; a copy when alone."""
    out = x.detach().clone()
    if is_distributed():
        dist.all_reduce(out)
        out /= dist.get_world_size()
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (any picklable object)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank `dst` (None elsewhere); [obj] when alone.

    all_gather_object is used because it works on NCCL and gloo alike; the objects (RNG and data
    loader state) are small."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out if dist.get_rank() == dst else None
