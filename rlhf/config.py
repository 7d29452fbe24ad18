"""One typed config for the whole pipeline: dataclass defaults -> YAML file -> command-line overrides.

Parsing and merging are OmegaConf's (structured configs): it checks types, rejects unknown keys and
reads `a.b=value` overrides. We only add two things on top:

* a stage may take overrides relative to its own section, so `make sft ARGS="lora.r=8 train.lr=1e-4"`
  means `sft.lora.r=8 sft.train.lr=1e-4` (keys whose first part is a top-level field, such as
  `model.dtype` or `run_dir`, stay top-level);
* errors name the file or the override that caused them.

The resolved config is saved as `config.yaml` beside every stage output (`save_config`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlhf.errors import ConfigError  # noqa: F401 (raised here, and imported from here by the stages)


@dataclass
class ModelConfig:
    name_or_path: str = "data/demo/base"
    """Hugging Face hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct) or a local model directory."""
    revision: str | None = None
    """A hub branch, tag or commit of name_or_path; None: the default branch."""
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16. auto: bfloat16 on a GPU that supports it, else float32."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the checkpoint (only for checkpoints you trust)."""
    attn_implementation: str | None = None
    """e.g. sdpa, flash_attention_2; None lets transformers choose."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30 % more time); in PPO each role's
    backward recomputes under its own adapter."""
    text_prompts: str = "raw"
    """What a plain-text prompt ({"prompt": "..."} rows) is to the model, in every stage alike: raw, the model's
    input as it is (trl's convention); chat, a user turn through the model's chat template (for an instruct
    model, as it was tuned to be prompted; judges and reward functions then get it as that one-message chat).
    Chat-format rows always go through the template. Each stage says which in one line."""
    quantization: str = "none"
    """none | 8bit | 4bit: load the frozen base quantized (bitsandbytes; 4bit is NF4 with double quantization),
    computing in `dtype`. The SFT adapter is then stacked under the RM, policy and value adapters instead of
    merged into the base (`rlhf.models.load_sft_model`); `make export` still writes a full-precision merge."""


QUANTIZATIONS = ("none", "8bit", "4bit")


def check_quantization(model: ModelConfig) -> None:
    """model.quantization names a known scheme, and its backend is installed (before any model is loaded)."""
    if model.quantization not in QUANTIZATIONS:
        raise ConfigError(f"model.quantization must be one of {', '.join(QUANTIZATIONS)}, not {model.quantization!r}")
    if model.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model.quantization={model.quantization} needs bitsandbytes, which is not installed "
                          f"(pip install 'rlhf[quant]')")


@dataclass
class LoraSpec:
    r: int = 16
    """LoRA rank: the adapter's width (its parameter count grows linearly with it)."""
    alpha: int = 32
    """LoRA scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter's input while training; 0: none."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt; ["all-linear"] adapts every linear layer but the output head."""


@dataclass
class TrainSpec:
    """Optimisation knobs shared by the Trainer-based stages (SFT, RM)."""

    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    epochs: float = 1.0
    """Passes over the training data (fractions allowed); for the RM with early stopping, the most."""
    max_steps: int = -1
    """> 0 overrides epochs."""
    batch_size: int = 8
    """Per device."""
    grad_accum: int = 1
    """Batches whose gradients are summed before one optimiser step."""
    warmup: float = 0.0
    """Linear warmup: a fraction of all steps if < 1, else a number of steps."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapter's weights."""
    lr_scheduler: str = "linear"
    """transformers' scheduler name: linear, cosine, constant, constant_with_warmup, ..."""
    max_grad_norm: float = 1.0
    """Clip the gradient's global norm to this before each step."""
    logging_steps: int = 10
    """Optimiser steps between training-loss rows in metrics.jsonl and the trackers."""
    eval_steps: int = 0
    """0: evaluate once per epoch."""
    save_steps: int = 0
    """0: checkpoint once per epoch."""
    save_total_limit: int = 2
    """Checkpoints kept in <stage>/checkpoints (the newest; with RM early stopping, also the best)."""
    seed: int = 0
    """Seed of the adapter's initialisation, the data order and dropout."""
    progress_bar: bool = True
    """A progress bar on a terminal (never in CI or SLURM logs)."""


