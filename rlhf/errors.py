"""The errors a stage reports as one line, without a traceback (rlhf/cli.py), and the exit of a stopped stage.

Kept free of torch and transformers, like rlhf/config.py and rlhf/data/, so that a mistyped key, a bad data
file or a finished stage is reported before the heavy libraries load (a second, not ten).
"""

from __future__ import annotations

from pathlib import Path

# EX_TEMPFAIL: the stage stopped on a signal after saving a checkpoint; running it again resumes.
EXIT_PREEMPTED = 75


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and where."""


class StageFinished(Exception):
    """The stage directory holds a finished run and `force` was not given; nothing was touched."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than plain tensors and containers (possibly code)."""


class EngineError(RuntimeError):
    """The sampling engine (a vLLM server) is unreachable, died, or disagrees with the trainer: one line saying
    which, and what to do."""


class Preempted(Exception):
    """The stage stopped on a signal after saving a checkpoint; running it again resumes."""

    def __init__(self, stage: str, out_dir: Path, step: int, signal_name: str):
        self.stage, self.out_dir, self.step, self.signal_name = stage, Path(out_dir), step, signal_name
        super().__init__(f"stopped on {signal_name} after saving the checkpoint of step {step} "
                         f"in {self.out_dir / 'checkpoints'}; run the stage again to resume")
