"""What the Trainer-based stages (SFT, RM, DPO) share: TrainingArguments, the metrics and finite-loss callbacks,
resuming from the last complete checkpoint, training with preemption, saving the trained adapter."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainerCallback

from rlhf import data as rdata
from rlhf import distributed
from rlhf.config import PipelineConfig, TrainSpec, save_config
from rlhf.preempt import train_or_preempt
from rlhf.runs import MetricsFile, begin_stage, check_finite, checkpoint_step, last_complete_checkpoint, namespaced
from rlhf.tracking import run_name, trainer_callbacks, trainer_report_to


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


def within_max_length(rows: list[tuple[int, dict]], max_length: int, stage: str, name: str) -> Dataset:
    """(length in tokens, row) -> the rows of at most max_length tokens, as a Dataset. The longer ones are dropped
    and counted out loud (a preference pair is never truncated: that would cut off the end of turn the reward is
    read at); none left is a DataError naming `name` (the file)."""
    kept = [row for length, row in rows if length <= max_length]
    if len(kept) < len(rows):
        print(f"[{stage}] {name}: dropped {len(rows) - len(kept)} of {len(rows)} pairs longer than "
              f"max_length={max_length}", file=sys.stderr)
    if not kept:
        raise rdata.DataError(f"{name}: every pair is longer than {stage}.max_length={max_length}")
    return Dataset.from_list(kept)


def start_stage(cfg: PipelineConfig, stage: str):
    """(this process's accelerate state, the stage's output directory): the directory begun (refused if it holds
    a finished run and cfg.force is off) and the config saved there by the main process. Under `accelerate
    launch` the Trainer runs DDP/FSDP/DeepSpeed and only the main process writes."""
    procs = distributed.state()
    out = begin_stage(Path(cfg.run_dir) / stage, cfg.force)
    if procs.is_main_process:
        save_config(cfg, out)
    return procs, out


@dataclass
class TrainerRun:
    """One Trainer's run in `out`: the checkpoint it resumes from, its metrics file and the callbacks every
    Trainer stage gives its Trainer (finite losses, metrics.jsonl, the config's trackers)."""

    stage: str
    out: Path
    main: bool
    resume: Path | None
    metrics: MetricsFile
    callbacks: list

    @classmethod
    def prepare(cls, stage: str, out: Path, procs, report_to: list[str]) -> "TrainerRun":
        """Call after the model is loaded: the main process removes a half-written checkpoint first."""
        with procs.main_process_first():
            resume = last_complete_checkpoint(out / "checkpoints")
        main = procs.is_main_process
        metrics = MetricsFile(out / "metrics.jsonl", resume_step=checkpoint_step(resume), enabled=main)
        callbacks = [FiniteLogsCallback(stage), MetricsCallback(metrics)] + trainer_callbacks(report_to, out, main)
        return cls(stage, out, main, resume, metrics, callbacks)

    def train(self, trainer) -> None:
        """Train, resuming from the last complete checkpoint if an earlier run died; on SIGTERM/SIGUSR1 the
        Trainer checkpoints and the stage exits 75 (rlhf/preempt.py)."""
        if self.resume and self.main:
            print(f"[{self.stage}] resuming from {self.resume}")
        train_or_preempt(trainer, self.resume, self.stage, self.out)

    def evaluate_and_save(self, trainer, tokenizer, procs, final: dict[str, str]) -> bool:
        """A held-out evaluation of the final weights in metrics.jsonl (`final`: our metric name -> the Trainer's),
        the adapter and the tokenizer saved; every process waits for the others. Returns whether this is the main
        process, which alone goes on to write the summary and DONE. The Trainer's own evaluation at the last step
        (the end of the last epoch, or an eval_steps multiple) is that evaluation: it is not run twice."""
        step = trainer.state.global_step
        if not any(h.get("step") == step and all(t in h for t in final.values()) for h in trainer.state.log_history):
            logs = trainer.evaluate()
            self.metrics.write(step, {ours: logs[theirs] for ours, theirs in final.items()})
        save_trained_adapter(trainer, self.out)
        procs.wait_for_everyone()
        if self.main:
            tokenizer.save_pretrained(self.out)
        return self.main
