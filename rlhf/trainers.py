"""What the Trainer-based stages (SFT, RM, DPO) share: TrainingArguments, the metrics and finite-loss callbacks,
saving the trained adapter."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from rlhf.config import TrainSpec
from rlhf.runs import MetricsFile, check_finite, namespaced
from rlhf.tracking import run_name, trainer_report_to


class FiniteLogsCallback(TrainerCallback):
    """Stops a Trainer stage (SFT, RM) at the first log whose loss or gradient norm is nan or inf, naming the
    step and the quantity; the stage then saves no adapter and writes no DONE."""

    KEYS = ("loss", "grad_norm", "eval_loss")

    def __init__(self, stage: str):
        self.stage = stage

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        check_finite(namespaced({k: logs[k] for k in self.KEYS if k in logs}), f"{self.stage} step {state.global_step}")


class MetricsCallback(TrainerCallback):
    """Sends the Trainer's logs to a MetricsFile under namespaced names (main process only)."""

    def __init__(self, metrics: MetricsFile):
        self.metrics = metrics

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.metrics.write(state.global_step, namespaced(logs))


def save_trained_adapter(trainer, out: Path) -> None:
    """The trained PEFT adapter into out/, written by the main process. Every process calls this: under FSDP or
    DeepSpeed the sharded weights are gathered first (Trainer.save_model, which also writes the tokenizer and
    training_args.bin); otherwise the PEFT model saves itself."""
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        trainer.save_model(str(out))
    elif trainer.is_world_process_zero():
        trainer.model.save_pretrained(out)


def trainer_kwargs(train: TrainSpec, out: Path, bf16: bool, report_to: list[str] = ()) -> dict:
    """TrainingArguments shared by the Trainer-based stages: schedule, logging, checkpoints in out/checkpoints.
    report_to: the config's trackers (TensorBoard is our own callback, rlhf/tracking.py)."""
    return dict(
        output_dir=str(Path(out) / "checkpoints"),
        learning_rate=train.lr, num_train_epochs=train.epochs, max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size, per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum, warmup_steps=train.warmup,
        weight_decay=train.weight_decay, lr_scheduler_type=train.lr_scheduler, max_grad_norm=train.max_grad_norm,
        logging_steps=train.logging_steps, seed=train.seed, save_total_limit=train.save_total_limit,
        eval_strategy="steps" if train.eval_steps else "epoch", eval_steps=train.eval_steps or None,
        save_strategy="steps" if train.save_steps else "epoch", save_steps=train.save_steps or 500,
        report_to=trainer_report_to(list(report_to)), run_name=run_name(out),
        disable_tqdm=not (train.progress_bar and sys.stderr.isatty()),  # no bars in CI or SLURM logs
        bf16=bf16, use_cpu=not torch.cuda.is_available(),
    )
