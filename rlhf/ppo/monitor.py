"""Held-out monitoring during PPO: every `ppo.monitor.every` steps the policy answers a fixed set of held-out
prompts, sampled (at the PPO temperature) and greedy, always with the same seed, so successive points
differ only by the policy (the last step is a monitor point too). Logged as `monitor/<decoding>/<name>` (RM
score, KL to SFT of the sampled answers, and rlhf/eval/degeneration.py's measures).

The global random state PPO samples its rollouts from is saved and restored around it: a run with
monitoring samples exactly the rollouts of a run without.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rlhf import distributed
from rlhf.eval import degeneration
from rlhf.generation import SamplingSpec
from rlhf.ppo.evaluate import judged_answers
from rlhf.ppo.guards import Guards, save_best
from rlhf.ppo.roles import Roles


@dataclass(frozen=True)
class MonitorSpec:
    prompt_ids: list[list[int]]  # the held-out prompts, encoded; empty: no monitoring
    sampling: SamplingSpec       # PPO's (the greedy answers use it with do_sample=False)
    batch_size: int
    seed: int
    every: int                   # steps between monitor points; 0: none
    last: int = 0                # the run's last step, also a monitor point (the kept policy may be the last)

    def due(self, step: int) -> bool:
        return bool(self.prompt_ids) and self.every > 0 and (step % self.every == 0 or step == self.last)


@contextmanager
def preserved_rng():
    """Run a block that reseeds or draws from torch's (CPU and CUDA) and Python's global generators, then put
    them back as they were."""
    cpu, cuda, py = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, \
        random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)


@torch.no_grad()
def monitor(roles: Roles, tokenizer, prompt_ids: list[list[int]], spec: SamplingSpec, batch_size: int,
            seed: int) -> dict[str, float]:
    """The policy's sampled and greedy answers to `prompt_ids`: {"monitor/sample/reward": ..., ...}.
    Answered and judged by eval's path (rlhf/eval/judging.py), as the end-of-stage comparison with SFT is."""
    out = {}
    with preserved_rng():
        for decoding, s in (("sample", spec), ("greedy", replace(spec, do_sample=False))):
            a, judged = judged_answers(roles, tokenizer, prompt_ids, s, batch_size, seed)
            out[f"monitor/{decoding}/reward"] = sum(judged["reward"]) / len(judged["reward"])
            if judged["kl"] is not None:  # a KL estimate only on the policy's own samples
                out["monitor/sample/kl"] = sum(judged["kl"]) / len(judged["kl"])
            out |= {f"monitor/{decoding}/{k}": v for k, v in degeneration.summary(a.tokens).items()}
    return out


def observe(step: int, kl: float, guards: Guards, m: MonitorSpec, roles: Roles, tokenizer, out: Path, main: bool,
            device) -> dict[str, float]:
    """The guards after PPO step `step` (0: before the first, the SFT policy): the rollout KL (`kl`) against the
    budget; at a monitor point, the monitor, the degeneration stop and the kept policy (its adapters saved
    by the main process). Returns the monitor metrics to log (averaged over processes: all decide alike)."""
    if step > 0:
        guards.after_step(step, kl)
    if not m.due(step):
        return {}
    logs = distributed.mean_over_processes(monitor(roles, tokenizer, m.prompt_ids, m.sampling, m.batch_size, m.seed),
                                           device)
    budget = guards.spec.kl_budget
    kl_ok = step == 0 or not budget or budget <= 0 or kl <= budget
    if guards.after_monitor(step, logs["monitor/sample/reward"], logs["monitor/greedy/repeat"], kl_ok) and main:
        save_best(out, step, roles)
    return logs
