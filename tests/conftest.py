"""Shared fixtures: the embedded demo (built once into data/demo/ if missing) and a finished SFT run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Any accidental hub download fails at once instead of hanging (there is no network here or in CI).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The demo's data and base model, as `make data` builds them (about 40 s the first time)."""
    if not (DEMO / "DONE").is_file():
        from rlhf.demo.build import build
        build(DEMO)
    return DEMO


def run_stage(stage: str, *overrides: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m stages.<stage> --config configs/demo.yaml ...` as a user would, from the repo root."""
    cmd = [sys.executable, "-m", f"stages.{stage}", "--config", str(DEMO_CONFIG), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


# RLHF_TEST_RUN=runs/demo: copy that run's finished SFT and RM stages (demo config as it ships; the stages are
# deterministic) instead of training them again, e.g. to run one slow test file on a loaded machine.
REUSE = os.environ.get("RLHF_TEST_RUN")


def _reuse(stage: str, run_dir: Path) -> bool:
    import shutil
    src = Path(REUSE or "") / stage
    if not REUSE or not (src / "DONE").is_file():
        return False
    shutil.copytree(src, run_dir / stage, ignore=shutil.ignore_patterns("checkpoints"))
    return True


@pytest.fixture(scope="session")
def sft_run(demo_dir, tmp_path_factory) -> Path:
    """A finished SFT stage on the demo, with the demo config as it ships (run directory in tmp)."""
    run_dir = tmp_path_factory.mktemp("run")
    if not _reuse("sft", run_dir):
        run_stage("sft", f"run_dir={run_dir}")
    return run_dir


@pytest.fixture(scope="session")
def rm_run(sft_run) -> Path:
    """The SFT run above plus a finished RM stage, demo config as it ships."""
    if not _reuse("rm", sft_run):
        run_stage("rm", f"run_dir={sft_run}")
    return sft_run


@pytest.fixture(scope="session")
def ppo_run(rm_run) -> Path:
    """The RM run above plus a finished PPO stage (100 steps, demo config as it ships)."""
    run_stage("ppo", f"run_dir={rm_run}")
    return rm_run


def run_make(target: str, run_dir: Path, config: Path = DEMO_CONFIG, args: str = "", **popen) -> list[str]:
    """The `make <target>` command line a user types, pointed at this interpreter and a test run dir
    (-o: the venv and the built demo count as up to date)."""
    return ["make", "-o", ".venv/.installed", "-o", "data/demo/DONE", "-o", "data/hh-tiny/DONE", target,
            f"PY={sys.executable}", f"CONFIG={config}", f"RUN={run_dir}", f"ARGS={args}"]


def kill_once_written(cmd: list[str], mark: Path, timeout: float = 300) -> None:
    """Start `cmd` in its own process group and SIGKILL the whole group (make and the stage under it, as
    Ctrl-C or a scheduler would) as soon as the file `mark` exists."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    while not mark.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert mark.exists(), f"{mark} was not written before the kill"