@dataclass
class DataFiles:
    """Where a Trainer stage's examples come from (SFT demonstrations; RM and DPO preferences) and their limits."""

    train_file: str = ""
    """Local jsonl/json/parquet/csv file or hub dataset name."""
    train_split: str = "train"
    """Split to use when train_file is a hub dataset."""
    eval_file: str | None = None
    """Held-out examples. None: hold out eval_fraction of the training rows (RM, DPO: of the training prompts,
    all pairs of a prompt on one side)."""
    eval_split: str = "test"
    """Split to use when eval_file is a hub dataset."""
    eval_fraction: float = 0.05
    """Share held out when eval_file is None."""
    max_length: int = 512
    """Prompt + answer tokens. SFT truncates longer examples; RM and DPO drop longer pairs and report the count
    (truncation would cut off the end of turn the reward is read at)."""
    max_prompt_length: int = 256
    """Longer prompts are an input error, reported before training."""
    skip_invalid: bool = False
    """Drop invalid rows with a warning instead of stopping."""


@dataclass
class SFTStageConfig(DataFiles):
    train_file: str = "data/demo/sft_train.jsonl"
    """Prompt/completion rows or chat messages."""
    eval_file: str | None = "data/demo/sft_eval.jsonl"
    """Held-out demonstrations (the held-out loss). None: hold out eval_fraction of the training rows."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """The SFT adapter; the later stages merge it into the base when they load it (on a quantized base they
    stack their adapters on it instead)."""
    train: TrainSpec = field(default_factory=TrainSpec)
    """Optimisation of the SFT adapter (TrainSpec)."""


@dataclass
class EarlyStoppingSpec:
    """Keep the reward model's best checkpoint on the held-out pairs, and stop when it stops improving."""

    enabled: bool = True
    """Evaluate on the held-out pairs and checkpoint together, at each epoch or every min(train.eval_steps,
    train.save_steps) steps of those set; reload the best checkpoint at the end; train.epochs becomes the maximum."""
    patience: int = 3
    """Stop after this many evaluations without improvement; 0: train to the maximum, still keep the best."""
    metric: str = "accuracy"
    """accuracy (held-out pairwise accuracy, ties broken by the lower held-out loss) or loss."""


@dataclass
class RMProbeSpec:
    """Reward-hacking probes: held-out chosen answers damaged in ways that make an answer worse for any task
    (a repeated span, cut in the middle, empty, words shuffled, another prompt's answer), scored against the
    intact answer by the scorer PPO uses. An RM that prefers the damaged answer will teach PPO to damage."""

    enabled: bool = True
    """Run the probes after training (diagnostics.json, the printout and the report)."""
    samples: int = 200
    """Distinct held-out (prompt, chosen answer) pairs to damage; 0: all."""
    seed: int = 0
    """Seed of the choice of answers and of the damage done to them."""
    warn_win_rate: float = 0.25
    """Warn when the RM prefers a kind of damaged answer to the intact one more often than this."""
    no_warning: list[str] = field(default_factory=list)
    """Probes that are no damage for this task, reported but never warned about nor trained on: e.g. [shuffle]
    where the order of words does not matter (the demo's lists)."""
    train_share: float = 0.0
    """Share of the training split's distinct (prompt, chosen answer) whose damaged copies (each probe kind not in
    no_warning) join the training pairs, the intact answer preferred; 0: none."""


