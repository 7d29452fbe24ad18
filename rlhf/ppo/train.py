"""Stage 3, PPO: optimise the policy adapter against the reward model, with a KL penalty to the SFT model.
`ppo.estimator.name` picks the advantage estimator: gae (PPO with a value adapter) or a critic-free one (grpo, rloo,
reinforce_pp: rlhf/ppo/estimators.py); rollouts, scoring, the clipped loss, checkpoints and logging are shared.

Output `<run_dir>/ppo/`: `policy/` and (gae only) `value/` adapters (PEFT format; they apply to the SFT model,
i.e. the base with the SFT adapter merged), `value/value_head.safetensors`, the tokenizer, `config.yaml`,
`metrics.jsonl`, `tb/` (and the other `report_to` trackers), `checkpoints/`, `eval.json` (policy vs SFT on
held-out prompts; not with ppo.eval_samples=0, which `make demo` passes as `make eval` follows) and `DONE`.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import get_scheduler

from rlhf import data as rdata
from rlhf import distributed
from rlhf.checks import check_batch_sizes, monitor_on, rm_warnings_gate
from rlhf.config import ConfigError, PipelineConfig, PPOStageConfig, save_config
from rlhf.chat import describe
from rlhf.generation import SamplingSpec, encode_prompt, model_stop_ids
from rlhf.models import enable_activation_checkpointing, load_sft_model, load_tokenizer
from rlhf.plugins import import_callable
from rlhf.ppo import core
from rlhf.eval.flags import win_rate_text
from rlhf.ppo.engine import build_engine, mismatch
from rlhf.ppo.evaluate import compare_with_sft
from rlhf.ppo.guards import Guards, load_best, prune_best
from rlhf.ppo.kl import AdaptiveKLController, FixedKLController, default_kl_horizon
from rlhf.ppo.monitor import MonitorSpec, observe
from rlhf.ppo.roles import VALUE, Roles, build_roles, init_value_head
from rlhf.ppo.rollout import AdvantageSpec, PromptSampler, advantages, repeat_prompts, sample, score
from rlhf.ppo.state import load_checkpoint, rng_state, save_checkpoint
from rlhf.ppo.update import UpdateSpec, ppo_update
from rlhf.ppo.ptx import ptx_batches
from rlhf.progress import progress
from rlhf import reward_sources as rs
from rlhf.rm.scoring import RewardEnsemble
from rlhf.preempt import StopSignal, mark_preempted
from rlhf.runs import MetricsFile, begin_stage, check_finite, finish_stage, require_done, rm_warnings
from rlhf.sequences import batches
from rlhf.tracking import Trackers


def sampling(p: PPOStageConfig) -> SamplingSpec:
    s = p.sampling
    return SamplingSpec(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)


def update_spec(p: PPOStageConfig, kl_coef: float = 0.0) -> UpdateSpec:
    """ppo.update with what the update needs of the other sections. kl_coef: this step's beta (the KL
    controller's); it joins the loss for grpo only (grpo_kl: loss)."""
    u, e = p.update, p.estimator
    return UpdateSpec(ppo_epochs=u.epochs, num_minibatches=u.num_minibatches, grad_accum=u.grad_accum,
                      clip_range=u.clip_range, clip_range_value=u.clip_range_value, vf_coef=u.vf_coef,
                      max_grad_norm=u.max_grad_norm, temperature=p.sampling.temperature, ptx_coef=p.ptx.coef,
                      kl_loss_coef=kl_coef if e.name == "grpo" and e.grpo_kl == "loss" else 0.0,
                      kl_loss_estimator=e.grpo_kl_estimator, loss_agg=u.loss_agg,
                      max_new_tokens=p.sampling.max_new_tokens,
                      tis_cap=u.tis_cap if p.sampling.engine == "vllm" else None)


def advantage_spec(p: PPOStageConfig, shift: float, scale: float) -> AdvantageSpec:
    """ppo.estimator with what the advantages need of the other sections. shift, scale: the reward normalisation
    measured on the SFT policy (kept in the checkpoint)."""
    e, r = p.estimator, p.reward
    return AdvantageSpec(reward_shift=shift, reward_scale=scale, kl_estimator=p.kl.estimator,
                         missing_eos_penalty=r.missing_eos_penalty, whiten_rewards=r.whiten,
                         whiten_advantages=e.whiten_advantages, gamma=e.gamma, lam=e.lam, estimator=e.name,
                         group_size=p.sampling.group_size, std_norm=e.std_norm, grpo_kl=e.grpo_kl)


