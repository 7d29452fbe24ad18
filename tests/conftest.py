"""Shared fixtures: the embedded demo (built once into data/demo/ if missing) and finished SFT, RM and PPO runs.

`make test` runs the suite in several processes (pytest-xdist, `-n`): a session fixture that trains is built
once, by the first process that needs it, and shared by the others (`shared`); the tests of one family's
pipeline (tests/test_families.py) and the SLURM cluster tests stay together on one process (`--dist
loadgroup`).
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

# Any accidental hub download fails at once instead of hanging (there is no network here or in CI).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"


def shared(tmp_path_factory, name: str, build) -> Path:
    """`build(dir)` run once per test session, under a lock, into a directory that every pytest-xdist process
    of the session sees (their common base temp); later callers, in any process, get the finished directory."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' base temps are folders of one session directory
    out = root / name
    with FileLock(f"{out}.lock"):
        if not (out / ".built").is_file():
            shutil.rmtree(out, ignore_errors=True)  # what a process killed mid-build left
            out.mkdir(parents=True)
            build(out)
            (out / ".built").touch()
    return out


def pytest_collection_modifyitems(items):
    """One family's pipeline is built once (tests/test_families.py): its tests run on one xdist process. The
    SLURM cluster has one node: its tests take turns there; the 2-process runs build on each other."""
    for item in items:
        family = getattr(getattr(item, "callspec", None), "params", {}).get("family_run")
        if family is not None:
            item.add_marker(pytest.mark.xdist_group(f"family-{family}"))
        elif item.nodeid.startswith(("tests/test_slurm.py", "tests/test_distributed.py")):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))  # module fixtures built once


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The demo's data and base model, as `make data` builds them (seconds: the base is copied from data/demo-base/)."""
    with FileLock(f"{DEMO}.lock"):
        if not (DEMO / "DONE").is_file():
            from rlhf.demo.build import build
            build(DEMO)
    return DEMO


def run_stage(stage: str, *overrides: str, check: bool = True, timeout: int = 1500,
              config: Path = DEMO_CONFIG) -> subprocess.CompletedProcess:
    """Run `python -m stages.<stage> --config configs/demo.yaml ...` as a user would, from the repo root. The
    timeout catches a hung stage; it is generous because the demo's PPO (100 steps) shares 2 cores with the suite."""
    cmd = [sys.executable, "-m", f"stages.{stage}", "--config", str(config), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def run_on(previous: Path | None, stage: str, *overrides: str):
    """A `shared` builder: the finished stages of `previous` copied in, then `stage` run with the demo config."""
    def build(run_dir: Path) -> None:
        for done in (d for d in (previous.iterdir() if previous else []) if (d / "DONE").is_file()):
            shutil.copytree(done, run_dir / done.name)
        run_stage(stage, f"run_dir={run_dir}", *overrides)
    return build


@pytest.fixture(scope="session")
def sft_run(demo_dir, tmp_path_factory) -> Path:
    """A finished SFT stage on the demo, with the demo config as it ships (run directory in tmp)."""
    return shared(tmp_path_factory, "sft-run", run_on(None, "sft"))


@pytest.fixture(scope="session")
def rm_run(sft_run, tmp_path_factory) -> Path:
    """The SFT run above (copied) plus a finished RM stage, demo config as it ships but for at most 2 epochs
    (the shipped maximum of 8 with early stopping trains 5 on the demo, for the same held-out accuracy: 0.995;
    the suite keeps the shorter run, ~6 minutes of one core less on its critical path)."""
    return shared(tmp_path_factory, "rm-run", run_on(sft_run, "rm", "rm.train.epochs=2"))


@pytest.fixture(scope="session")
def ppo_run(rm_run, tmp_path_factory) -> Path:
    """The RM run above (copied) plus a finished PPO stage (100 steps, demo config as it ships)."""
    return shared(tmp_path_factory, "ppo-run", run_on(rm_run, "ppo"))


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
