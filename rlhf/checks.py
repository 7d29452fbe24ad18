"""One check per stage of the settings that are wrong on their own, with no file read and nothing loaded: a choice
outside its list, a number out of range, two keys that contradict each other. `rlhf.preflight` calls them (and
nothing else does), before the checks on files and finished stages; a stage's `run` takes a checked config.

Torch-free, like rlhf/config.py: `python -m stages.<x>` reports a bad key in about a second. The lists of choices
live here, and the modules that act on them import them from here.
"""

from __future__ import annotations

import math
from pathlib import Path

from rlhf.config import ConfigError, PipelineConfig, PPOStageConfig

# --- the choices --------------------------------------------------------------------------------------------
ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")
"""ppo.estimator.name (rlhf/ppo/estimators.py)."""
GROUP_ESTIMATORS = ("grpo", "rloo")
"""The estimators whose baseline is the other answers of the prompt's group (group_size >= 2)."""
REWARD_NORMS = ("shift_scale", "shift", "none")
"""ppo.reward.norm (rlhf/ppo/core.py)."""
LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")
"""ppo.update.loss_agg (rlhf/ppo/core.py)."""
KL_KINDS = ("k1", "k3", "abs", "mse")
"""ppo.kl.estimator, the KL in the reward (rlhf/ppo/kl.py)."""
KL_LOSS_KINDS = ("k3+", "k2", "k3")
"""ppo.estimator.grpo_kl_estimator, GRPO's KL loss term (rlhf/ppo/kl.py)."""
KEEP_BEST = ("monitor_reward_guarded", "monitor_reward", "none")
"""ppo.guards.keep_best (rlhf/ppo/guards.py)."""
ENSEMBLE_OBJECTIVES = ("mean", "min", "mean_minus_std")
"""ppo.reward.ensemble_objective (rlhf/rm/scoring.py)."""
ENGINES = ("hf", "vllm")
"""ppo.sampling.engine and eval.engine (rlhf/ppo/engine.py, rlhf/eval/engine.py)."""
PROBES = ("repeat", "truncate", "empty", "shuffle", "other_prompt")
"""The reward-hacking probes (rlhf/rm/probes.py), as rm.probes.no_warning names them."""
RM_SELECTION_METRICS = ("accuracy", "loss")
"""rm.early_stopping.metric (rlhf/rm/selection.py)."""
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "sppo_hard", "nca_pair", "exo_pair", "apo_zero",
                  "apo_down", "discopop", "sigmoid_norm")
"""dpo.loss_type (trl's)."""
DECODINGS = ("sample", "greedy")
"""eval.decoding."""
TEXT_PROMPTS = ("raw", "chat")
"""model.text_prompts: what a plain-text prompt is to the model (rlhf/data/loaders.py, `as_chat`)."""
EVAL_STAGES = ("base", "sft", "ppo", "dpo")
"""The run's own checkpoints eval.checkpoints names (a `?` after one: if that stage has finished)."""


def _choice(value, choices: tuple, key: str) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, not {value!r}")


# --- per stage -------------------------------------------------------------------------------------------------

def _check_model(cfg: PipelineConfig) -> None:
    """The model section, which every stage reads."""
    _choice(cfg.model.text_prompts, TEXT_PROMPTS, "model.text_prompts")


def _check_data_files(d, key: str) -> None:
    """The limits of a Trainer stage's examples (config.DataFiles). A value that is still an interpolation (DPO's
    `${rm.max_length}` in a config built without load_config) is checked where it points."""
    if isinstance(d.max_prompt_length, int) and isinstance(d.max_length, int) and d.max_prompt_length > d.max_length:
        raise ConfigError(f"{key}.max_prompt_length={d.max_prompt_length} is longer than {key}.max_length="
                          f"{d.max_length} (prompt and answer together)")
    if not d.eval_file and not 0 < d.eval_fraction < 1:
        raise ConfigError(f"{key}.eval_fraction={d.eval_fraction}: without {key}.eval_file a share between 0 and 1 "
                          f"of the training rows is held out")


