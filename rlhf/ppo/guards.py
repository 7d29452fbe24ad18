"""Over-optimisation guards that need no gold judge: a KL budget, a degeneration stop, and the kept policy.

A weak reward model lets PPO drag the policy far from SFT onto answers the RM likes and nobody else does
(on one task: KL 7.3 nats, greedy answers "X, X, X.", gold win rate 0.39). The guards watch two signals:

* the rollout KL (`ppo/kl`, summed over an answer): above `kl_budget` nats for `patience` consecutive
  steps, the run stops;
* the held-out monitor (`rlhf/ppo/monitor.py`): when the greedy answers' `repeat` (rlhf/eval/degeneration.py)
  exceeds the SFT model's own (measured at step 0) by more than `degeneration_margin` at `patience`
  consecutive monitor points, the run stops.

The kept policy (`keep_best`): `monitor_reward_guarded` (the default) the monitor point with the highest RM
score of sampled answers among the points within both guards, step 0 (the SFT policy: the policy adapter
still at zero) included, so a run the guards flag keeps SFT and says so; `monitor_reward` the same among all
points; `none` the last one (the one at the stop, after a stop). Its adapters are written to `<ppo>/best/` at
each new best and loaded before the stage saves `policy/`. Without a monitor there is nothing to choose
among: the last policy is kept, unguarded, and the reason says so.

`Guards` is plain state (JSON in the PPO checkpoint) and decisions; it never touches a model.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from rlhf.ppo.roles import Roles, adapter_state, load_adapter_state
from rlhf.checks import KEEP_BEST  # noqa: F401 (re-exported: the choices live with the checks)
from rlhf.config import PPOGuards as GuardSpec  # what the guards read: the ppo.guards section itself

BEST_DIR = "best"


@dataclass
class Guards:
    spec: GuardSpec  # ppo.guards (rlhf.config.PPOGuards): the budget, the margin, the patience, keep_best
    kl_streak: int = 0
    degeneration_streak: int = 0
    baseline_repeat: float | None = None   # the SFT policy's greedy `repeat` (monitor at step 0)
    best_step: int | None = None
    best_score: float = -math.inf
    guarded_points: int = 0                # monitor points after step 0 within both guards
    stop_reason: str | None = None
    stop_step: int | None = None

    def after_step(self, step: int, kl: float) -> str | None:
        """Count the rollout KL against the budget; returns the stop reason when the run must stop."""
        b = self.spec.kl_budget
        self.kl_streak = self.kl_streak + 1 if b and b > 0 and kl > b else 0
        if self.kl_streak >= self.spec.patience and self.stop_reason is None:
            self._stop(step, f"rollout KL above the budget of {b:g} nats for {self.kl_streak} consecutive steps "
                             f"(last {kl:.2f}; ppo.guards.kl_budget): the policy left SFT faster than the reward "
                             f"justifies; raise ppo.kl.coef or set ppo.kl.adaptive=true with ppo.kl.target under the "
                             f"budget")
        return self.stop_reason

    def after_monitor(self, step: int, sampled_reward: float, greedy_repeat: float, kl_ok: bool) -> bool:
        """Record a monitor point; returns True when it is the new kept policy (its adapters must be saved).
        Step 0 (the SFT policy) sets the degeneration baseline."""
        if self.baseline_repeat is None:
            self.baseline_repeat = greedy_repeat
        margin = self.spec.degeneration_margin
        degenerate = margin is not None and greedy_repeat > self.baseline_repeat + margin
        self.degeneration_streak = self.degeneration_streak + 1 if degenerate else 0
        if self.degeneration_streak >= self.spec.patience and self.stop_reason is None:
            self._stop(step, f"greedy answers more repetitive than SFT's (repeat {greedy_repeat:.3f} vs "
                             f"{self.baseline_repeat:.3f} + margin {margin:g}) at {self.degeneration_streak} "
                             f"consecutive monitor points (ppo.guards.degeneration_margin): the reward pays for "
                             f"repeats; check the RM's repeat probe (rm/diagnostics.json), raise ppo.kl.coef")
        keep = self.spec.keep_best
        guarded = not degenerate and kl_ok
        self.guarded_points += step > 0 and guarded
        eligible = keep == "monitor_reward" or (keep == "monitor_reward_guarded" and guarded)
        if eligible and sampled_reward > self.best_score:
            self.best_step, self.best_score = step, sampled_reward
            return True
        return False

    def kept(self, last_step: int) -> tuple[int, str]:
        """The step whose policy the stage keeps, and why, in one line (DONE, the printout and the report).
        Step 0 is the SFT policy (the policy adapter before any update)."""
        stopped = f"stopped early at step {self.stop_step}: {self.stop_reason}; " if self.stop_reason else ""
        keep = self.spec.keep_best
        if keep == "none":
            return last_step, (f"{stopped}kept the last policy (step {last_step}) by ppo.guards.keep_best=none, "
                               f"unguarded")
        if self.best_step is None:
            return last_step, (f"{stopped}kept the last policy (step {last_step}), unguarded: no held-out monitor "
                               f"to choose among (ppo.monitor.every, ppo.monitor.prompts, ppo.eval_prompts_file)")
        if self.best_step == 0 and keep == "monitor_reward_guarded" and self.guarded_points == 0:
            return 0, (f"{stopped}kept SFT (step 0), no improvement: no monitor point after step 0 passed the "
                       f"guards (ppo.guards.keep_best={keep})")
        among = " among the points within the guards" if keep == "monitor_reward_guarded" else ""
        if self.best_step == 0:
            within = " within the guards" if keep == "monitor_reward_guarded" else ""
            return 0, (f"{stopped}kept SFT (step 0), no improvement: no later monitor point{within} scored above "
                       f"SFT's held-out RM score of sampled answers ({self.best_score:.3f}) "
                       f"(ppo.guards.keep_best={keep})")
        return self.best_step, (f"{stopped}kept the policy of step {self.best_step}: the best held-out RM score of "
                                f"sampled answers ({self.best_score:.3f}){among} (ppo.guards.keep_best={keep})")

    def _stop(self, step: int, reason: str) -> None:
        self.stop_reason, self.stop_step = reason, step

    def state_dict(self) -> dict:
        return {"kl_streak": self.kl_streak, "degeneration_streak": self.degeneration_streak,
                "baseline_repeat": self.baseline_repeat, "best_step": self.best_step,
                "best_score": self.best_score if math.isfinite(self.best_score) else None,
                "guarded_points": self.guarded_points, "stop_reason": self.stop_reason, "stop_step": self.stop_step}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        if self.best_score is None:
            self.best_score = -math.inf


def save_best(out: Path, step: int, roles: Roles) -> Path:
    """The adapters of the new kept policy: `<out>/best/step-<step>.safetensors` (written, then renamed)."""
    folder = out / BEST_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step}.safetensors"
    tmp = folder / f".tmp-step-{step}.safetensors"
    save_file(adapter_state(roles), str(tmp))
    tmp.replace(path)
    return path


def prune_best(out: Path, keep_step: int | None, upto: int | None = None) -> None:
    """Remove best snapshots other than `keep_step`: those older than it (no checkpoint refers to them once
    one that records `keep_step` is saved) and, after a resume from step `upto`, those newer than `upto`
    (a killed run wrote them; the resumed run writes them again)."""
    folder = out / BEST_DIR
    for path in folder.glob("*step-*.safetensors") if folder.is_dir() else []:
        s = int(path.stem.split("-")[-1])
        if path.name.startswith(".tmp") or (keep_step is not None and s < keep_step) or (upto is not None and s > upto):
            path.unlink()


def load_best(out: Path, step: int, roles: Roles) -> None:
    load_adapter_state(roles, load_file(str(out / BEST_DIR / f"step-{step}.safetensors")))


def remove_best(out: Path) -> None:
    shutil.rmtree(out / BEST_DIR, ignore_errors=True)
