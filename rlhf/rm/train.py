"""Stage 2, reward model: a LoRA adapter and a scalar head on the SFT model, trained with the pairwise
ranking loss -log sigmoid(r_chosen - r_rejected) by trl's RewardTrainer.

Output `<run_dir>/rm/`: the adapter (PEFT, task SEQ_CLS, the head in modules_to_save), the head alone in
`score_head.safetensors`, the tokenizer, `config.yaml`, `metrics.jsonl`, `diagnostics.json`, `tb/`,
`checkpoints/`, and `DONE` written last.
"""

from __future__ import annotations

import gc
import json
import random
import shutil
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from trl import RewardConfig, RewardTrainer

from rlhf import data as rdata
from rlhf.rm import diagnostics as rm_diagnostics
from rlhf.rm import probes as rm_probes
from rlhf.rm.selection import (best_checkpoint_args, cap_warning, describe_selection, plateau_kwargs,
                               selection_callbacks)
from rlhf.config import LoraSpec, PipelineConfig, RMStageConfig, TrainSpec
from rlhf.models import (enable_activation_checkpointing, load_sft_model, load_tokenizer, lora_config,
                         resolve_dtype, stack_under)
from rlhf.plugins import import_callable
from rlhf.rm.scoring import (HEAD_FILE, MEMBER_PREFIX, RewardEnsemble, RewardScorer, attach_reward, build_reward_model,
                         member_dir, member_index, pair_ids, save_head)
from rlhf.runs import (MetricsFile, finish_stage, is_done, require_done)
from rlhf.trainers import TrainerRun, start_stage, within_max_length, save_trained_adapter, trainer_kwargs


def load_rm_data(cfg: RMStageConfig, tokenizer, text_prompts: str = "raw",
                 stage: str = "rm") -> tuple[list[rdata.PreferencePair], list[rdata.PreferencePair]]:
    """Training and held-out pairs, validated before any model is loaded (the RM's, and DPO's). Without an eval
    file, whole prompts (all pairs of a group) are held out, so no prompt is on both sides. Plain-text prompts as
    model.text_prompts says (`rdata.for_model`), and a line saying so."""
    train = rdata.load_preferences(cfg.train_file, split=cfg.train_split, skip_invalid=cfg.skip_invalid)
    if cfg.eval_file:
        held_out = rdata.load_preferences(cfg.eval_file, split=cfg.eval_split, skip_invalid=cfg.skip_invalid)
    else:
        held_out, train = rdata.hold_out(train, cfg.eval_fraction, cfg.train.seed, [p.group for p in train])
    both = rdata.for_model(train + held_out, tokenizer, text_prompts, cfg.max_prompt_length, stage)
    return both[:len(train)], both[len(train):]


def tokenize_pairs(pairs: list[rdata.PreferencePair], tokenizer, max_length: int, use_margin: bool,
                   name: str) -> Dataset:
    """trl's pre-tokenized layout (chosen_ids, rejected_ids[, margin]) plus our `group` column.

    Pairs longer than max_length are dropped, as trl would, but counted out loud: truncating would cut
    off the EOS the reward is read at.
    """
    rows = []
    with_margin = use_margin and any(p.margin is not None for p in pairs)
    for p in pairs:
        chosen, rejected = pair_ids(tokenizer, p.prompt, p.chosen), pair_ids(tokenizer, p.prompt, p.rejected)
        row = {"chosen_ids": chosen, "rejected_ids": rejected, "group": p.group}
        if with_margin:
            row["margin"] = float(p.margin or 0.0)
        rows.append((max(len(chosen), len(rejected)), row))
    return within_max_length(rows, max_length, "rm", name)


class GroupBatchSampler:
    """Batches of whole groups: all pairs of one ranked prompt land in the same batch (InstructGPT).

    Groups are shuffled each epoch (seed + epoch), then packed in order into batches of at most
    `max_pairs` pairs; a group larger than that is a batch of its own.
    """

    def __init__(self, groups: list[int], max_pairs: int, seed: int):
        by_group: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            by_group.setdefault(g, []).append(i)
        self.groups, self.max_pairs, self.seed, self.epoch = list(by_group.values()), max_pairs, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        order = list(self.groups)
        random.Random(self.seed + self.epoch).shuffle(order)
        batches, current = [], []
        for group in order:
            if current and len(current) + len(group) > self.max_pairs:
                batches.append(current)
                current = []
            current = current + group
        return batches + ([current] if current else [])

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


