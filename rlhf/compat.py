"""The library internals rlhf relies on, checked once before a stage loads anything.

We subclass trl's RewardTrainer and DPOTrainer and reach into a few private or instance-only attributes of
transformers' Trainer and peft's LoRA layers; a release that renames one would otherwise fail deep inside training
with an AttributeError. `check()` names the missing attribute, where we use it, and the versions we test (pinned in
constraints.txt, installed by `make setup`).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version

# Tested releases: at least the first, below the second (constraints.txt pins one of them exactly).
SUPPORTED = {"transformers": ("5.23", "5.25"), "trl": ("1.16", "1.17"), "peft": ("0.21", "0.22")}
INSTALL_HINT = "install the tested versions with `make setup` (pip install -c constraints.txt -e .)"


class CompatError(RuntimeError):
    """An installed library lacks an attribute rlhf relies on."""


@dataclass(frozen=True)
class Needed:
    package: str
    owner: str
    """module:Class"""
    attr: str
    used_by: str
    stages: tuple[str, ...]
    """The stages that use it: a stage imports only its own owners (trl's trainers cost PPO ~110 MB of memory)."""

    def present(self) -> bool:
        module, name = self.owner.split(":")
        cls = getattr(importlib.import_module(module), name)
        return hasattr(cls, self.attr) or self.attr in _set_in_init(cls)


TRAINER_STAGES = ("sft", "rm", "dpo")
ADAPTER_STAGES = ("rm", "ppo", "dpo", "eval", "export")
NEEDED = (
    Needed("transformers", "transformers:Trainer", "_remove_unused_columns",
           "rlhf/rm/train.py GroupedRewardTrainer.get_train_dataloader", ("rm",)),
    Needed("transformers", "transformers:Trainer", "_train_batch_size",
           "rlhf/rm/train.py GroupedRewardTrainer.get_train_dataloader", ("rm",)),
    Needed("transformers", "transformers:Trainer", "is_fsdp_enabled", "rlhf/runs.py save_trained_adapter",
           TRAINER_STAGES),
    Needed("transformers", "transformers:Trainer", "is_deepspeed_enabled", "rlhf/runs.py save_trained_adapter",
           TRAINER_STAGES),
    Needed("trl", "trl:RewardTrainer", "compute_loss", "rlhf/rm/train.py GroupedRewardTrainer.compute_loss", ("rm",)),
    Needed("trl", "trl:DPOTrainer", "_prepare_dataset", "rlhf/dpo.py TokenizedDPOTrainer._prepare_dataset", ("dpo",)),
    Needed("peft", "peft.tuners.tuners_utils:BaseTunerLayer", "_active_adapter", "rlhf/models.py _switched",
           ADAPTER_STAGES),
    Needed("peft", "peft.tuners.tuners_utils:BaseTunerLayer", "_disable_adapters", "rlhf/models.py _switched",
           ADAPTER_STAGES),
)


def _set_in_init(cls) -> set[str]:
    """Attribute names an __init__ of the class (or a base) mentions: instance attributes exist only on objects."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = inspect.unwrap(vars(klass).get("__init__", object.__init__))
        names |= set(getattr(getattr(init, "__code__", None), "co_names", ()))
    return names


def _installed(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def supported() -> str:
    return ", ".join(f"{p} >={lo},<{hi}" for p, (lo, hi) in SUPPORTED.items())


def check(stage: str | None = None, needed: tuple[Needed, ...] = NEEDED) -> None:
    """Raise CompatError naming the first missing attribute `stage` uses (None: any stage's); warn (stderr) about
    untested versions."""
    for n in needed:
        if stage is not None and stage not in n.stages:
            continue
        if not n.present():
            cls = n.owner.split(":")[1]
            raise CompatError(f"{n.package} {_installed(n.package)} has no {cls}.{n.attr} (used by {n.used_by}); "
                              f"rlhf supports {supported()}: {INSTALL_HINT}")
    untested = [f"{p} {_installed(p)}" for p, (lo, hi) in SUPPORTED.items()
                if _installed(p) == "not installed" or not Version(lo) <= Version(_installed(p)) < Version(hi)]
    if untested:
        print(f"[rlhf] warning: {', '.join(untested)} not tested (tested: {supported()}); {INSTALL_HINT}",
              file=sys.stderr)
