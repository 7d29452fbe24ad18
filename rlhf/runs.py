"""Stage output directories: completion marker, checkpoints that survive a kill, metrics files (no torch or
transformers here: the Trainer glue is rlhf/trainers.py).

A stage directory `<run_dir>/<stage>/` is valid only while it holds `DONE`, written last. A run that dies
leaves no marker, and the next run of the stage resumes from the last *complete* checkpoint under
`checkpoints/`.

A finished stage is never lost (begin_stage / finish_stage):
* started again without `force`, it refuses (StageFinished), touching nothing;
* with `force` it trains from scratch into `<stage>.rerun/` (a killed rerun resumes there) and swaps that
  in for `<stage>/` only once it has finished: a failed or interrupted rerun leaves the old outputs as they were;
* a finished sft, rm, ppo or dpo stage moves the later stages built on its previous outputs aside, to
  `<stage>.stale/`, so that `make` (which reruns a stage whose DONE is missing) trains them again.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

from rlhf.errors import StageFinished  # noqa: F401 (re-exported)

DONE = "DONE"
PREEMPTED = "PREEMPTED"  # written by a stage stopped on a signal (rlhf/preempt.py)
_CKPT = re.compile(r"^checkpoint-(\d+)$")


_STARTED = time.time()


def peak_memory() -> dict[str, float]:
    """Peak memory of this process so far: resident set (MB) and, on a GPU, allocated CUDA memory (MB)."""
    import resource

    import torch

    out = {"perf/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["perf/peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# The pipeline's stages, and for each the stages built on its outputs, which a finished run of it invalidates
# (dpo needs only sft; eval judges ppo and, when it has finished, dpo).
STAGES = ("sft", "rm", "ppo", "dpo", "eval")
BUILT_ON = {"sft": ("rm", "ppo", "dpo", "eval"), "rm": ("ppo", "eval"), "ppo": ("eval",), "dpo": ("eval",), "eval": ()}
RERUN, STALE = ".rerun", ".stale"


def begin_stage(out_dir: str | Path, force: bool = False) -> Path:
    """The directory the stage writes to: `out_dir` itself, or `<out_dir>.rerun` when `out_dir` has finished
    and `force` is set (finish_stage swaps it in). Raises StageFinished if it has finished and `force` is not."""
    out = Path(out_dir)
    recover_swap(out)
    if is_done(out):
        if not force:
            name = out.name
            raise StageFinished(f"{out} holds a finished {name} stage ({out / DONE}); to train it again, "
                                f"add --force (the finished outputs stay until the new run finishes) "
                                f"or run `make clean-{name}` first")
        out = out.with_name(out.name + RERUN)
    out.mkdir(parents=True, exist_ok=True)
    (out / PREEMPTED).unlink(missing_ok=True)  # the marker of an earlier run stopped by a signal
    return out


def finish_stage(out_dir: str | Path, summary: dict) -> None:
    """Write the marker last, with a one-line summary of the outcome, the process's wall time and peak memory.

    For a pipeline stage (<run_dir>/<stage> or its .rerun directory) the later stages are moved aside first
    (they were built on the previous outputs), then a rerun directory replaces the finished one."""
    out = Path(out_dir)
    final = out.with_name(out.name[:-len(RERUN)]) if out.name.endswith(RERUN) else out
    if final.name in STAGES:
        for later in BUILT_ON[final.name]:
            move_aside(final.parent / later)
    tmp = out / (DONE + ".tmp")
    perf = {"perf/wall_s": time.time() - _STARTED, **peak_memory()}
    tmp.write_text(json.dumps({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **summary, **perf}) + "\n")
    tmp.replace(out / DONE)
    if final.name in STAGES:
        swap_in(out, final)


def move_aside(stage_dir: Path) -> None:
    """`<stage>` -> `<stage>.stale` (replacing an older one), so that the stage runs again from scratch; a
    rerun of it in progress goes too."""
    remove(stage_dir.with_name(stage_dir.name + RERUN))
    if not stage_dir.exists() and not stage_dir.is_symlink():
        return
    stale = stage_dir.with_name(stage_dir.name + STALE)
    remove(stale)
    stage_dir.rename(stale)
    print(f"[rlhf] {stage_dir} was built on the previous outputs of an earlier stage: moved to {stale}",
          file=sys.stderr)


def swap_in(out: Path, final: Path) -> None:
    """Make the finished `out` the stage directory `final`: a rerun directory replaces the old one; a stage
    finished in place drops a leftover rerun directory (it was started from outputs that are gone now)."""
    rerun = final.with_name(final.name + RERUN)
    if out == final:
        remove(rerun)
        return
    old = final.with_name(final.name + ".replaced")
    remove(old)
    if final.exists() or final.is_symlink():
        final.rename(old)
    out.rename(final)  # between the two renames only <stage>.rerun holds the finished run
    remove(old)
    print(f"[rlhf] the finished rerun replaced {final}")


def recover_swap(final: Path) -> None:
    """A kill between swap_in's two renames leaves the finished run in `<stage>.rerun` only: move it in."""
    rerun = final.with_name(final.name + RERUN)
    if not final.exists() and is_done(rerun):
        rerun.rename(final)


def remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def is_done(out_dir: str | Path) -> bool:
    return (Path(out_dir) / DONE).is_file()


def done_summary(out_dir: str | Path) -> dict | None:
    """The summary a finished stage wrote into its DONE marker (finish_stage: outcome, `perf/wall_s`,
    `perf/peak_rss_mb`, `perf/peak_cuda_mb` on a GPU); None when the stage has not finished or the marker is
    not such a summary (a data directory's `ok`)."""
    try:
        summary = json.loads((Path(out_dir) / DONE).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def require_done(out_dir: str | Path, stage: str) -> Path:
    out = Path(out_dir)
    recover_swap(out)
    if not is_done(out):
        raise FileNotFoundError(f"{out} has no finished {stage} stage (no {DONE} marker): run `make {stage}` first")
    return out


def checkpoint_complete(ckpt: Path, marker: str = "trainer_state.json") -> bool:
    """`marker`, the JSON file a checkpoint writes last, is there whole (it exists, empty, while being written)."""
    try:
        json.loads((ckpt / marker).read_text())
        return True
    except (OSError, ValueError):
        return False


def last_complete_checkpoint(ckpt_dir: str | Path, marker: str = "trainer_state.json") -> Path | None:
    """Newest checkpoint-N that was fully written; half-written ones (killed mid-save) are removed.

    `marker` is the JSON file written last into a checkpoint (the Trainer writes trainer_state.json
    after the weights, optimizer and RNG states)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return None
    ckpts = sorted((p for p in root.iterdir() if p.is_dir() and _CKPT.match(p.name)),
                   key=lambda p: int(_CKPT.match(p.name).group(1)))
    for ckpt in reversed(ckpts):
        if checkpoint_complete(ckpt, marker):
            return ckpt
        print(f"[rlhf] removing incomplete checkpoint {ckpt}", file=sys.stderr)
        shutil.rmtree(ckpt)
    return None


def checkpoint_step(ckpt: Path | None) -> int:
    return int(_CKPT.match(ckpt.name).group(1)) if ckpt else 0


def check_finite(values: dict, where: str) -> None:
    """Raise FloatingPointError naming the first quantity that holds a nan or an inf: "<where>: <name> is nan".
    values: numbers or tensors (checked element by element). A non-finite loss, reward or gradient norm means
    the weights are (or are about to be) garbage: the run stops before anything is saved."""
    for name, value in values.items():
        if not hasattr(value, "detach"):  # a number (no torch needed: this module loads without it)
            if not math.isfinite(float(value)):
                raise FloatingPointError(f"{where}: {name} is {float(value)}")
            continue
        import torch

        x = value.detach()
        bad = x[~torch.isfinite(x)]
        if bad.numel():
            raise FloatingPointError(f"{where}: {name} is {bad.flatten()[0].item()}")


class MetricsFile:
    """Append-only `metrics.jsonl`: one JSON object per line, `{"step": N, "<ns>/<name>": value, ...}`.

    Numbers must be finite: a nan or inf raises FloatingPointError (a silently dropped value hid diverged
    runs), except the statistics in MAY_BE_UNDEFINED, which are nan by definition on some batches and are
    left out of that row. Non-numbers (strings) are left out.

    enabled=False (every process but the main one under `accelerate launch`): touches nothing, writes nothing."""

    MAY_BE_UNDEFINED = frozenset({"ppo/explained_variance"})  # nan when the returns do not vary (core.py)

    def __init__(self, path: str | Path, resume_step: int = 0, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self._truncate_after(resume_step)

    def _truncate_after(self, step: int) -> None:
        # Rows logged after the checkpoint we resume from are replayed by the resumed run: drop them.
        if not self.path.exists():
            return
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        check_finite({k: v for k, v in numbers.items() if k not in self.MAY_BE_UNDEFINED}, f"{self.path} step {step}")
        clean = {k: v for k, v in numbers.items() if math.isfinite(v)}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **clean}) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# Trainer log keys -> our stable namespaced names (same names in TensorBoard, metrics.jsonl, reports).
_RENAME = {"loss": "train/loss", "grad_norm": "train/grad_norm", "learning_rate": "train/lr", "epoch": "train/epoch"}


def namespaced(logs: dict) -> dict:
    out = {}
    for key, value in logs.items():
        if key in _RENAME:
            out[_RENAME[key]] = value
        elif key.startswith("eval_"):
            out["eval/" + key[len("eval_"):]] = value
        elif "/" in key:
            out[key] = value
        else:
            out["train/" + key] = value
    return out


def rm_warnings(rm_dir: Path) -> list[str]:
    """The warnings the reward model's stage wrote into its diagnostics.json (none without the file)."""
    path = Path(rm_dir) / "diagnostics.json"
    return json.loads(path.read_text()).get("warnings", []) if path.is_file() else []