def kl_horizon(p: PPOStageConfig) -> int:
    """ppo.kl.horizon, or by default a tenth of the run's rollouts (kl.default_kl_horizon)."""
    return p.kl.horizon if p.kl.horizon is not None else default_kl_horizon(p.steps, p.sampling.rollout_batch_size)


def kl_controller(p: PPOStageConfig):
    if p.kl.adaptive:
        return AdaptiveKLController(p.kl.coef, p.kl.target, kl_horizon(p))
    return FixedKLController(p.kl.coef)


def load_prompt_ids(source: str, split: str, p: PPOStageConfig, tokenizer,
                    text_prompts: str = "raw") -> tuple[list, list[list[int]]]:
    """The prompts of `source` (plain text as model.text_prompts says: `rdata.for_model`) and their token ids."""
    examples = rdata.load_prompts(source, split=split, skip_invalid=p.skip_invalid)
    examples = rdata.for_model(examples, tokenizer, text_prompts, p.max_prompt_length, "ppo", source)
    return [e.prompt for e in examples], [encode_prompt(tokenizer, e.prompt) for e in examples]


def ensemble_in(scorer) -> RewardEnsemble | None:
    """The reward-model ensemble in what PPO maximises (alone or as a term of ppo.reward.terms), if any."""
    parts = [source for _, source in scorer.terms] if isinstance(scorer, rs.WeightedRewards) else [scorer]
    return next((s for s in parts if isinstance(s, RewardEnsemble)), None)


def normalisation_prompts(n_prompts: int, samples: int, seed: int) -> list[int]:
    """Indices of the prompts the reward normalisation is measured on: a seeded random sample of `samples` (all
    prompts if fewer), not the first rows of the file, which a sorted file would bias."""
    return sorted(random.Random(seed).sample(range(n_prompts), min(samples, n_prompts)))


@torch.no_grad()
def measure_reward_normalisation(roles, tokenizer, prompt_ids, p: PPOStageConfig, rank: int = 0,
                         world: int = 1) -> tuple[float, float]:
    """(shift, scale) of p.reward.norm (core.reward_normalisation) from RM scores of the SFT policy's own answers
    (the policy is SFT before any update). With several processes each samples a share of the prompts; the
    statistics are over all the scores. An ensemble's members are centred on the same answers first (their
    means become its offsets), so that its objective does not depend on a constant added to one member."""
    ensemble = ensemble_in(roles.scorer)
    if p.reward.norm == "none" and ensemble is None:
        return 0.0, 1.0
    chosen = normalisation_prompts(len(prompt_ids), p.reward.norm_samples, p.seed)
    mine = distributed.shard([prompt_ids[i] for i in chosen], rank, world)
    ids, mask, width = sample(roles, tokenizer, mine, sampling(p), p.sampling.forward_batch_size)
    rows = list(batches(ids.shape[0], p.sampling.forward_batch_size))
    if ensemble is not None:
        members = torch.cat([ensemble.member_scores_ids(ids[r], mask[r]) for r in rows], dim=1)
        ensemble.offsets = torch.stack([distributed.gather_tensor(m) for m in members]).float().mean(dim=1).cpu()
    scores = distributed.gather_tensor(torch.cat([roles.scorer.score_ids(ids[r], mask[r], prompt_width=width)
                                                  for r in rows]))
    if rank == 0 and p.reward.norm == "shift_scale" and scores.float().std().item() < core.REWARD_STD_FLOOR:
        print(f"[ppo] warning: the SFT policy's answers all score alike (std {scores.float().std().item():.2g} < "
              f"{core.REWARD_STD_FLOOR}): ppo.reward.norm=shift_scale falls back to shift (the reward's own units)",
              file=sys.stderr)
    return core.reward_normalisation(scores, p.reward.norm)


