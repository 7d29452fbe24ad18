"""Stage 1, supervised fine-tuning: trl's SFTTrainer with a LoRA adapter on the frozen base.

Output `<run_dir>/sft/`: the adapter (PEFT format, safetensors), the tokenizer (with the pad token and
chat template every later stage uses), `config.yaml`, `metrics.jsonl`, TensorBoard events in `tb/`,
Trainer checkpoints in `checkpoints/`, and `DONE`, written last.
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from rlhf import data as rdata
from rlhf.config import PipelineConfig, SFTStageConfig
from rlhf.models import enable_activation_checkpointing, load_causal_lm, load_tokenizer, lora_config, resolve_dtype
from rlhf.runs import (finish_stage, read_metrics)
from rlhf.trainers import TrainerRun, start_stage, trainer_kwargs


def load_sft_data(cfg: SFTStageConfig, tokenizer,
                  text_prompts: str = "raw") -> tuple[list[rdata.SFTExample], list[rdata.SFTExample]]:
    """Train and held-out examples, validated (lengths included) before any training starts; plain-text prompts
    as model.text_prompts says (`rdata.for_model`), and a line saying so."""
    train = rdata.load_sft(cfg.train_file, split=cfg.train_split, skip_invalid=cfg.skip_invalid)
    if cfg.eval_file:
        held_out = rdata.load_sft(cfg.eval_file, split=cfg.eval_split, skip_invalid=cfg.skip_invalid)
    else:
        held_out, train = rdata.hold_out(train, cfg.eval_fraction, cfg.train.seed)
    both = rdata.for_model(train + held_out, tokenizer, text_prompts, cfg.max_prompt_length, "sft")
    return both[:len(train)], both[len(train):]


def to_dataset(examples: list[rdata.SFTExample]) -> Dataset:
    """trl's prompt/completion layout: chat prompts become conversational rows (the chat template applies),
    raw-text prompts stay standard rows (trl appends EOS)."""
    kinds = {isinstance(e.prompt, list) for e in examples}
    if len(kinds) > 1:
        raise rdata.DataError(f"{examples[0].source}: mixes chat-message and plain-text prompts in one dataset")
    if kinds == {True}:
        rows = [{"prompt": e.prompt, "completion": [{"role": "assistant", "content": e.completion}]} for e in examples]
    else:
        rows = [{"prompt": e.prompt, "completion": e.completion} for e in examples]
    return Dataset.from_list(rows)


def trainer_args(s: SFTStageConfig, out: Path, bf16: bool, report_to: list[str] = ()) -> SFTConfig:
    return SFTConfig(
        **trainer_kwargs(s.train, out, bf16, report_to),
        eval_on_start=True,  # the untrained adapter's held-out loss: the baseline SFT must beat
        max_length=s.max_length, completion_only_loss=True, packing=False,
    )


def build_trainer(cfg: PipelineConfig, model, tokenizer, train: list[rdata.SFTExample],
                  held_out: list[rdata.SFTExample], out: Path, callbacks: list = ()) -> SFTTrainer:
    """trl's SFTTrainer on `model` (the base): it attaches the LoRA adapter (sft.lora); the base stays frozen."""
    bf16 = resolve_dtype(cfg.model.dtype) == torch.bfloat16
    return SFTTrainer(
        model=model, args=trainer_args(cfg.sft, out, bf16, cfg.report_to), processing_class=tokenizer,
        train_dataset=to_dataset(train), eval_dataset=to_dataset(held_out),
        peft_config=lora_config(cfg.sft.lora), callbacks=list(callbacks),
    )


def run(cfg: PipelineConfig) -> Path:
    s = cfg.sft
    procs, out = start_stage(cfg, "sft")

    # 1. tokenizer and data, validated before the model is even loaded
    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    train, held_out = load_sft_data(s, tokenizer, cfg.model.text_prompts)
    print(f"[sft] {len(train)} training and {len(held_out)} held-out examples from {s.train_file}")

    # 2. base model + trainer (trl attaches the LoRA adapter; the base stays frozen)
    model = load_causal_lm(cfg.model, tokenizer)
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    run = TrainerRun.prepare("sft", out, procs, cfg.report_to)
    trainer = build_trainer(cfg, model, tokenizer, train, held_out, out, run.callbacks)

    # 3. train (resuming if a previous run died), then save adapter + tokenizer and the marker
    run.train(trainer)
    if not run.evaluate_and_save(trainer, tokenizer, procs, {"eval/loss": "eval_loss"}):
        return out
    summary = sft_summary(out / "metrics.jsonl")
    print(f"[sft] held-out loss {summary['eval_loss_start']:.4f} -> {summary['eval_loss_end']:.4f}; saved to {out}")
    finish_stage(out, summary)
    return out


def sft_summary(metrics_path: Path) -> dict:
    losses = [r["eval/loss"] for r in read_metrics(metrics_path) if "eval/loss" in r]
    return {"eval_loss_start": losses[0], "eval_loss_end": losses[-1]}
