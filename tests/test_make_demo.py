"""The demo's chain runs each evaluation once: where `make eval` follows, PPO skips its own end-of-run comparison."""

import os
import subprocess
from pathlib import Path

import pytest

from rlhf.config import load_config

ROOT = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}


def ppo_line(*args: str) -> str:
    out = subprocess.run(["make", "-n", "--no-print-directory", "-o", ".venv/.installed", "-o", "data/demo/DONE",
                          "RUN=/nonexistent/run", "PY=python", *args], cwd=ROOT, capture_output=True, text=True,
                         check=True, env=ENV).stdout
    lines = [line for line in out.splitlines() if "stages.ppo" in line]
    assert len(lines) == 1, out
    return lines[0]


@pytest.mark.parametrize("goal", ["demo", "all", "eval", "report"])
def test_ppo_leaves_the_comparison_to_eval_when_eval_follows(goal):
    assert ppo_line(goal).split()[-1] == "ppo.eval_samples=0"
    assert "ppo.eval_samples=0" in ppo_line(goal, "LAUNCHER=accelerate")


def test_ppo_alone_keeps_its_comparison_and_args_win():
    assert "eval_samples" not in ppo_line("ppo")
    assert ppo_line("demo", "ARGS=ppo.eval_samples=50").split()[-2:] == ["ppo.eval_samples=0", "ppo.eval_samples=50"]
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["ppo.eval_samples=0", "ppo.eval_samples=50"])
    assert cfg.ppo.eval_samples == 50  # the later override


def test_the_demo_starts_each_stage_once():
    """eval writes the report: `make demo` does not start a `report` process to draw it a second time."""
    out = subprocess.run(["make", "-n", "--no-print-directory", "-o", ".venv/.installed", "-o", "data/demo/DONE",
                          "RUN=/nonexistent/run", "PY=python", "demo"], cwd=ROOT, capture_output=True, text=True,
                         check=True, env=ENV).stdout
    assert [line.split()[2] for line in out.splitlines() if "-m stages." in line] == [
        "stages.sft", "stages.rm", "stages.ppo", "stages.eval"]


def test_the_real_model_demo_prepares_the_model_once_and_runs_each_stage_once(tmp_path):
    """`make demo-real`: the model and the task's files are built when missing; a built model is never rebuilt
    (it is an order-only prerequisite: a newer rlhf or venv must not retrain the stages after it)."""
    def dry(*args):
        return subprocess.run(["make", "-n", "--no-print-directory", "-o", ".venv/.installed", "RUN=/nonexistent/run",
                               "PY=python", *args], cwd=ROOT, capture_output=True, text=True, check=True, env=ENV).stdout
    lines = [line for line in dry("demo-real", "-W", "data/smollm2-135m-instruct/DONE").splitlines()
             if "python" in line and "make" not in line]
    stages = [line.split()[2] for line in lines if "-m stages." in line]
    assert stages == ["stages.sft", "stages.rm", "stages.ppo", "stages.eval"]
    assert all("configs/smollm2-instruct.yaml" in line for line in lines if "-m stages." in line)
    rules = dry("-p", "model-smollm2").splitlines()  # -n: whether or not the model is built
    assert "data/smollm2-135m-instruct/DONE: | .venv/.installed" in rules  # no normal prerequisite: never rebuilt