@dataclass
class Inputs:
    """What PPO reads before the model loads: the tokenizer and every prompt, tokenized once."""

    tokenizer: object
    prompts: list            # the training prompts (chat messages or text) and their ids
    prompt_ids: list[list[int]]
    held_out: list           # the held-out prompts and their ids (the monitor's first, the comparison's first)
    held_out_ids: list[list[int]]
    judge: object            # the gold judge of the end-of-run comparison, or None
    ptx: object              # PPO-ptx's demonstration batches, or None


def load_inputs(p: PPOStageConfig, sft_dir: Path, procs, text_prompts: str = "raw") -> Inputs:
    """The tokenizer (the SFT stage's), the prompts (lengths checked before the model loads), the judge and
    PPO-ptx's demonstrations; plain-text prompts as model.text_prompts says."""
    tokenizer = load_tokenizer(str(sft_dir))
    prompts, prompt_ids = load_prompt_ids(p.prompts_file, p.prompts_split, p, tokenizer, text_prompts)
    held, held_ids = (load_prompt_ids(p.eval_prompts_file, p.eval_prompts_split, p, tokenizer, text_prompts)
                      if p.eval_prompts_file else ([], []))
    ptx = (ptx_batches(p, tokenizer, procs.device, procs.process_index, procs.num_processes, text_prompts)
           if p.ptx.coef > 0 else None)
    return Inputs(tokenizer, prompts, prompt_ids, held, held_ids, import_callable(p.judge) if p.judge else None, ptx)


def local_batch_size(p: PPOStageConfig, world: int) -> int:
    """Rollouts per process (rollout_batch_size is global; each of `world` processes samples its share, whole
    groups: a group's baseline is computed where it was sampled)."""
    batch, k = p.sampling.rollout_batch_size, p.sampling.group_size
    local = distributed.per_process(batch, world, "ppo.sampling.rollout_batch_size")
    if local % k:
        raise ConfigError(f"ppo.sampling.rollout_batch_size={batch} must be a multiple of ppo.sampling.group_size={k} "
                          f"x {world} processes: each process answers whole groups")
    check_batch_sizes(local, p.update.num_minibatches, p.update.grad_accum,
                      f" (per process: {batch} rollouts / {world} processes)" if world > 1 else "")
    return local


def load_roles(cfg: PipelineConfig, sft_dir: Path, rm_dir: Path, inputs: Inputs, procs) -> tuple[Roles, list[int]]:
    """One SFT model, four roles (policy, reference = adapters off, value (gae only), reward), the reward being
    what PPO maximises (an ensemble's objective, reward functions); every process starts from the same weights.
    Returns the roles and the stop tokens sampling ends at."""
    p, tokenizer, main = cfg.ppo, inputs.tokenizer, procs.is_main_process
    torch.manual_seed(p.seed)
    sft_model = load_sft_model(cfg.model, sft_dir, tokenizer).to(procs.device)
    if cfg.model.gradient_checkpointing:  # recompute activations in backward; each role's under its own adapter
        enable_activation_checkpointing(sft_model)
    roles = build_roles(sft_model, rm_dir, tokenizer, p.lora, p.update.value_from_reward,
                        critic=p.estimator.name == "gae")
    stops = model_stop_ids(roles.model, tokenizer)  # what sampling stops at; a response holding one has ended
    say = print if main else (lambda *a, **k: None)
    say(f"[ppo] answers end at {describe(tokenizer, stops)}")
    if isinstance(roles.scorer, RewardEnsemble):  # PPO maximises the ensemble objective; eval reports the mean
        roles.scorer = roles.scorer.with_objective(p.reward.ensemble_objective, p.reward.ensemble_std_coef)
        say(f"[ppo] reward: {p.reward.ensemble_objective} of {len(roles.scorer.members)} reward models"
            + (f" (std coef {p.reward.ensemble_std_coef})" if p.reward.ensemble_objective == "mean_minus_std" else ""))
    if rs.uses_functions(p.reward.terms):  # reward functions, alone or weighted with the RM (rlhf/reward_sources.py)
        roles.scorer = rs.reward_source(p.reward.terms, roles.scorer, tokenizer, inputs.prompts + inputs.held_out,
                                        inputs.prompt_ids + inputs.held_out_ids)
        say(f"[ppo] reward: {roles.scorer.describe([t.source for t in p.reward.terms])}")
    distributed.broadcast_parameters(roles.trainable_parameters())  # same start everywhere
    if procs.num_processes > 1:
        torch.manual_seed(distributed.rank_seed(p.seed, procs.process_index))  # but each process samples differently
    return roles, stops