class DistinctRows:
    """Calls `model` once per distinct (input_ids, attention_mask) row and copies the outputs back.

    A K-way ranking gives K(K-1)/2 pairs but only K distinct answers: InstructGPT runs each answer once
    per prompt. With whole groups in a batch this cuts the RM's forward and backward work by K-1 (3x
    at K = 4); the loss and its gradients are the same (the copies share one graph node).
    """

    def __init__(self, model):
        self.model = model

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        rows = torch.cat([input_ids, attention_mask], dim=1)
        distinct, inverse = torch.unique(rows, dim=0, return_inverse=True)
        if len(distinct) == len(rows):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        first = torch.full((len(distinct),), len(rows), dtype=torch.long, device=rows.device)
        first.scatter_reduce_(0, inverse, torch.arange(len(rows), device=rows.device), reduce="amin")
        outputs = self.model(input_ids=input_ids[first], attention_mask=attention_mask[first], **kwargs)
        outputs.logits = outputs.logits[inverse]
        return outputs


class GroupedRewardTrainer(RewardTrainer):
    """trl's RewardTrainer, with training batches made by GroupBatchSampler and each distinct answer of a
    batch run through the model once (DistinctRows)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(DistinctRows(model), inputs, return_outputs, num_items_in_batch)

    def get_train_dataloader(self) -> DataLoader:
        sampler = GroupBatchSampler(self.train_dataset["group"], self._train_batch_size, self.args.seed)
        dataset = self._remove_unused_columns(self.train_dataset, description="training")
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=self.args.dataloader_num_workers)
        return self.accelerator.prepare(loader)


def trainer_args(cfg: RMStageConfig, out: Path, bf16: bool, train: TrainSpec | None = None,
                 report_to: list[str] = ()) -> RewardConfig:
    """`train`: cfg.train with another seed (an ensemble member); None: cfg.train."""
    kwargs = trainer_kwargs(train or cfg.train, out, bf16, report_to)
    if cfg.early_stopping.enabled:
        kwargs |= best_checkpoint_args(cfg.early_stopping.metric, cfg.train.eval_steps, cfg.train.save_steps)
        if cfg.train.lr_scheduler == "reduce_lr_on_plateau":
            kwargs["lr_scheduler_kwargs"] = plateau_kwargs(cfg.early_stopping.metric)
    return RewardConfig(
        **kwargs,
        max_length=None,  # long pairs were dropped, and counted, by tokenize_pairs
        center_rewards_coefficient=cfg.center_rewards_coefficient or None,
    )


def run(cfg: PipelineConfig) -> Path:
    r = cfg.rm
    sft_dir = require_done(Path(cfg.run_dir) / "sft", "sft")
    procs, out = start_stage(cfg, "rm")
    main = procs.is_main_process

    # 1. tokenizer (the SFT stage's) and data, validated and tokenized before the model is loaded
    tokenizer = load_tokenizer(str(sft_dir))
    train, held_out = load_rm_data(r, tokenizer, cfg.model.text_prompts)
    damaged = rm_probes.training_pairs(train, r.probes.train_share, r.probes.seed, r.probes.no_warning)
    if damaged:  # what the probes test, the RM learns (from the training split only)
        print(f"[rm] {len(damaged)} probe pairs (intact answer preferred to its damaged copy) join the training pairs "
              f"(rm.probes.train_share={r.probes.train_share:g})")
        train = train + damaged
    train_ds = tokenize_pairs(train, tokenizer, r.max_length, r.use_margin, r.train_file)
    eval_ds = tokenize_pairs(held_out, tokenizer, r.max_length, r.use_margin, r.eval_file or "held-out pairs")
    tagger = import_callable(r.pair_tags) if r.pair_tags else None
    print(f"[rm] {len(train_ds)} training pairs ({len(set(train_ds['group']))} prompts), {len(eval_ds)} held-out pairs")

    # 2. each member of the ensemble (one by default): member 0 in rm/, member i in rm/member-i/
    if main:
        for stale in member_dirs_beyond(out, r.ensemble):  # from an earlier run with a larger rm.ensemble
            print(f"[rm] removing {stale}: rm.ensemble is {r.ensemble} now")
            shutil.rmtree(stale)
    procs.wait_for_everyone()
    step, selection = 0, {}
    for i in range(r.ensemble):
        member_out = member_dir(out, i)
        if i > 0 and is_done(member_out):
            continue  # finished before a kill or a preemption
        if r.ensemble > 1 and main:
            print(f"[rm] ensemble member {i + 1} of {r.ensemble} (seed {r.train.seed + i}) -> {member_out}")
        trained, chosen = train_member(cfg, sft_dir, tokenizer, train_ds, eval_ds, member_out, r.train.seed + i, procs)
        if main:
            print(f"[rm] {chosen['selection']}")
        if i == 0:  # member 0's steps number the rows of rm/metrics.jsonl
            step, selection = trained, chosen
        elif main:
            finish_stage(member_out, {"member": i, "seed": r.train.seed + i} | chosen)
        procs.wait_for_everyone()
    if not main:
        return out

    # 3. diagnostics on held-out pairs, scored the way PPO and eval will score (shared base + reward adapter(s))
    scorer = attach_reward(load_sft_model(cfg.model, sft_dir, tokenizer).to(procs.device), out, tokenizer)
    diag = diagnose(scorer, held_out, tagger) | selection
    if r.probes.enabled:  # damaged answers scored against intact ones, by the scorer PPO will use
        diag["probes"] = rm_probes.run_probes(scorer, *rm_probes.intact_answers(held_out, r.probes.samples,
                                                                                r.probes.seed), r.probes.seed)
    warned = {k: v for k, v in diag.get("probes", {}).items() if k not in r.probes.no_warning}
    diag["warnings"] = rm_diagnostics.weak_rm_warnings(diag["rm/accuracy"], warned, r.warn_accuracy,
                                                       r.probes.warn_win_rate) + cap_warning(selection, rm_cap(r))
    metrics = MetricsFile(out / "metrics.jsonl", resume_step=step)
    metrics.write(step, {k: v for k, v in diag.items() if k.startswith("rm/")})
    (out / "diagnostics.json").write_text(json.dumps(diag, indent=2) + "\n")
    print(format_diagnostics(diag))
    for warning in diag["warnings"]:  # before PPO spends hours exploiting it
        print(f"[rm] WARNING: {warning}", file=sys.stderr)
    finish_stage(out, {k: v for k, v in diag.items() if k.startswith("rm/") or k == "selection"})
    return out


def rm_cap(r: RMStageConfig) -> str:
    """The config key that caps the RM's training: rm.train.max_steps when set, else rm.train.epochs."""
    return "rm.train.max_steps" if r.train.max_steps > 0 else "rm.train.epochs"


