"""Several processes under `accelerate launch`: who we are, and the few collectives the stages need.

The process group is accelerate's (`PartialState`, created from the variables `accelerate launch` sets);
we add no launcher protocol of our own. SFT and RM leave the rest to the Trainer (DDP, FSDP or DeepSpeed
from the accelerate config). PPO is our own loop and runs data-parallel: every process samples its share
of a step's prompts, and the gradients of the trainable parameters are averaged across processes before
clipping and the optimiser step (`average_gradients`), so every process holds the same weights.

With one process every helper here is a no-op: the single-process path is unchanged, bit for bit.
"""

from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist
from accelerate import PartialState

from rlhf.config import ConfigError

# Distributed types (accelerate's names) under which PPO runs: plain data parallelism, one full copy of the
# model per process. FSDP and DeepSpeed shard parameters; PPO's loop runs one model under several adapters
# per backward and never wraps it, so sharding would need an engine-specific rewrite.
PPO_DISTRIBUTED_TYPES = ("NO", "MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_HPU")


def state() -> PartialState:
    """accelerate's process state: rank, world size, device (cuda:<local rank> on GPUs, cpu elsewhere).

    Under `accelerate launch` it joins the process group. On a machine without CUDA the processes run on the
    CPU over gloo, which accelerate only does when asked for the CPU (the Trainer asks the same way)."""
    return PartialState(cpu=not torch.cuda.is_available())


def shard(items: list, rank: int, world: int) -> list:
    """This process's share of `items`: every world-th item from position rank (disjoint, covering all)."""
    return items[rank::world]


def per_process(total: int, world: int, name: str) -> int:
    """`total` split evenly across `world` processes; a clear error when it does not divide."""
    if total % world:
        raise ConfigError(f"{name}={total} must be a multiple of the number of processes ({world}): every process "
                          f"samples {name} / {world} of each step")
    return total // world


def rank_seed(seed: int, rank: int) -> int:
    """A different sampling seed per process (only used with several processes)."""
    return seed + 1_000_003 * (rank + 1)


def distributed_type() -> str:
    """accelerate's name for how the processes share the work: NO, MULTI_GPU, MULTI_CPU, FSDP, DEEPSPEED, ..."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "DEEPSPEED"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP"
    if os.environ.get("ACCELERATE_USE_MEGATRON_LM", "false").lower() == "true":
        return "MEGATRON_LM"
    return str(state().distributed_type).split(".")[-1]


def check_ppo_supported() -> None:
    """PPO is data-parallel only: a clear error under FSDP, DeepSpeed or Megatron configs."""
    kind = distributed_type()
    if kind not in PPO_DISTRIBUTED_TYPES:
        raise ConfigError(f"PPO runs data-parallel only (accelerate distributed types "
                          f"{', '.join(PPO_DISTRIBUTED_TYPES)}); this launch is {kind}. Use "
                          f"configs/accelerate/ddp.yaml for `make ppo` (SFT and RM also take the FSDP and DeepSpeed "
                          f"configs).")


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace every parameter's gradient by its mean over all processes (one flat all-reduce).

    A missing gradient counts as zeros, so every process reduces the same buffer. Every process receives
    the same reduced bytes, hence takes the same optimiser step: the weights stay identical."""
    if not _active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def mean_over_processes(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """Each statistic averaged over the processes (all hold the same keys), so every process logs the same."""
    if not _active():
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return dict(values) | dict(zip(keys, t.tolist()))


def sum_over_processes(t: torch.Tensor) -> torch.Tensor:
    """A tensor summed over the processes (a new tensor, on every process); itself alone."""
    if not _active():
        return t
    total = t.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def any_process(flag: bool, device: torch.device | str | None = None) -> bool:
    """True on every process if `flag` is true on any one: a decision all processes must take together
    (e.g. stop and checkpoint after a signal reached only some of them; one process leaving the loop alone
    would leave the others waiting in a collective forever)."""
    if not _active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device if device is not None else state().device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_tensor(t: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor of each process (lengths may differ) concatenated in rank order, on every process."""
    if not _active():
        return t
    return torch.tensor([x for part in gather_objects(t.detach().cpu().tolist()) for x in part], dtype=t.dtype)


def gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every process ([obj] alone)."""
    if not _active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_parameters(params: list[torch.nn.Parameter]) -> None:
    """Copy rank 0's values into every process's parameters (a guard: all must start from the same weights)."""
    if not _active():
        return
    with torch.no_grad():
        for p in params:
            dist.broadcast(p.data, src=0)


def fingerprint(params: list[torch.Tensor]) -> str:
    """A hash of the parameters' exact bytes."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def check_in_sync(params: list[torch.Tensor], what: str) -> str:
    """Raise if the processes hold different values of `params`; returns their common fingerprint."""
    prints = gather_objects(fingerprint(params))
    if len(set(prints)) > 1:
        raise RuntimeError(f"the processes hold different {what}: fingerprints {prints} (gradient sync failed?)")
    return prints[0]