def optimiser(roles: Roles, p: PPOStageConfig):
    """AdamW on the trained adapters, and its schedule over all the run's optimiser steps."""
    optimizer = torch.optim.AdamW(roles.trainable_parameters(), lr=p.update.lr, weight_decay=p.update.weight_decay)
    total = p.steps * p.update.epochs * p.update.num_minibatches
    warmup = int(p.update.warmup * total) if p.update.warmup < 1 else int(p.update.warmup)
    return optimizer, get_scheduler(p.update.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def run(cfg: PipelineConfig) -> Path:
    p, run_dir = cfg.ppo, Path(cfg.run_dir)  # checked by preflight (rlhf.checks.check_ppo)
    sft_dir, rm_dir = require_done(run_dir / "sft", "sft"), require_done(run_dir / "rm", "rm")
    procs = distributed.state()  # several processes (accelerate launch): each samples its share of a step
    distributed.check_ppo_supported()
    world, main = procs.num_processes, procs.is_main_process
    local_batch = local_batch_size(p, world)
    out = begin_stage(run_dir / "ppo", cfg.force)
    if main:
        save_config(cfg, out)
    warned = rm_warnings_gate(rm_warnings(rm_dir), p.guards.keep_best, monitor_on(p), p.guards.accept_rm_warnings)
    if warned and main:  # a reward model its stage warned about is not optimised as if nothing were wrong
        print(f"[ppo] WARNING: {warned}", file=sys.stderr)

    # 1. tokenizer and prompts (checked before the model loads); 2. the roles on one SFT model, the optimiser
    inputs = load_inputs(p, sft_dir, procs, cfg.model.text_prompts)
    tokenizer, prompt_ids = inputs.tokenizer, inputs.prompt_ids
    if main:
        print(f"[ppo] {len(prompt_ids)} prompts, {p.steps} steps of {p.sampling.rollout_batch_size} rollouts"
              + (f" ({local_batch} per process, {world} processes)" if world > 1 else "")
              + (f"; adaptive KL coefficient from {p.kl.coef} towards {p.kl.target} nats per answer, horizon "
                 f"{kl_horizon(p)} rollouts" if p.kl.adaptive else ""))
    roles, stops = load_roles(cfg, sft_dir, rm_dir, inputs, procs)
    optimizer, scheduler = optimiser(roles, p)
    watch = MonitorSpec(inputs.held_out_ids[:p.monitor.prompts] if monitor_on(p) else [], sampling(p),
                        p.sampling.forward_batch_size, p.seed, p.monitor.every, p.steps)

    # 3. resume, or measure the reward normalisation on the SFT policy (and observe it: the guards' baseline)
    loop = resume_or_start(out, roles, optimizer, scheduler, p, procs, tokenizer, prompt_ids, len(prompt_ids))
    metrics = MetricsFile(out / "metrics.jsonl", resume_step=loop.step, enabled=main)
    trackers = Trackers(cfg.report_to, out, config=asdict(cfg), enabled=main, stage="ppo")  # tb/ and report_to
    if main:
        prune_best(out, loop.guards.best_step, upto=loop.step)  # snapshots a killed run wrote after its checkpoint
    if loop.step == 0 and watch.due(0):
        first = observe(0, 0.0, loop.guards, watch, roles, tokenizer, out, main, procs.device)
        metrics.write(0, first)
        trackers.log(first, 0)

    # 4. the loop: sync the engine, rollout, score, advantages, PPO epochs, KL controller, monitor, checkpoint
    bar = progress(range(loop.step, p.steps), initial=loop.step, total=p.steps, desc="ppo",
                   enabled=p.progress_bar and main)
    stop, engine = StopSignal(), None  # SIGTERM/SIGUSR1: checkpoint at the end of the step, exit 75 (rlhf/preempt.py)
    try:
        engine = build_engine(cfg, sft_dir, out, tokenizer, stops, procs, prompt_ids)  # hf, or a vLLM server
        for step in bar:
            if loop.guards.stop_reason:  # a guard stopped the run (last step, or in the checkpoint resumed from)
                break
            logs = ppo_step(step, loop, roles, optimizer, scheduler, engine, inputs, stops, p, procs)
            logs |= observe(step + 1, logs["ppo/kl"], loop.guards, watch, roles, tokenizer, out, main, procs.device)
            if loop.guards.stop_reason and main:
                print(f"[ppo] stopping at step {step + 1}: {loop.guards.stop_reason}", file=sys.stderr)
            metrics.write(step + 1, logs)
            trackers.log(logs, step + 1)
            bar.set_postfix(score=f"{logs['ppo/score']:.3f}", kl=f"{logs['ppo/kl']:.3f}")
            # agreed by every process; at the last step too: the rerun, not this job, runs the comparison with SFT
            stopping = stop.requested(procs.device)
            if (step + 1) % p.checkpoint.every == 0 or step + 1 == p.steps or stopping or loop.guards.stop_reason:
                loop.step = step + 1
                save_step(out, loop, roles, optimizer, scheduler, p, procs)
            if stopping:
                trackers.close()
                raise mark_preempted(out, "ppo", step + 1, stop.received, write=main)
    finally:
        stop.close()
        if engine is not None:
            engine.close()
    trackers.close()
    if world > 1:
        fp = distributed.check_in_sync(roles.trainable_parameters(), "trained weights")
        if main:
            print(f"[ppo] {world} processes hold identical trained weights (fingerprint {fp})")
    if main:  # 5. the kept policy and the trained adapters; 6. the policy against SFT on held-out prompts
        finish(out, roles, loop, inputs, p, world)
    procs.wait_for_everyone()
    return out


def ppo_step(step: int, loop: "LoopState", roles: Roles, optimizer, scheduler, engine, inputs: Inputs,
             stops: list[int], p: PPOStageConfig, procs) -> dict[str, float]:
    """One PPO step (each of the rollout_batch_size / k prompts answered k = group_size times; a group stays in one
    process); returns its metrics, the same on every process."""
    rank, world = procs.process_index, procs.num_processes
    t_sync = time.perf_counter()
    synced = engine.sync(roles, step)  # vllm: the engine gets this policy, checked on the probe answers
    t0 = time.perf_counter()
    chosen = distributed.shard(loop.sampler.next(p.sampling.rollout_batch_size // p.sampling.group_size), rank, world)
    batch = repeat_prompts([inputs.prompt_ids[i] for i in chosen], p.sampling.group_size)
    ids, mask, width, engine_lp = engine.sample(roles, inputs.tokenizer, batch, sampling(p),           # 4.1 rollout
                                                p.sampling.forward_batch_size, step)
    t1 = time.perf_counter()
    r = score(roles, ids, mask, width, p.sampling.temperature, p.sampling.forward_batch_size, stops,   # 4.2 score
              engine_lp)
    a = advantages(r, loop.kl_ctl.value, advantage_spec(p, loop.shift, loop.scale))                 # 4.3 advantages
    check_rollout(r, a, f"ppo step {step + 1}")  # a nan score or KL stops the run before any update
    t2 = time.perf_counter()
    stats = ppo_update(roles, optimizer, scheduler, r, a, update_spec(p, loop.kl_ctl.value), inputs.ptx,  # 4.4
                       f"ppo step {step + 1}")
    t3 = time.perf_counter()
    logs = step_metrics(r, a, loop.kl_ctl.value, scheduler.get_last_lr()[0]) | stats | synced | mismatch(
        r.logprobs, r.engine_logprobs, r.response_mask) | {
        "time/sync": t0 - t_sync, "time/generate": t1 - t0, "time/score": t2 - t1, "time/train": t3 - t2,
        "time/step": t3 - t_sync,
        "perf/generated_tokens_per_s": r.response_mask.sum().item() / max(t1 - t0, 1e-9)}
    logs = distributed.mean_over_processes(logs, procs.device)  # every process logs and adapts the same
    loop.kl_ctl.update(logs["ppo/kl"], p.sampling.rollout_batch_size)                                        # 4.5 KL
    return logs


def finish(out: Path, roles: Roles, loop: "LoopState", inputs: Inputs, p: PPOStageConfig, world: int) -> None:
    """The main process's end of the stage: the kept policy (rlhf/ppo/guards.py) and the trained adapters in PEFT
    format, then the comparison with SFT on held-out prompts (ppo.eval_samples), then DONE."""
    last, kept, why = save_policy(out, roles, loop.guards, p.steps, inputs.tokenizer)
    summary = {"steps": p.steps, "num_processes": world, "steps_run": last, "kept_step": kept, "kept_reason": why,
               "stopped_early": loop.guards.stop_reason is not None, "reward_shift": loop.shift,
               "reward_scale": loop.scale, "reward_norm": reward_norm_used(p.reward.norm, loop.scale)}
    eval_prompts = inputs.held_out[:p.eval_samples]
    if eval_prompts:
        result = compare_with_sft(roles, inputs.tokenizer, eval_prompts, sampling(p), p.sampling.forward_batch_size,
                                  inputs.judge, seed=p.seed)
        (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        summary |= {k: v for k, v in result.items() if k.startswith("eval/")}
        print(format_eval(result))
    elif p.eval_prompts_file:
        print("[ppo] no held-out comparison with SFT here (ppo.eval_samples=0): `make eval` judges the policy")
    finish_stage(out, summary)


@dataclass
class LoopState:
    """What PPO's loop carries from step to step besides the weights and the optimiser, all of it in every
    checkpoint: the steps done, the KL controller, the prompt order, the guards, the reward normalisation."""

    step: int
    kl_ctl: object
    sampler: PromptSampler
    guards: Guards
    shift: float
    scale: float
    member_offsets: list[float] | None = None  # a reward-model ensemble's (RewardEnsemble.offsets)

    def state_dict(self, p: PPOStageConfig) -> dict:
        return {"kl": self.kl_ctl.state_dict(), "sampler": self.sampler.state_dict(), "reward_shift": self.shift,
                "reward_scale": self.scale, "member_offsets": self.member_offsets, "config": asdict(p),
                "guards": self.guards.state_dict()}


def resume_or_start(out: Path, roles, optimizer, scheduler, p: PPOStageConfig, procs, tokenizer, prompt_ids,
                    n_prompts: int) -> LoopState:
    """The loop's state from the last complete checkpoint in out/checkpoints (weights, optimiser, scheduler and
    every process's random state restored into the objects given), or a fresh one whose reward normalisation is
    measured on the SFT policy (and the value head calibrated to it)."""
    rank, world, main = procs.process_index, procs.num_processes, procs.is_main_process
    loop = LoopState(0, kl_controller(p), PromptSampler(n_prompts, p.seed), Guards(p.guards), 0.0, 1.0)
    with procs.main_process_first():  # the main process removes a half-written checkpoint first
        state = load_checkpoint(out / "checkpoints", roles, optimizer, scheduler, rank, world)
    if state is None:
        loop.shift, loop.scale = measure_reward_normalisation(roles, tokenizer, prompt_ids, p, rank, world)
        if ensemble_in(roles.scorer) is not None:
            loop.member_offsets = ensemble_in(roles.scorer).offsets.tolist()
        check_finite({"ppo/reward_shift": loop.shift, "ppo/reward_scale": loop.scale}, "ppo reward normalisation")
        if main:
            print(f"[ppo] reward normalisation from the SFT policy: shift {loop.shift:.3f}, scale {loop.scale:.3f}")
        if p.estimator.name == "gae" and p.update.value_from_reward:
            start = init_value_head(roles, loop.shift, loop.scale)
            if main:
                print(f"[ppo] value head: {start}")
        return loop
    if not state["rng_restored"]:
        torch.manual_seed(distributed.rank_seed(p.seed + state["step"], rank))
        print(f"[ppo] warning: {state['path']} has no random state for process {rank} of {world}; "
              f"reseeded (the run continues, but not as an uninterrupted run would)", file=sys.stderr)
    if main:
        print(f"[ppo] resuming from {state['path']} (step {state['step']})")
        changed = sorted(k for k, v in asdict(p).items() if state.get("config", {}).get(k, v) != v)
        if changed:
            print(f"[ppo] warning: the ppo config changed since that checkpoint: {', '.join(changed)}", file=sys.stderr)
    loop.kl_ctl.load_state_dict(state["kl"])
    loop.sampler.load_state_dict(state["sampler"])
    loop.guards.load_state_dict(state.get("guards", {}))
    loop.shift, loop.scale, loop.step = state["reward_shift"], state["reward_scale"], state["step"]
    loop.member_offsets = state.get("member_offsets")
    if loop.member_offsets is not None and ensemble_in(roles.scorer) is not None:
        ensemble_in(roles.scorer).offsets = torch.tensor(loop.member_offsets)
    return loop


def reward_norm_used(mode: str, scale: float) -> str:
    """The reward normalisation a run applied: shift_scale measured a spread too small to divide by (scale 1)
    ran as shift (core.reward_normalisation)."""
    return "shift" if mode == "shift_scale" and scale == 1.0 else mode


def save_step(out: Path, loop: LoopState, roles, optimizer, scheduler, p: PPOStageConfig, procs) -> None:
    """A checkpoint after step loop.step: the adapters, optimiser and scheduler, the loop's state and every
    process's random state (gathered; the main process writes). Every process calls it."""
    rngs = distributed.gather_objects(rng_state())
    if procs.is_main_process:
        save_checkpoint(out / "checkpoints", loop.step, roles, optimizer, scheduler, loop.state_dict(p), rngs=rngs)
        prune_best(out, loop.guards.best_step)
    procs.wait_for_everyone()


def save_policy(out: Path, roles, guards: Guards, steps: int, tokenizer) -> tuple[int, int, str]:
    """The kept policy (ppo.guards.keep_best) loaded back if it is not the last, then the trained adapters (PEFT
    format), the value head and the tokenizer saved in out/. Returns (last step run, kept step, why)."""
    last = guards.stop_step or steps
    kept, why = guards.kept(last)
    if kept != last:
        load_best(out, kept, roles)
    print(f"[ppo] {why}")
    roles.model.save_pretrained(str(out), selected_adapters=list(roles.trained))
    if roles.value_head is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in roles.value_head.state_dict().items()},
                  str(out / VALUE / "value_head.safetensors"))
    tokenizer.save_pretrained(out)
    return last, kept, why


def check_rollout(r, a, where: str) -> None:
    """FloatingPointError if a rollout's scores, values, log-probs or per-token KL hold a nan or inf (on
    valid tokens): "<where>: ppo/score is nan"."""
    mask = r.response_mask
    values = {"ppo/values": r.values[mask]} if r.values is not None else {}
    check_finite({"ppo/score": r.scores, **values, "ppo/logprobs": r.logprobs[mask],
                  "ppo/ref_logprobs": r.ref_logprobs[mask], "ppo/kl": a.kl[mask]}, where)


def step_metrics(r, a, kl_coef: float, lr: float) -> dict[str, float]:
    """Per-step rollout statistics (names as in the report and TensorBoard); the value statistics with a critic."""
    mask = r.response_mask
    seq_kl = core.masked_sum(a.kl, mask, dim=1)
    non_score = core.masked_sum(a.non_score, mask, dim=1)
    critic = {} if r.values is None else {
        "ppo/explained_variance": core.explained_variance(r.values, a.returns, mask).item(),
        "ppo/value_mean": core.masked_mean(r.values, mask).item()}
    return {
        "ppo/score": r.scores.mean().item(),
        "ppo/score_normalized": a.scores.mean().item(),
        "ppo/kl": seq_kl.mean().item(),
        "ppo/non_score_reward": non_score.mean().item(),
        "ppo/reward": (a.scores + non_score).mean().item(),
        "ppo/kl_coef": kl_coef,
        "ppo/response_length": mask.sum(1).float().mean().item(),
        "ppo/eos_rate": r.ended.float().mean().item(),
        **critic,
        "ppo/lr": lr,
    }


def format_eval(e: dict) -> str:
    lines = [f"[ppo] held-out prompts: {e['eval/n_prompts']}",
             f"      RM score  policy {e['eval/reward_policy']:.3f}  SFT {e['eval/reward_sft']:.3f}  "
             f"win rate {win_rate_text(e, 'eval/reward_win_rate')}",
             f"      KL(policy || SFT) {e['eval/kl']:.3f} nats   length policy {e['eval/length_policy']:.1f}  "
             f"SFT {e['eval/length_sft']:.1f}"]
    if "eval/gold_policy" in e:
        lines.append(f"      gold judge policy {e['eval/gold_policy']:.3f}  SFT {e['eval/gold_sft']:.3f}  "
                     f"win rate {win_rate_text(e, 'eval/gold_win_rate')}")
    return "\n".join(lines)

