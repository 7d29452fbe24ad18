"""PPO checkpoints: everything needed to continue a run as if it had never stopped.

A checkpoint is written into a temporary directory and renamed to `checkpoint-<step>` only when complete,
so a kill mid-save never leaves a checkpoint that looks valid; `state.json` is also written last.

Nothing in a checkpoint is code: the adapters are safetensors, the run state JSON, and `optimizer.pt` (optimiser,
scheduler and random states: tensors, numbers, lists, tuples, dicts) is read with `torch.load(weights_only=True)`,
which refuses pickled objects, so a tampered checkpoint on a shared filesystem cannot run code on resume.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rlhf.errors import UnsafeCheckpointError
from rlhf.ppo.roles import Roles, adapter_state, load_adapter_state
from rlhf.runs import last_complete_checkpoint

STATE = "state.json"


def load_plain(path: Path) -> dict:
    """torch.load restricted to tensors and plain containers; anything else is refused with one clear line."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"a pickled {found.group(1)}" if found else "a pickled object"
        raise UnsafeCheckpointError(
            f"{path} holds {what}, not only tensors and numbers: refusing to load it (it could run code). "
            f"Delete {path.parent} to resume from the previous checkpoint, or the checkpoints to start over.") from None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(ckpt_dir: Path, step: int, roles: Roles, optimizer, scheduler, state: dict, keep: int = 2,
                    rngs: list[dict] | None = None) -> Path:
    """state: JSON-able run state (KL controller, prompt sampler, reward normalisation, ...).
    rngs: the random states of all processes, rank order (several processes); default: this process's."""
    final = ckpt_dir / f"checkpoint-{step}"
    tmp = ckpt_dir / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(adapter_state(roles), str(tmp / "adapters.safetensors"))
    rngs = rngs or [rng_state()]
    rest = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs[0]}
    if len(rngs) > 1:
        rest["rng_per_process"] = rngs
    torch.save(rest, tmp / "optimizer.pt")
    (tmp / STATE).write_text(json.dumps({"step": step, **state}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(ckpt_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(ckpt_dir: Path, roles: Roles, optimizer, scheduler, rank: int = 0, world: int = 1) -> dict | None:
    """Restore the newest complete checkpoint into roles/optimizer/scheduler and the RNGs; returns its
    run state (with "step", and "rng_restored": False when the checkpoint was written by a different number
    of processes, so this process's random state is not in it), or None when there is none."""
    for tmp in ckpt_dir.glob(".tmp-checkpoint-*"):
        shutil.rmtree(tmp)  # a save that a kill interrupted
    ckpt = last_complete_checkpoint(ckpt_dir, marker=STATE)
    if ckpt is None:
        return None
    rest = load_plain(ckpt / "optimizer.pt")  # first: a refused checkpoint changes nothing
    load_adapter_state(roles, load_file(str(ckpt / "adapters.safetensors")))
    optimizer.load_state_dict(rest["optimizer"])
    scheduler.load_state_dict(rest["scheduler"])
    rngs = rest.get("rng_per_process", [rest["rng"]])
    if len(rngs) == world:
        set_rng_state(rngs[rank])
    return {**json.loads((ckpt / STATE).read_text()), "path": str(ckpt), "rng_restored": len(rngs) == world}