def member_dirs_beyond(out: Path, n: int) -> list[Path]:
    """member-i directories with i >= n (an ensemble of n has members 1..n-1 beside rm/ itself)."""
    return [d for d in out.glob(f"{MEMBER_PREFIX}*") if member_index(d) is None or member_index(d) >= n]


def train_member(cfg: PipelineConfig, sft_dir: Path, tokenizer, train_ds: Dataset, eval_ds: Dataset, out: Path,
                 seed: int, procs) -> tuple[int, dict]:
    """Train one reward model (adapter + head) with `seed` into `out`, resuming from out/checkpoints; with
    rm.early_stopping, the best checkpoint on the held-out pairs is the one saved.
    Returns the number of optimiser steps taken and what was kept (describe_selection)."""
    r, main = cfg.rm, procs.is_main_process
    out.mkdir(parents=True, exist_ok=True)
    train_spec = replace(r.train, seed=seed)
    sft_model = load_sft_model(cfg.model, sft_dir, tokenizer)
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(sft_model)
    model = reward_classifier(sft_model, r.lora, seed)
    clf = model.base_model.model

    # train, resuming from the last complete checkpoint
    run = TrainerRun.prepare("rm", out, procs, cfg.report_to)
    trainer = build_trainer(cfg, model, tokenizer, train_ds, eval_ds, out, train_spec, run.callbacks)
    run.train(trainer)

    # save the adapter, the head and the tokenizer
    save_trained_adapter(trainer, out)
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    procs.wait_for_everyone()
    if main:
        if sharded:  # the gathered weights are in the saved adapter, not in this process's shard
            adapter = load_file(str(out / "adapter_model.safetensors"))
            save_file({"weight": adapter["base_model.model.score.weight"].float()}, str(out / HEAD_FILE))
        else:
            save_head(model.base_model.model, out)
        tokenizer.save_pretrained(out)
    state = trainer.state
    chosen = describe_selection(state.log_history, state.best_global_step if r.early_stopping.enabled else None,
                                trainer.args.num_train_epochs, state.global_step < state.max_steps,
                                r.early_stopping.patience, rm_cap(r))
    del trainer, model, clf, sft_model
    gc.collect()
    return state.global_step, chosen


