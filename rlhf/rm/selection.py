"""Which reward-model checkpoint to keep: the best on the held-out pairs, with early stopping.

The Trainer does the work (`load_best_model_at_end`, `metric_for_best_model`, `EarlyStoppingCallback`): the RM
stage evaluates on its held-out pairs at each epoch (or every train.eval_steps / save_steps), writes a
checkpoint at each evaluation, stops after `patience` evaluations without improvement and reloads the best checkpoint before the
adapter is saved. Its state (best metric, best checkpoint, patience counter) lives in the checkpoints'
trainer_state.json, so a preempted run resumes with it. This module adds the tie-break and the summary.
"""

from __future__ import annotations

from transformers import EarlyStoppingCallback, TrainerCallback

SELECTION = "eval_selection"


def selection_score(accuracy: float, loss: float) -> float:
    """Held-out accuracy with ties broken by the lower held-out loss, as the one number the Trainer compares:
    accuracy rounded to 1e-6, minus 1e-9 x loss (capped at 100, so the loss never outweighs an accuracy step)."""
    return round(accuracy, 6) - 1e-9 * min(loss, 100.0)


class SelectionScore(TrainerCallback):
    """Adds `eval_selection` to the evaluation metrics. Callbacks run in order: it must come before
    EarlyStoppingCallback, and both run before the Trainer's best-checkpoint bookkeeping reads the metrics."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if metrics and "eval_accuracy" in metrics and "eval_loss" in metrics:
            metrics[SELECTION] = selection_score(metrics["eval_accuracy"], metrics["eval_loss"])


def best_checkpoint_args(metric: str, eval_steps: int, save_steps: int) -> dict:
    """TrainingArguments that keep the best checkpoint, the best by `metric` reloaded when training ends.

    The Trainer can only reload a step it saved, so evaluation and checkpoint go together: every
    min(eval_steps, save_steps) steps of those set (> 0), else at each epoch."""
    every = min([n for n in (eval_steps, save_steps) if n > 0], default=0)
    strategy = "steps" if every else "epoch"
    return dict(eval_strategy=strategy, save_strategy=strategy, eval_steps=every or None, save_steps=every or 500,
                load_best_model_at_end=True, metric_for_best_model=SELECTION if metric == "accuracy" else "eval_loss",
                greater_is_better=metric == "accuracy")


def plateau_kwargs(metric: str) -> dict:
    """lr_scheduler_kwargs of transformers' reduce_lr_on_plateau: halve the learning rate after each held-out
    evaluation that does not improve the selection metric (any improvement counts, as for early stopping), so the
    schedule follows the run, not the cap."""
    return {"mode": "max" if metric == "accuracy" else "min", "factor": 0.5, "patience": 0, "threshold": 0.0}


def selection_callbacks(patience: int) -> list[TrainerCallback]:
    """patience 0: keep the best checkpoint but train to the maximum."""
    return [SelectionScore()] + ([EarlyStoppingCallback(early_stopping_patience=patience)] if patience > 0 else [])


def describe_selection(log_history: list[dict], best_step: int | None, max_epochs: float, stopped_early: bool,
                       patience: int, cap: str = "rm.train.epochs") -> dict:
    """What was kept and why, from the Trainer's log history (its `eval_*` rows), its best step, the most epochs
    it could have trained, whether it stopped before them and the config key of the cap (`cap`).

    Returns rm/best_* figures for DONE and metrics (rm/still_improving: the cap, not patience, ended a run whose
    last evaluation was its best), and `selection`, a sentence for people."""
    evals = [row for row in log_history if "eval_loss" in row]
    if not evals:
        return {"selection": "no held-out evaluation during training: the last step was kept"}
    if best_step is None:
        return {"selection": "kept the last step (rm.early_stopping is off)"}
    best = next((row for row in evals if row["step"] == best_step), evals[-1])
    last, since = evals[-1], sum(row["step"] > best["step"] for row in evals)
    out = {"rm/best_step": best["step"], "rm/best_epoch": best["epoch"], "rm/best_eval_loss": best["eval_loss"],
           "rm/stopped_early": stopped_early}
    accuracy = best.get("eval_accuracy")
    if accuracy is not None:
        out["rm/best_eval_accuracy"] = accuracy
    what = f"held-out accuracy {accuracy:.3f}, loss {best['eval_loss']:.3f}" if accuracy is not None \
        else f"held-out loss {best['eval_loss']:.3f}"
    text = (f"kept the best checkpoint ({what}) at epoch {round(best['epoch'], 2):g} (step {best['step']}) of at most "
            f"{max_epochs:g} epochs")
    if stopped_early:
        text += f"; stopped at epoch {round(last['epoch'], 2):g} after {since} evaluations without improvement (patience {patience})"
    elif len(evals) == 1:
        text += " (the only evaluation)"
    elif since == 0:
        out["rm/still_improving"] = True
        text += f"; still improving at the last evaluation when {cap} stopped it: raise {cap}"
    else:
        text += f"; trained to the maximum, {since} evaluation(s) after the best"
    return out | {"selection": text}


def cap_warning(selection: dict, cap: str) -> list[str]:
    """The RM warning (one line) when its cap, not early stopping, ended a run that was still improving."""
    if not selection.get("rm/still_improving"):
        return []
    return [f"the reward model was still improving when {cap} stopped it (best held-out epoch "
            f"{round(selection['rm/best_epoch'], 2):g} was the last): raise {cap}; early stopping "
            f"(rm.early_stopping.patience) ends the run once it stops improving and keeps the best epoch"]
