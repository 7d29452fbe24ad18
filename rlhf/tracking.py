"""Experiment trackers, from the config's `report_to` (default: [tensorboard]).

Every stage writes TensorBoard into `<stage>/tb/` (our own writer, so the event files are where they always
were) and `metrics.jsonl`; `report_to` adds any tracker the HF Trainer supports: SFT and RM hand the names to
the Trainer (`report_to=`), PPO and eval log through accelerate's tracker classes (wandb, comet_ml, mlflow,
clearml, dvclive, swanlab, trackio, aim). Names are checked when the config loads, before anything else.
W&B: the project is $WANDB_PROJECT (default "rlhf"), the run `<run_dir name>/<stage>`; `WANDB_MODE=offline`
writes `wandb/` locally and sends nothing (`wandb sync` uploads it later).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

from rlhf.errors import ConfigError

TENSORBOARD = "tensorboard"
# report_to name -> the module that must be importable (when it differs from the name)
_MODULE = {"azure_ml": "azureml", "flyte": "flytekit", "kubeflow": "kfp"}


def trainer_trackers() -> list[str]:
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return sorted(INTEGRATION_TO_CALLBACK)


def check_report_to(names: list[str]) -> None:
    """One clear error for a tracker the Trainer does not know or whose package is not installed. The default
    (tensorboard alone) is checked without importing transformers: a config is loaded before torch is."""
    known = trainer_trackers() if set(names) - {TENSORBOARD} else [TENSORBOARD]
    for name in names:
        if name not in known:
            raise ConfigError(f"report_to: unknown tracker {name!r}; supported: {', '.join(known)}")
        if importlib.util.find_spec(_MODULE.get(name, name)) is None:
            raise ConfigError(f"report_to: {name} is not installed (pip install {_MODULE.get(name, name)})")


def run_name(out: str | Path) -> str:
    out = Path(out).absolute()
    return f"{out.parent.name}/{out.name}"


def trainer_report_to(names: list[str]) -> list[str]:
    """The Trainer's `report_to`: every tracker but TensorBoard, which our own callback writes into tb/."""
    if "wandb" in names:
        os.environ.setdefault("WANDB_PROJECT", "rlhf")
    return [n for n in names if n != TENSORBOARD]


def trainer_callbacks(names: list[str], out: Path, main: bool) -> list:
    """TensorBoard into out/tb, on the main process, when report_to has it."""
    if not (main and TENSORBOARD in names):
        return []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return [TensorBoardCallback(SummaryWriter(str(out / "tb")))]


class Trackers:
    """The loggers of a stage with its own loop (PPO, eval): `log(values, step)`, then `close()`.
    enabled=False (every process but the main one): does nothing."""

    def __init__(self, names: list[str], out: str | Path, config: dict | None = None, enabled: bool = True,
                 stage: str = "rlhf"):
        self.tb, self.others = None, []
        if not enabled:
            return
        from accelerate import PartialState
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        PartialState()  # accelerate's trackers log through it (already made by a stage; not in a test)

        for name in names:
            if name == TENSORBOARD:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out) / "tb"))
            elif name in LOGGER_TYPE_TO_CLASS:
                self.others.append(_start(LOGGER_TYPE_TO_CLASS[name], Path(out), config))
            else:
                print(f"[{stage}] warning: report_to {name} logs only the Trainer stages (SFT, RM); {stage} logs "
                      f"through accelerate's trackers: {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}", file=sys.stderr)

    def log(self, values: dict, step: int) -> None:
        values = {k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        for tracker in self.others:
            tracker.log(values, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        for tracker in self.others:
            tracker.finish()
        self.tb, self.others = None, []


def _start(cls, out: Path, config: dict | None):
    if cls.name == "wandb":
        tracker = cls(os.environ.get("WANDB_PROJECT", "rlhf"), name=run_name(out))
    elif cls.requires_logging_directory:
        tracker = cls(run_name(out), logging_dir=str(out / cls.name))
    else:
        tracker = cls(run_name(out))
    tracker.start()
    if config:
        tracker.store_init_configuration(config)
    return tracker