def build_trainer(cfg: PipelineConfig, model, tokenizer, train_ds: Dataset, eval_ds: Dataset, out: Path,
                  train_spec: TrainSpec, callbacks: list = ()) -> RewardTrainer:
    """trl's RewardTrainer (whole ranked groups per batch with rm.group_pairs) on `model`, a `reward_classifier`,
    with early stopping's callbacks when it is on."""
    r = cfg.rm
    bf16 = resolve_dtype(cfg.model.dtype) == torch.bfloat16
    trainer_cls = GroupedRewardTrainer if r.group_pairs else RewardTrainer
    return trainer_cls(
        model=model, args=trainer_args(r, out, bf16, train_spec, cfg.report_to), processing_class=tokenizer,
        train_dataset=train_ds if r.group_pairs else train_ds.remove_columns("group"),
        eval_dataset=eval_ds.remove_columns("group"),
        callbacks=list(callbacks) + (selection_callbacks(r.early_stopping.patience) if r.early_stopping.enabled else []),
    )


def reward_classifier(sft_model, lora: LoraSpec, seed: int) -> PeftModel:
    """The model the RM stage trains: a classifier around the SFT model's backbone (base + SFT adapter merged,
    or stacked on a quantized base) with a fresh LoRA adapter and score head; a stacked SFT adapter stays on,
    frozen, beneath the new adapter."""
    clf = build_reward_model(sft_model, seed=seed)
    with warnings.catch_warnings():  # "modify a model with PEFT for a second time": the stacked SFT adapter, meant
        warnings.filterwarnings("ignore", message=".*PEFT for a second time")
        model = get_peft_model(clf, lora_config(lora, task_type="SEQ_CLS", modules_to_save=["score"]))
    stack_under(model, sft_model)
    return model


@torch.no_grad()
def diagnose(scorer: RewardScorer | RewardEnsemble, pairs: list[rdata.PreferencePair], tagger=None) -> dict:
    prompts = [p.prompt for p in pairs]
    length = lambda texts: torch.tensor([len(scorer.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts])  # noqa: E731
    tags = [list(tagger(p.prompt, p.rejected)) for p in pairs] if tagger else None
    if isinstance(scorer, RewardEnsemble):  # each member's accuracy beside the ensemble's
        chosen_m = scorer.member_scores(prompts, [p.chosen for p in pairs])
        rejected_m = scorer.member_scores(prompts, [p.rejected for p in pairs])
        chosen, rejected = chosen_m.mean(0), rejected_m.mean(0)
        members = {"member_accuracy": (chosen_m > rejected_m).float().mean(1).tolist()}
    else:
        chosen = scorer.score(prompts, [p.chosen for p in pairs])
        rejected = scorer.score(prompts, [p.rejected for p in pairs])
        members = {}
    return rm_diagnostics.summarize(chosen, rejected, length([p.chosen for p in pairs]),
                                    length([p.rejected for p in pairs]), tags) | members


def format_diagnostics(diag: dict) -> str:
    lines = [f"[rm] held-out pairs: {diag['rm/n_pairs']}",
             f"     accuracy {diag['rm/accuracy']:.3f}   mean margin {diag['rm/margin_mean']:.3f}   "
             f"reward mean {diag['rm/reward_mean']:.3f} std {diag['rm/reward_std']:.3f}",
             f"     calibration error (ECE) {diag['rm/ece']:.3f}   reward-length correlation {diag['rm/length_corr']:+.3f}"]
    if "selection" in diag:
        lines.append(f"     {diag['selection']}")
    if "member_accuracy" in diag:
        lines.append(f"     ensemble of {len(diag['member_accuracy'])}: the mean above; each member's accuracy "
                     + " ".join(f"{a:.3f}" for a in diag["member_accuracy"]))
    for tag, row in diag.get("accuracy_by_tag", {}).items():
        lines.append(f"     rejected answer has {tag:<12} accuracy {row['accuracy']:.3f}  (n={row['n']})")
    if diag.get("probes"):
        lines.append("     reward-hacking probes (the RM should prefer the intact answer):")
    for name, row in diag.get("probes", {}).items():
        lines.append(f"     damaged by {name:<12} wins {row['win_rate']:.3f}  mean margin {row['margin_mean']:+.3f}  "
                     f"(n={row['n']})")
    return "\n".join(lines)