def check_sft(cfg: PipelineConfig) -> None:
    _check_model(cfg)
    _check_data_files(cfg.sft, "sft")


def check_rm(cfg: PipelineConfig) -> None:
    r = cfg.rm
    _check_model(cfg)
    _check_data_files(r, "rm")
    if r.ensemble < 1:
        raise ConfigError(f"rm.ensemble must be at least 1, got {r.ensemble}")
    if r.early_stopping.metric not in RM_SELECTION_METRICS or r.early_stopping.patience < 0:
        raise ConfigError(f"rm.early_stopping: metric must be one of {', '.join(RM_SELECTION_METRICS)} and patience "
                          f">= 0, got {r.early_stopping.metric!r} and {r.early_stopping.patience}")
    unknown = set(r.probes.no_warning) - set(PROBES)
    if unknown:
        raise ConfigError(f"rm.probes.no_warning: unknown probe(s) {sorted(unknown)}; the probes are "
                          f"{', '.join(PROBES)}")
    if r.train.lr_scheduler == "reduce_lr_on_plateau" and not r.early_stopping.enabled:
        raise ConfigError("rm.train.lr_scheduler=reduce_lr_on_plateau steps on the held-out evaluations of early "
                          "stopping: set rm.early_stopping.enabled=true or another rm.train.lr_scheduler")
    if not 0 <= r.probes.train_share <= 1:
        raise ConfigError(f"rm.probes.train_share must be between 0 and 1 (a share of the training answers), "
                          f"got {r.probes.train_share}")


def monitor_on(p: PPOStageConfig) -> bool:
    """Whether PPO's held-out monitor runs (and with it the degeneration guard and keep_best's choice)."""
    return p.monitor.every > 0 and bool(p.eval_prompts_file) and p.monitor.prompts > 0


def check_ppo(cfg: PipelineConfig) -> None:
    _check_model(cfg)
    p = cfg.ppo
    # PPO's log-probs are those of softmax(logits / temperature) over the whole vocabulary; top-k or top-p sampling
    # draws from a truncated distribution, so the ratio and the KL would describe a policy that is not the one
    # sampled: refused rather than silently biased
    s = p.sampling
    if s.top_k != 0 or s.top_p != 1.0:
        raise ConfigError(f"ppo.sampling.top_k={s.top_k}, ppo.sampling.top_p={s.top_p}: PPO samples from the full "
                          f"distribution at ppo.sampling.temperature (its log-probs must be those of the sampling "
                          f"distribution); set ppo.sampling.top_k=0 and ppo.sampling.top_p=1.0 (eval.top_k/top_p may "
                          f"differ)")
    _choice(p.reward.norm, REWARD_NORMS, "ppo.reward.norm")
    _choice(p.reward.ensemble_objective, ENSEMBLE_OBJECTIVES, "ppo.reward.ensemble_objective")
    _choice(p.kl.estimator, KL_KINDS, "ppo.kl.estimator")
    _check_rewards(p)
    _check_guards(p)
    _check_estimator(p)
    _choice(p.sampling.engine, ENGINES, "ppo.sampling.engine")
    if p.update.tis_cap is not None and not p.update.tis_cap >= 1.0:
        raise ConfigError(f"ppo.update.tis_cap={p.update.tis_cap}: the cap of the importance weights must be >= 1 "
                          f"(or null: off)")
    if p.ptx.coef > 0 and not p.ptx.file:
        raise ConfigError("ppo.ptx.coef > 0 needs ppo.ptx.file (demonstrations, as for SFT)")
    check_batch_sizes(p.sampling.rollout_batch_size, p.update.num_minibatches, p.update.grad_accum)


