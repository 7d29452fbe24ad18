"""Stop cleanly when the job is asked to: SIGTERM (preemption, `scancel`, `scontrol requeue`, a plain `kill`)
or SIGUSR1 (SLURM's warning before the time limit, `sbatch --signal=B:USR1@<s>` in our job scripts).

The handler only records the signal. The training loops ask `stop.requested()` at each step boundary, all
processes together (`distributed.any_process`), so they all save the same step's checkpoint and leave
together. The stage then raises `Preempted`: the command exits with EXIT_PREEMPTED (75, EX_TEMPFAIL: try
again) after writing `<stage dir>/PREEMPTED`, and the next run of the stage, a requeued SLURM job or a plain
`make <stage>`, resumes from that checkpoint. `DONE` is never written by a preempted run.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from rlhf import distributed
from rlhf.errors import EXIT_PREEMPTED, Preempted  # noqa: F401 (re-exported: the stages raise and catch them)
from rlhf.runs import PREEMPTED

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignal:
    """Records SIGTERM/SIGUSR1 instead of dying on them, from construction until `close()` (or the `with` exits).

    Outside the main thread (where Python cannot install handlers) it records nothing and changes nothing."""

    def __init__(self, signals=SIGNALS):
        self.received: str | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            print(f"[rlhf] received {signal.Signals(signum).name}: checkpointing at the end of this step, then "
                  f"stopping", file=sys.stderr, flush=True)
        self.received = signal.Signals(signum).name

    def requested(self, device=None) -> bool:
        """Has any process received a signal? Collective: every process must call it at the same point."""
        return distributed.any_process(self.received is not None, device)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> "StopSignal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def mark_preempted(out_dir: str | Path, stage: str, step: int, signal_name: str | None,
                   write: bool = True) -> Preempted:
    """The exception to raise after a stop at `step`; with `write` (the main process) also `<out_dir>/PREEMPTED`
    (what stopped the stage, at which step). No `signal_name`: the signal reached another process only."""
    name = signal_name or "a signal to another process"
    if write:
        record = {"stage": stage, "step": step, "signal": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        tmp = Path(out_dir) / (PREEMPTED + ".tmp")
        tmp.write_text(json.dumps(record) + "\n")
        tmp.replace(Path(out_dir) / PREEMPTED)
    return Preempted(stage, Path(out_dir), step, name)


class StopOnSignalCallback(TrainerCallback):
    """For the Trainer-based stages (SFT, RM, DPO): after a signal, save a checkpoint at the end of the current
    optimiser step and stop training. The stage checks `stop.received`/`stopped_at` after `train()` returns.

    The held-out evaluation due at that step (eval_steps) or at the end of its epoch is skipped, and so is the
    epoch-end save of the step just saved: on a real model they outlast the grace period a cluster gives a job."""

    def __init__(self, stop: StopSignal):
        self.stop, self.stopped_at = stop, None

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop.requested(args.device):
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False
            self.stopped_at = state.global_step
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:
            control.should_evaluate = control.should_save = False
        return control


def train_or_preempt(trainer, resume: Path | None, stage: str, out: Path) -> None:
    """`trainer.train()` (from `resume` if given) that, on SIGTERM/SIGUSR1, saves a checkpoint at the end of the
    current optimiser step and raises Preempted on every process (the main one writes the PREEMPTED marker)."""
    with StopSignal() as stop:
        callback = StopOnSignalCallback(stop)
        trainer.add_callback(callback)
        try:
            trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        finally:
            trainer.remove_callback(callback)
    if callback.stopped_at is None:
        return
    procs = distributed.state()
    procs.wait_for_everyone()  # every process has left train(); the checkpoint is complete
    raise mark_preempted(out, stage, callback.stopped_at, stop.received, write=procs.is_main_process)