@dataclass
class RMStageConfig(DataFiles):
    train_file: str = "data/demo/rm_rankings_train.jsonl"
    """Preferences: pairwise prompt/chosen/rejected, Anthropic HH transcripts, or K-way rankings."""
    eval_file: str | None = "data/demo/rm_pairs_eval.jsonl"
    """Held-out pairs (accuracy, the kept checkpoint, the diagnostics). None: hold out eval_fraction of the
    training prompts (all pairs of a prompt on one side)."""
    use_margin: bool = True
    """Use a `margin` column when the data has one: loss -log sigmoid(r_chosen - r_rejected - margin)."""
    center_rewards_coefficient: float = 0.0
    """> 0 adds coef * mean((r_chosen + r_rejected)^2), keeping rewards centred on 0 (Eisenstein et al. 2023)."""
    group_pairs: bool = True
    """Keep all K(K-1)/2 pairs of a ranked prompt in one batch (InstructGPT); train.batch_size is then the
    most pairs per batch, and a batch holds whole prompts."""
    pair_tags: str | None = None
    """Optional "module:function" (prompt, response) -> list of tags (e.g. the flaws of an answer); the
    diagnostics report accuracy per tag of the rejected answer."""
    ensemble: int = 1
    """Reward models to train (seeds train.seed, train.seed + 1, ...), each a LoRA adapter and head on the
    shared base; PPO and eval score with their mean. > 1 damps the quirks a single RM picks up by chance,
    which PPO would otherwise exploit (member 0 in rm/, member i in rm/member-i/)."""
    warn_accuracy: float = 0.65
    """Warn (stderr, diagnostics.json) when the held-out accuracy is below this: PPO will exploit a weak RM."""
    probes: RMProbeSpec = field(default_factory=RMProbeSpec)
    """Reward-hacking probes on held-out answers (RMProbeSpec)."""
    early_stopping: EarlyStoppingSpec = field(default_factory=EarlyStoppingSpec)
    """Keep the best checkpoint on the held-out pairs and stop when it stops improving (EarlyStoppingSpec)."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """The reward adapter on the SFT model (the score head is trained beside it)."""
    train: TrainSpec = field(default_factory=lambda: TrainSpec(lr=1e-4, epochs=20, lr_scheduler="reduce_lr_on_plateau"))
    """train.epochs is a cap: early stopping ends the run once it stops improving and keeps the best held-out
    checkpoint; reduce_lr_on_plateau halves the learning rate at each evaluation without improvement (a schedule
    that follows the run, not the cap; it needs early_stopping). A run the cap stops while still improving is
    warned about."""


@dataclass
class RewardTerm:
    """One term of the reward PPO maximises (ppo.rewards; rlhf/reward_sources.py)."""

    source: str = "rm"
    """rm (this run's reward model; with rm.ensemble > 1, ppo.reward.ensemble_objective of its members) or
    "package.module:function", a function (prompt, response) -> float: a rule-based or verifiable reward (e.g.
    rlhf.demo.task:gold_score, an exact-match checker). It gets the prompt as the data gives it (chat messages
    or text) and the answer as text; one that raises or returns nan/inf stops the run, naming prompt and answer."""
    weight: float = 1.0
    """Multiplies this term's value before the terms are summed."""


@dataclass
class PPOSampling:
    """How rollouts are sampled (rlhf/ppo/engine.py, rlhf/generation.SamplingSpec)."""

    engine: str = "hf"
    """hf: transformers' generate on the trainer's model; vllm: a vLLM server fed the policy adapter after each
    update, checked against the trainer (the `vllm:` section; docs/engines.md)."""
    rollout_batch_size: int = 128
    """Answers per PPO step in all: under `accelerate launch` each of N processes samples rollout_batch_size / N."""
    group_size: int = 1
    """k, answers per prompt each step (the prompt repeated k times); rollout_batch_size counts answers, so it must
    be a multiple of k (per process). grpo and rloo need k >= 2."""
    forward_batch_size: int = 64
    """Rows per no-grad forward pass (generation, reference, reward, values)."""
    max_new_tokens: int = 16
    """Most tokens of an answer; one without its end of turn by then has not ended (ppo/eos_rate)."""
    temperature: float = 0.7
    """Sampling temperature; every log-prob (old, new, reference) is taken at it."""
    top_k: int = 0
    """Must stay 0 (and top_p 1.0): PPO's log-probs describe the untruncated distribution at temperature."""
    top_p: float = 1.0
    """Must stay 1.0 (see top_k)."""


@dataclass
class PPOReward:
    """What PPO maximises and how scores become rewards (rlhf/reward_sources.py, rlhf/ppo/core.py)."""

    terms: list[RewardTerm] = field(default_factory=lambda: [RewardTerm()])
    """The sum of weight x source over these terms, before norm; default the reward model alone. E.g.
    [{source: rm, weight: 1}, {source: "rlhf.demo.task:gold_score", weight: 5}]."""
    norm: str = "shift_scale"
    """From the SFT policy's answers on norm_samples prompts, before the first update: shift_scale (mean 0, std 1),
    shift (mean 0, the RM's scale: InstructGPT, N+) or none (docs/algorithms.md)."""
    norm_samples: int = 256
    """SFT answers scored to measure norm's shift and scale."""
    missing_eos_penalty: float | None = None
    """The (normalised) score of answers that never end within max_new_tokens; None: off (N+ uses -1;
    docs/algorithms.md says when it helps)."""
    whiten: bool = False
    """Scale the per-token rewards by their std (N+); gae and reinforce_pp only."""
    ensemble_objective: str = "mean"
    """With rm.ensemble > 1: mean, min or mean_minus_std of the members (Coste et al. 2024); eval reports the mean."""
    ensemble_std_coef: float = 1.0
    """lambda of mean_minus_std, in the RM's score units."""


@dataclass
class PPOKL:
    """The KL penalty to the SFT policy, the reference (rlhf/ppo/kl.py)."""

    coef: float = 0.05
    """beta: per token in the reward (gae, reinforce_pp), summed per answer (rloo), or a loss term (grpo); with
    adaptive, the starting value."""
    estimator: str = "k1"
    """k1 (log-ratio, unbiased) or k3 ((r - 1) - log r, never negative); also abs, mse."""
    adaptive: bool = False
    """Adapt coef towards target (Ziegler et al. 2019)."""
    target: float = 6.0
    """The adaptive controller's target: KL summed over an answer."""
    horizon: int | None = None
    """The adaptive controller's horizon in rollouts; None: a tenth of the run's rollouts."""


@dataclass
class PPOEstimator:
    """How rewards become advantages (rlhf/ppo/rollout.py, rlhf/ppo/estimators.py; docs/algorithms.md)."""

    name: str = "gae"
    """gae (PPO: a value adapter, GAE), or critic-free: grpo, rloo, reinforce_pp."""
    gamma: float = 1.0
    """Discount per token."""
    lam: float = 0.95
    """GAE's lambda (gae only)."""
    whiten_advantages: bool = True
    """Whiten GAE's advantages over the batch (gae only)."""
    std_norm: bool = True
    """grpo: divide by the group's std (GRPO); false: only subtract the group mean (Dr. GRPO)."""
    grpo_kl: str = "loss"
    """grpo: the KL as a loss term beside the clipped objective (GRPO's paper), or in the answer's reward."""
    grpo_kl_estimator: str = "k3+"
    """grpo_kl loss: k3+ (k3's value, KL(policy || ref)'s gradient), k2, or k3 (GRPO's paper)."""


@dataclass
class PPOUpdate:
    """The optimiser and the clipped losses (rlhf/ppo/update.py)."""

    epochs: int = 4
    """Passes over each step's rollouts."""
    num_minibatches: int = 4
    """Minibatches per pass: one optimiser step each."""
    grad_accum: int = 1
    """Micro-batches per minibatch (still one optimiser step per minibatch)."""
    loss_agg: str = "token_mean"
    """Policy loss over an optimiser step: token_mean, seq_mean_token_mean, seq_mean_token_sum or
    seq_mean_token_sum_norm (Dr. GRPO's)."""
    lr: float = 3e-4
    """AdamW's learning rate of the policy (and value) adapters."""
    lr_scheduler: str = "linear"
    """transformers' scheduler over all optimiser steps."""
    warmup: float = 0.0
    """Linear warmup: a fraction of all optimiser steps if < 1, else a number of steps."""
    weight_decay: float = 0.0
    """AdamW's weight decay on the adapters."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm (policy and value together)."""
    clip_range: float = 0.2
    """epsilon of the clipped policy objective."""
    clip_range_value: float = 0.2
    """The value loss is clipped to within this of the rollout's values (gae)."""
    vf_coef: float = 0.1
    """Weight of the value loss (gae)."""
    value_from_reward: bool = True
    """Start the value adapter and head from the reward model's (InstructGPT, N+; gae)."""
    tis_cap: float | None = 2.0
    """sampling.engine vllm: each token's policy loss weighted by min(trainer / engine probability, tis_cap);
    None: off."""


@dataclass
class PPOPtx:
    """PPO-ptx (InstructGPT): the SFT loss on demonstrations added to every optimiser step (rlhf/ppo/ptx.py)."""

    coef: float = 0.0
    """Weight of the SFT loss; 0: off."""
    file: str | None = None
    """Demonstrations (any SFT format); needed when coef > 0."""
    batch_size: int = 8
    """Demonstrations per optimiser step (per process)."""


@dataclass
class PPOGuards:
    """Over-optimisation guards and the kept policy (rlhf/ppo/guards.py; docs/guards.md)."""

    kl_budget: float | None = 6.0
    """Stop when the rollout KL (nats per answer) exceeds this for `patience` consecutive steps; None or 0: none."""
    degeneration_margin: float | None = 0.1
    """Stop when the greedy monitor answers' repeat exceeds SFT's by more than this at `patience` consecutive
    monitor points; None: no such stop."""
    patience: int = 3
    """Consecutive steps (KL budget) or monitor points (degeneration) before a guard stops the run."""
    keep_best: str = "monitor_reward_guarded"
    """Which policy policy/ holds: monitor_reward_guarded (the best monitor point within the guards, SFT at step 0
    included), monitor_reward (the best of all points) or none (the last)."""
    accept_rm_warnings: bool = False
    """Run PPO on a reward model whose stage warned with keep_best none or monitor_reward; false: stop before PPO."""


@dataclass
class PPOMonitor:
    """The held-out monitor (rlhf/ppo/monitor.py): the guards' and keep_best's eyes."""

    every: int = 10
    """Every N steps (and at step 0, SFT) the policy answers the first `prompts` held-out prompts, sampled and
    greedy with a fixed seed; 0: off (then no degeneration stop and no keep_best)."""
    prompts: int = 32
    """How many held-out prompts (the first of eval_prompts_file)."""


@dataclass
class PPOCheckpoint:
    """Checkpoints that a killed or preempted run resumes from (rlhf/ppo/state.py)."""

    every: int = 10
    """Steps between checkpoints (and at the last step, and at a stop)."""


@dataclass
class PPOStageConfig:
    prompts_file: str = "data/demo/prompts_train.jsonl"
    """Prompts for rollouts: prompt-only rows, or the prompts of any other format."""
    prompts_split: str = "train"
    """Split to use when prompts_file is a hub dataset."""
    eval_prompts_file: str | None = "data/demo/prompts_eval.jsonl"
    """Held-out prompts (the monitor's, and the end-of-stage comparison with SFT). None: none."""
    eval_prompts_split: str = "test"
    """Split to use when eval_prompts_file is a hub dataset."""
    eval_samples: int = 200
    """Held-out prompts in the end-of-stage comparison with SFT; 0: none (`make eval` judges instead)."""
    max_prompt_length: int = 256
    """Longer prompts are an input error, reported before the model loads."""
    skip_invalid: bool = False
    """Drop invalid prompt rows with a warning instead of stopping."""
    steps: int = 100
    """PPO iterations: each samples sampling.rollout_batch_size answers, then runs update.epochs over them."""
    seed: int = 0
    """Seed of the prompt order, the sampling and the adapters' initialisation."""
    judge: str | None = None
    """Optional "module:function" (prompt, response) -> float gold score, reported at the end (never trained on)."""
    progress_bar: bool = True
    """A progress bar on a terminal."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """The policy and value adapters (the reward adapter keeps the RM stage's)."""
    sampling: PPOSampling = field(default_factory=PPOSampling)
    """How rollouts are sampled: the engine, the batch, the group size, the budget, the temperature."""
    reward: PPOReward = field(default_factory=PPOReward)
    """What PPO maximises (the RM, reward functions, an ensemble's objective) and the reward normalisation."""
    kl: PPOKL = field(default_factory=PPOKL)
    """The KL penalty to SFT: beta, the estimator, the adaptive controller."""
    estimator: PPOEstimator = field(default_factory=PPOEstimator)
    """The advantage estimator (gae, grpo, rloo, reinforce_pp) and its settings."""
    update: PPOUpdate = field(default_factory=PPOUpdate)
    """The optimiser, the epochs and minibatches, the clipped losses."""
    ptx: PPOPtx = field(default_factory=PPOPtx)
    """PPO-ptx: the SFT loss on demonstrations mixed into the update."""
    guards: PPOGuards = field(default_factory=PPOGuards)
    """The KL budget, the degeneration stop, the kept policy."""
    monitor: PPOMonitor = field(default_factory=PPOMonitor)
    """The held-out monitor the guards read."""
    checkpoint: PPOCheckpoint = field(default_factory=PPOCheckpoint)
    """How often a checkpoint is written."""


# The PPO keys of before the sections -> their place now (an old key is one error line naming it: `moved_ppo_key`)
PPO_MOVED = {
    "rollout_engine": "sampling.engine", "rollout_batch_size": "sampling.rollout_batch_size",
    "group_size": "sampling.group_size", "forward_batch_size": "sampling.forward_batch_size",
    "max_new_tokens": "sampling.max_new_tokens", "temperature": "sampling.temperature", "top_k": "sampling.top_k",
    "top_p": "sampling.top_p",
    "rewards": "reward.terms", "reward_norm": "reward.norm", "reward_norm_samples": "reward.norm_samples",
    "missing_eos_penalty": "reward.missing_eos_penalty", "whiten_rewards": "reward.whiten",
    "ensemble_objective": "reward.ensemble_objective", "ensemble_std_coef": "reward.ensemble_std_coef",
    "kl_coef": "kl.coef", "kl_estimator": "kl.estimator", "adaptive_kl": "kl.adaptive", "target_kl": "kl.target",
    "kl_horizon": "kl.horizon",
    "gamma": "estimator.gamma", "lam": "estimator.lam", "whiten_advantages": "estimator.whiten_advantages",
    "grpo_std_norm": "estimator.std_norm", "grpo_kl": "estimator.grpo_kl",
    "grpo_kl_estimator": "estimator.grpo_kl_estimator",
    "ppo_epochs": "update.epochs", "num_minibatches": "update.num_minibatches", "grad_accum": "update.grad_accum",
    "loss_agg": "update.loss_agg", "lr": "update.lr", "lr_scheduler": "update.lr_scheduler", "warmup": "update.warmup",
    "weight_decay": "update.weight_decay", "max_grad_norm": "update.max_grad_norm", "clip_range": "update.clip_range",
    "clip_range_value": "update.clip_range_value", "vf_coef": "update.vf_coef",
    "value_from_reward": "update.value_from_reward", "tis_cap": "update.tis_cap",
    "ptx_coef": "ptx.coef", "ptx_file": "ptx.file", "ptx_batch_size": "ptx.batch_size",
    "kl_budget": "guards.kl_budget", "degeneration_margin": "guards.degeneration_margin",
    "guard_patience": "guards.patience", "keep_best": "guards.keep_best",
    "accept_rm_warnings": "guards.accept_rm_warnings",
    "monitor_every": "monitor.every", "monitor_prompts": "monitor.prompts", "save_steps": "checkpoint.every",
}


@dataclass
class DPOStageConfig(DataFiles):
    """`make dpo`: Direct Preference Optimization (Rafailov et al. 2023) with trl's DPOTrainer, an alternative
    to RM + PPO. A LoRA adapter on the SFT model; the reference is the same model with the adapter off."""

    train_file: str = "${rm.train_file}"
    """Preferences, in any format the RM reads (pairs, HH transcripts, K-way rankings expanded to all pairs).
    Default: the reward model's file."""
    train_split: str = "${rm.train_split}"
    """Split to use when train_file is a hub dataset (default: the RM's)."""
    eval_file: str | None = "${rm.eval_file}"
    """Held-out pairs (default: the RM's). None: hold out eval_fraction of the training prompts."""
    eval_split: str = "${rm.eval_split}"
    """Split to use when eval_file is a hub dataset (default: the RM's)."""
    max_length: int = "${rm.max_length}"  # type: ignore[assignment]  # an interpolation, resolved to an int
    """Prompt + answer tokens; longer pairs are dropped and counted (never truncated: the end of turn would go)."""
    max_prompt_length: int = "${rm.max_prompt_length}"  # type: ignore[assignment]
    """Longer prompts are an input error (default: the RM's limit)."""
    beta: float = 0.1
    """Strength of the implicit KL penalty to the reference: small beta lets the policy move further from SFT."""
    loss_type: str = "sigmoid"
    """trl's DPO loss: sigmoid (DPO), ipo, hinge, robust, ... (trl.DPOConfig.loss_type)."""
    label_smoothing: float = 0.0
    """Assumed share of flipped preference labels (conservative DPO, loss_type robust or sigmoid)."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """The DPO adapter on the SFT model; switched off, the model is the reference."""
    train: TrainSpec = field(default_factory=lambda: TrainSpec(lr=5e-5, epochs=1))
    """Optimisation of the DPO adapter (TrainSpec)."""


@dataclass
class ExportConfig:
    STAGES = ("sft", "ppo")  # the stages whose adapter can be exported (a class constant, not a config field)

    stage: str = "ppo"
    """Which adapter to merge into the base: ppo (the PPO policy, over SFT) or sft."""
    out_dir: str | None = None
    """None: <run_dir>/export-<stage>."""
    dtype: str | None = None
    """Save in this dtype (float32, bfloat16, float16); None: model.dtype."""
    license: str | None = None
    """The model card's `license` (a hub licence id, e.g. apache-2.0, llama3.1); None: "other". It must respect
    the base model's licence."""
    push_to_hub: str | None = None
    """A hub repo id (user/name): upload the exported directory there (needs a token). None: nothing is uploaded."""
    private: bool = True
    """Create the hub repo private (when push_to_hub creates it)."""


@dataclass
class EvalConfig:
    checkpoints: list[str] = field(default_factory=lambda: ["base", "sft", "ppo", "dpo?"])
    """What to judge: base, sft, ppo, dpo (this run's stages; "dpo?": the DPO policy if `make dpo` has finished,
    else nothing), or a directory: a full model (e.g. from make export) or a PEFT adapter over the SFT model.
    "name=path" gives a directory a name in the report."""
    baseline: str = "sft"
    """The checkpoint every other one is compared with (win rates)."""
    prompts_file: str = "data/demo/prompts_eval.jsonl"
    """Held-out prompts: prompt-only rows, or the prompts of any other format."""
    prompts_split: str = "test"
    """Split to use when prompts_file is a hub dataset."""
    samples: int = 200
    """Evaluate on the first `samples` prompts; 0: all."""
    max_prompt_length: int = 256
    """Longer prompts are an input error, reported before a model loads."""
    skip_invalid: bool = False
    """Drop invalid prompt rows with a warning instead of stopping."""
    decoding: list[str] = field(default_factory=lambda: ["sample", "greedy"])
    """sample (at temperature / top_k / top_p, fixed seed) and/or greedy (one answer per prompt)."""
    samples_per_prompt: int = 1
    """Sampled answers per prompt: answer j of a checkpoint is compared with answer j of the baseline and a
    prompt's win is the mean of its comparisons; more answers narrow the interval (sampling noise)."""
    max_new_tokens: int = 16
    """Most tokens of an answer."""
    temperature: float = 1.0
    """Sampling temperature (sampled answers; their KL to SFT is taken at it): PPO's, to judge what PPO trained."""
    top_k: int = 0
    """Top-k of sampled answers; 0: off."""
    top_p: float = 1.0
    """Nucleus sampling of sampled answers; 1.0: off."""
    batch_size: int = 64
    """Rows per generation and scoring batch."""
    engine: str = "hf"
    """Who generates the answers: hf (transformers' generate) or vllm (the `vllm:` section's server; a full model
    directory still answers through transformers). Scores, log-probs and the KL are the same code either way."""
    seed: int = 1234
    """Every checkpoint samples with this seed: two identical models give identical answers."""
    judge: str | None = None
    """Optional "module:function" (prompt, response) -> float: the gold judge of the task."""
    reward_model: bool = True
    """Score answers with this run's reward model (needs a finished RM stage)."""
    examples: int = 8
    """Prompts shown with every checkpoint's answer side by side in the report."""
    plots: bool = True
    """The report's figures (plots/*.png, drawn with matplotlib in a few seconds); false: its text alone."""
    progress_bar: bool = True
    """A progress bar per checkpoint on a terminal."""


SLURM_STAGES = ("sft", "rm", "ppo", "eval")


@dataclass
class SlurmConfig:
    """`make <stage> LAUNCHER=slurm`: one sbatch job per stage, chained with afterok (rlhf/slurm.py)."""
    partition: str | None = None
    """--partition; None: the cluster's default."""
    account: str | None = None
    """--account; None: the user's default."""
    qos: str | None = None
    """--qos; None: the default."""
    time: str = "1-00:00:00"
    """--time of each job (per stage: slurm.stages.<stage>.time)."""
    nodes: int = 1
    """--nodes; with more than one, the processes of every node join one `accelerate launch` run."""
    gpus_per_node: int = 0
    """0: a CPU job. With N > 0 the job asks for N GPUs per node and runs N processes per node."""
    processes_per_node: int | None = None
    """Default: gpus_per_node, or 1 without GPUs. More than one process in all: `accelerate launch`."""
    cpus_per_task: int | None = None
    """--cpus-per-task; None: the cluster's default."""
    mem: str | None = None
    """--mem of each node, e.g. 64G."""
    job_name: str = "rlhf"
    """Jobs are named <job_name>-<stage>."""
    accelerate_config: str | None = None
    """accelerate config for multi-process jobs (configs/accelerate/*.yaml); the machine count, rank and
    main address come from SLURM."""
    main_port: int = 29500
    """The rendezvous port of multi-process runs on the first node."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run first in every job (module load ..., source .venv/bin/activate, export ...)."""
    extra: list[str] = field(default_factory=list)
    """More #SBATCH options, as on the sbatch command line: ["--constraint=a100", "--exclusive"]."""
    python: str | None = None
    """The interpreter on the compute nodes. Default: the one that submits (the repo's .venv)."""
    requeue: bool = True
    """Requeue the job after the time-limit warning (the stage checkpoints first, the new job resumes)."""
    signal_grace_s: int = 300
    """SIGUSR1 this many seconds before the time limit: the stage checkpoints and stops. 0: none."""
    log_dir: str | None = None
    """Job scripts, logs and jobs.json. Default: <run_dir>/slurm."""
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-stage changes to the fields above, e.g. {ppo: {time: "12:00:00"}, eval: {gpus_per_node: 1}}."""


@dataclass
class VLLMConfig:
    """The vLLM server behind ppo.sampling.engine=vllm and eval.engine=vllm (rlhf/vllm_engine.py; docs/engines.md)."""

    url: str | None = None
    """A running server to use (`vllm serve <model.name_or_path> --enable-lora ...`, docs/engines.md); None: the
    stage starts one with `python` and stops it at the end."""
    python: str = ".venv-vllm/bin/python"
    """The interpreter of the vLLM environment (`make setup-vllm`), which pins its own transformers."""
    port: int = 0
    """Port of a server started here; 0: a free one."""
    dtype: str = "auto"
    """The engine's compute dtype; auto: model.dtype."""
    max_model_len: int | None = None
    """Longest prompt + answer the engine holds; None: the model's own."""
    kv_cache_gb: int = 1
    """KV cache of a server started here on a CPU, in GiB (VLLM_CPU_KVCACHE_SPACE)."""
    gpu_memory_utilization: float = 0.3
    """Share of the GPU a server started here may take (the trainer shares the GPU)."""
    start_timeout: float = 600.0
    """Seconds a started server has to answer its health check."""
    extra_args: list[str] = field(default_factory=list)
    """More `vllm serve` arguments for a server started here (e.g. [--tensor-parallel-size, "2"])."""
    probe_answers: int = 4
    """Answers whose log-probs the engine and the trainer must agree on after each adapter load."""
    probe_tolerance: float | None = None
    """Largest mean difference per token of those log-probs (nats) before the run stops; None: 1e-3 in float32,
    0.15 in 16 bits (docs/engines.md)."""


@dataclass
class PipelineConfig:
    run_dir: str = "runs/demo"
    """Every stage writes to <run_dir>/<stage>/."""
    force: bool = False
    """Train a stage again although it has finished (`--force`): into <run_dir>/<stage>.rerun/, which replaces
    <stage>/ only once it has finished. Without it a finished stage refuses to start."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers of every stage: tensorboard (into <stage>/tb/), wandb, or any other the HF Trainer
    supports (rlhf/tracking.py); e.g. [tensorboard, wandb]. metrics.jsonl is always written."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model every stage shares (ModelConfig)."""
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    """`make sft` (SFTStageConfig)."""
    rm: RMStageConfig = field(default_factory=RMStageConfig)
    """`make rm` (RMStageConfig)."""
    ppo: PPOStageConfig = field(default_factory=PPOStageConfig)
    """`make ppo` (PPOStageConfig)."""
    dpo: DPOStageConfig = field(default_factory=DPOStageConfig)
    """`make dpo` (DPOStageConfig)."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """`make export` (ExportConfig)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """`make eval` (EvalConfig)."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """`LAUNCHER=slurm` (SlurmConfig)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """The vLLM server of ppo.sampling.engine=vllm and eval.engine=vllm (VLLMConfig)."""


def _top_level_keys() -> set[str]:
    return {f.name for f in dataclasses.fields(PipelineConfig)}


def qualify_overrides(overrides: list[str], stage: str | None) -> list[str]:
    """Prefix stage-relative `key=value` overrides with the stage's section name."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key = item.split("=", 1)[0].strip()
        if stage and key.split(".")[0] not in _top_level_keys():
            item = f"{stage}.{item}"
        out.append(item)
    return out


def moved_ppo_key(key: str, value: Any = None) -> str | None:
    """The error line for a PPO key of before the sections (`ppo.kl_coef`, or `ppo.estimator` given a name), else
    None. `key`: the key under ppo (kl_coef, estimator, kl.coef...)."""
    first = key.split(".")[0]
    if first in PPO_MOVED:
        rest = key[len(first):]
        return f"ppo.{key} is now ppo.{PPO_MOVED[first]}{rest} (the PPO settings are grouped in sections)"
    if key == "estimator" and not isinstance(value, (dict, DictConfig)):
        return "ppo.estimator is now ppo.estimator.name (the PPO settings are grouped in sections)"
    return None


def load_config(path: str | Path | None = None, overrides: list[str] = (), stage: str | None = None) -> PipelineConfig:
    """Defaults, then the YAML file at `path`, then `overrides` (`a.b=value`); returns typed dataclasses."""
    cfg = OmegaConf.structured(PipelineConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{path}: {_explain(e)}") from None
        ppo = loaded.get("ppo") if isinstance(loaded, DictConfig) else None
        for key in (ppo.keys() if isinstance(ppo, DictConfig) else []):
            if moved := moved_ppo_key(str(key), ppo[key]):
                raise ConfigError(f"{path}: {moved}")
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{path}: {_explain(e)}") from None
    qualified = qualify_overrides(list(overrides), stage)
    for item in qualified:
        key = item.split("=", 1)[0].strip()
        if key.startswith("ppo.") and (moved := moved_ppo_key(key[4:])):
            raise ConfigError(f"command-line override {item!r}: {moved}")
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(qualified))
    except OmegaConfBaseException as e:
        raise ConfigError(f"command-line override: {_explain(e)}") from None
    cfg = OmegaConf.to_object(cfg)
    from rlhf.tracking import check_report_to  # here: it imports transformers, which config files do not need

    check_report_to(cfg.report_to)
    check_quantization(cfg.model)
    return cfg


def _explain(e: OmegaConfBaseException) -> str:
    # OmegaConf's first line says what is wrong; the rest is an internal trace of object types.
    msg = str(e).splitlines()[0]
    key = getattr(e, "full_key", None)
    return f"key '{key}': {msg}" if key else msg


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: PipelineConfig, out_dir: str | Path) -> Path:
    path = Path(out_dir) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path