def check_batch_sizes(rollout_batch_size: int, num_minibatches: int, grad_accum: int, where: str = "") -> None:
    """Sizes that would silently drop rollouts or change the number of optimiser steps. `where`: said after the
    message (the per-process sizes of a run of several processes)."""
    if rollout_batch_size % num_minibatches:
        raise ConfigError(f"ppo.sampling.rollout_batch_size={rollout_batch_size} must be a multiple of "
                          f"ppo.update.num_minibatches={num_minibatches}{where}")
    minibatch = rollout_batch_size // num_minibatches
    if minibatch % grad_accum:
        raise ConfigError(f"the minibatch size {minibatch} (rollout_batch_size / num_minibatches) must be a multiple "
                          f"of ppo.update.grad_accum={grad_accum}{where}")


def _check_rewards(p: PPOStageConfig) -> None:
    """ppo.reward.terms' shape (that each function imports and takes (prompt, response) is preflight's, which may
    import the user's module)."""
    if not p.reward.terms:
        raise ConfigError("ppo.reward.terms is empty: list at least one {source, weight} (source: rm or "
                          "module:function)")
    sources = [t.source for t in p.reward.terms]
    if len(set(sources)) != len(sources):
        raise ConfigError(f"ppo.reward.terms: each source may appear once, got {sources}")
    for i, t in enumerate(p.reward.terms):
        if not math.isfinite(t.weight) or t.weight == 0:
            raise ConfigError(f"ppo.reward.terms[{i}].weight must be a finite non-zero number, got {t.weight}")


def _check_guards(p: PPOStageConfig) -> None:
    _choice(p.guards.keep_best, KEEP_BEST, "ppo.guards.keep_best")
    if p.monitor.every < 0 or p.guards.patience < 1:
        raise ConfigError(f"ppo.monitor.every must be >= 0 and ppo.guards.patience >= 1, got {p.monitor.every} "
                          f"and {p.guards.patience}")
    # the default (monitor_reward_guarded) falls back to the last policy without a monitor, and says so in DONE
    if p.guards.keep_best == "monitor_reward" and not monitor_on(p):
        raise ConfigError(f"ppo.guards.keep_best={p.guards.keep_best} chooses among monitor points: it needs "
                          f"ppo.monitor.every > 0, ppo.monitor.prompts > 0 and ppo.eval_prompts_file")


def _check_estimator(p: PPOStageConfig) -> None:
    e, k, batch = p.estimator, p.sampling.group_size, p.sampling.rollout_batch_size
    _choice(e.name, ESTIMATORS, "ppo.estimator.name")
    if k < 1 or (e.name in GROUP_ESTIMATORS and k < 2):
        raise ConfigError(f"ppo.sampling.group_size={k}: ppo.estimator.name={e.name} needs "
                          + ("at least 2 answers per prompt (its baseline is the other answers)"
                             if e.name in GROUP_ESTIMATORS else "at least 1"))
    if batch % k:
        raise ConfigError(f"ppo.sampling.rollout_batch_size={batch} must be a multiple of ppo.sampling.group_size={k} "
                          f"(it counts answers: rollout_batch_size / group_size prompts a step, each answered "
                          f"group_size times)")
    if e.grpo_kl not in ("loss", "reward"):
        raise ConfigError(f"ppo.estimator.grpo_kl must be loss (a k3 loss term, GRPO's paper) or reward (the "
                          f"answer's summed KL in its reward, as rloo), not {e.grpo_kl!r}")
    _choice(p.estimator.grpo_kl_estimator, KL_LOSS_KINDS, "ppo.estimator.grpo_kl_estimator")
    if p.kl.adaptive and (p.kl.target <= 0 or (p.kl.horizon is not None and p.kl.horizon <= 0)):
        raise ConfigError(f"ppo.kl.adaptive needs ppo.kl.target > 0 and ppo.kl.horizon > 0 (or null: a tenth of the "
                          f"run's rollouts), got {p.kl.target} and {p.kl.horizon}")
    _choice(p.update.loss_agg, LOSS_AGGS, "ppo.update.loss_agg")
    if p.reward.whiten and e.name in GROUP_ESTIMATORS:
        raise ConfigError(f"ppo.reward.whiten scales per-token rewards (gae, reinforce_pp); ppo.estimator.name="
                          f"{e.name} normalises within groups: set ppo.reward.whiten=false")


