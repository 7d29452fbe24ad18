"""`make dpo`: Direct Preference Optimization (Rafailov et al. 2023) with trl's DPOTrainer, on the RM's preferences.

The offline alternative to RM + PPO: a LoRA adapter on the SFT model (base + SFT adapter merged, as RM and PPO
start), trained on the same preference files as the reward model (pairs, HH transcripts, K-way rankings expanded
to all pairs) with the loss -log sigmoid(beta * (log-ratio of chosen - log-ratio of rejected)), each log-ratio
taken against the reference.

The reference is the SFT model itself: the same weights with the adapter switched off. We hand trl the merged
SFT model and a `peft_config`, so trl adds one fresh adapter and, with `ref_model=None`, computes the reference
log-probs under `disable_adapter()` (had we handed it a PeftModel, trl would copy its adapter into a second,
frozen "ref" adapter instead). No second model and no second adapter are in memory.

Rows are tokenized here, not by trl, exactly as the RM's are: the prompt through `rlhf.chat.encode_prompt`, each
answer through `rlhf.chat.answer_ids` (the chat template's rendering of the answer, through its end of turn),
so `prompt_ids + chosen_ids` is the RM's `pair_ids` and what a PPO rollout produces.

Output `<run_dir>/dpo/`: the adapter (PEFT, over the SFT model: `make eval` judges it as checkpoint `dpo`), the
tokenizer, `config.yaml`, `metrics.jsonl`, `tb/`, `checkpoints/`, and `DONE`, written last.
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from rlhf import data as rdata
from rlhf.chat import answer_ids, encode_prompt
from rlhf.config import DPOStageConfig, PipelineConfig
from rlhf.models import enable_activation_checkpointing, load_sft_model, load_tokenizer, lora_config, resolve_dtype
from rlhf.rm.train import load_rm_data
from rlhf.runs import (finish_stage, read_metrics,
                       require_done)
from rlhf.trainers import TrainerRun, start_stage, within_max_length, trainer_kwargs

def tokenize_preferences(pairs: list[rdata.PreferencePair], tokenizer, max_length: int, name: str) -> Dataset:
    """trl's tokenized preference layout (prompt_ids, chosen_ids, rejected_ids), built as the RM builds its rows
    (`rlhf.rm.scoring.pair_ids` = encode_prompt + answer_ids). Pairs longer than max_length are dropped and counted:
    truncating would cut off the end of turn."""
    rows = []
    for p in pairs:
        prompt = encode_prompt(tokenizer, p.prompt)
        chosen = answer_ids(tokenizer, p.prompt, p.chosen, prompt)
        rejected = answer_ids(tokenizer, p.prompt, p.rejected, prompt)
        rows.append((len(prompt) + max(len(chosen), len(rejected)),
                     {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}))
    return within_max_length(rows, max_length, "dpo", name)


class TokenizedDPOTrainer(DPOTrainer):
    """trl's DPOTrainer on rows that `tokenize_preferences` has already tokenized (trl would render the chat
    template itself, and read the answer's end differently from the RM and PPO)."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        missing = {"prompt_ids", "chosen_ids", "rejected_ids"} - set(dataset.column_names)
        if missing:
            raise ValueError(f"{dataset_name} dataset lacks {sorted(missing)}: build it with tokenize_preferences")
        return dataset


def trainer_args(d: DPOStageConfig, out: Path, bf16: bool, report_to: list[str] = ()) -> DPOConfig:
    return DPOConfig(
        **trainer_kwargs(d.train, out, bf16, report_to),
        eval_on_start=True,  # the untrained adapter: loss log 2, the baseline DPO must beat
        beta=d.beta, loss_type=[d.loss_type], label_smoothing=d.label_smoothing,
        max_length=None,  # long pairs were dropped, and counted, by tokenize_preferences
        precompute_ref_log_probs=False,  # the reference is one forward with the adapter off, per batch
    )


def build_trainer(cfg: PipelineConfig, model, tokenizer, train_ds: Dataset, eval_ds: Dataset, out: Path,
                  callbacks: list = ()) -> DPOTrainer:
    """The DPO trainer on `model` (the SFT model, no adapter): trl attaches a fresh LoRA adapter (dpo.lora) and,
    without a ref_model, computes the reference log-probs with that adapter disabled."""
    bf16 = resolve_dtype(cfg.model.dtype) == torch.bfloat16
    trainer = TokenizedDPOTrainer(
        model=model, ref_model=None, args=trainer_args(cfg.dpo, out, bf16, cfg.report_to), processing_class=tokenizer,
        train_dataset=train_ds, eval_dataset=eval_ds, peft_config=lora_config(cfg.dpo.lora), callbacks=list(callbacks),
    )
    assert trainer.ref_model is None and "ref" not in trainer.model.peft_config  # reference = adapter off
    return trainer


def run(cfg: PipelineConfig) -> Path:
    d = cfg.dpo
    sft_dir = require_done(Path(cfg.run_dir) / "sft", "sft")
    procs, out = start_stage(cfg, "dpo")

    # 1. tokenizer (the SFT stage's) and the RM's preferences, validated and tokenized before the model loads
    tokenizer = load_tokenizer(str(sft_dir))
    train, held_out = load_rm_data(d, tokenizer, cfg.model.text_prompts, stage="dpo")
    train_ds = tokenize_preferences(train, tokenizer, d.max_length, d.train_file)
    eval_ds = tokenize_preferences(held_out, tokenizer, d.max_length, d.eval_file or "held-out pairs")
    print(f"[dpo] {len(train_ds)} training pairs, {len(eval_ds)} held-out pairs; beta {d.beta}, loss {d.loss_type}")

    # 2. the SFT model (base + SFT adapter merged); trl adds the DPO adapter
    model = load_sft_model(cfg.model, sft_dir, tokenizer)
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    run = TrainerRun.prepare("dpo", out, procs, cfg.report_to)
    trainer = build_trainer(cfg, model, tokenizer, train_ds, eval_ds, out, run.callbacks)

    # 3. train (resuming if a previous run died), then save adapter + tokenizer and the marker
    run.train(trainer)
    final = {"eval/loss": "eval_loss", "eval/rewards/accuracies": "eval_rewards/accuracies",
             "eval/rewards/margins": "eval_rewards/margins"}
    if not run.evaluate_and_save(trainer, tokenizer, procs, final):
        return out
    summary = dpo_summary(out / "metrics.jsonl")
    print(f"[dpo] held-out loss {summary['eval_loss_start']:.4f} -> {summary['eval_loss_end']:.4f}, "
          f"accuracy {summary['eval_accuracy_end']:.3f}, margin {summary['eval_margin_end']:.3f}; saved to {out}")
    finish_stage(out, summary)
    return out


def dpo_summary(metrics_path: Path) -> dict:
    rows = [r for r in read_metrics(metrics_path) if "eval/loss" in r]
    return {"eval_loss_start": rows[0]["eval/loss"], "eval_loss_end": rows[-1]["eval/loss"],
            "eval_accuracy_end": rows[-1].get("eval/rewards/accuracies", float("nan")),
            "eval_margin_end": rows[-1].get("eval/rewards/margins", float("nan"))}