def rm_warnings_gate(warnings: list[str], keep_best: str, monitored: bool, accept: bool) -> str | None:
    """What PPO does with a reward model its stage warned about (`warnings`, from rm/diagnostics.json:
    `runs.rm_warnings`): None when there is nothing to say; else the line to print before PPO runs. With the kept
    policy chosen unguarded (keep_best none or monitor_reward) and `accept` false, a ConfigError instead: PPO does
    not start."""
    if not warnings:
        return None
    first = f"the reward model's stage warned: {warnings[0]}" + (f" (and {len(warnings) - 1} more)"
                                                                 if len(warnings) > 1 else "")
    if keep_best == "monitor_reward_guarded":
        if monitored:
            return f"{first}; PPO keeps only a monitor point within the guards, or SFT (ppo.guards.keep_best)"
        return (f"{first}; nothing guards the kept policy with the monitor off: set ppo.monitor.every > 0 and "
                f"ppo.eval_prompts_file")
    if accept:
        return (f"{first}; PPO keeps its policy unguarded (ppo.guards.keep_best={keep_best}, "
                f"ppo.guards.accept_rm_warnings=true)")
    raise ConfigError(f"rm/diagnostics.json: {first}. With ppo.guards.keep_best={keep_best} PPO would keep what it "
                      f"learns from the RM's blind spots unguarded: set "
                      f"ppo.guards.keep_best=monitor_reward_guarded (the default), fix the RM, or set "
                      f"ppo.guards.accept_rm_warnings=true")


def check_dpo(cfg: PipelineConfig) -> None:
    _check_model(cfg)
    d = cfg.dpo
    _check_data_files(d, "dpo")
    if d.beta <= 0:
        raise ConfigError(f"dpo.beta must be > 0, got {d.beta}")
    _choice(d.loss_type, DPO_LOSS_TYPES, "dpo.loss_type")
    if not 0 <= d.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}")
    if d.loss_type == "exo_pair" and d.label_smoothing == 0:
        raise ConfigError("dpo.loss_type=exo_pair needs dpo.label_smoothing > 0")


def checkpoint_name(entry: str) -> str:
    """The name an eval.checkpoints entry has in the report: name=path's name, a stage's name, a path's last part."""
    name, sep, where = entry.partition("=")
    if sep:
        return name
    where = entry
    where = where.removesuffix("?") if where.removesuffix("?") in EVAL_STAGES else where
    return where if where in EVAL_STAGES else Path(where).name


def check_eval(cfg: PipelineConfig) -> None:
    _check_model(cfg)
    e = cfg.eval
    if not e.checkpoints:
        raise ConfigError("eval.checkpoints is empty")
    names = [checkpoint_name(c) for c in e.checkpoints]
    if len(set(names)) != len(names):
        raise ConfigError(f"eval.checkpoints: names must differ, got {names} (use name=path)")
    if e.baseline not in names:
        raise ConfigError(f"eval.baseline {e.baseline!r} is not one of eval.checkpoints {names}")
    bad = [d for d in e.decoding if d not in DECODINGS]
    if bad or not e.decoding:
        raise ConfigError(f"eval.decoding must list some of {', '.join(DECODINGS)}, got {list(e.decoding)}")
    if e.samples_per_prompt < 1:
        raise ConfigError(f"eval.samples_per_prompt must be at least 1, got {e.samples_per_prompt}")
    _choice(e.engine, ENGINES, "eval.engine")


def check_export(cfg: PipelineConfig) -> None:
    _choice(cfg.export.stage, cfg.export.STAGES, "export.stage")
