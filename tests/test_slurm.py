"""LAUNCHER=slurm: job scripts rendered from the config, afterok chains, preemption and requeue.

The fast tests render and chain with stand-in sbatch/squeue commands. The slow ones need a real cluster:
the one-node cluster of scripts/slurm-local-cluster.sh, which the fixture sets up when run as root (as CI
does) and otherwise skips with the reason."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import DEMO_CONFIG, ROOT, run_make, small_demo_files, small_file_args
from rlhf.config import ConfigError, load_config
from rlhf.runs import read_metrics
from rlhf.slurm import main as slurm_main
from rlhf.slurm import plan, render, slurm_time, submit_chain

# the local cluster has one node: its tests take turns on one process, started early (minutes)
pytestmark = [pytest.mark.xdist_group("slurm"), pytest.mark.early(1)]

SETUP = ROOT / "scripts" / "slurm-local-cluster.sh"


def cfg_with(*overrides: str, run_dir: Path = Path("runs/x")):
    return load_config(DEMO_CONFIG, [f"run_dir={run_dir}", *overrides])


def script_of(tmp_path, stage="ppo", *overrides) -> str:
    cfg = cfg_with(*overrides, run_dir=tmp_path / "run")
    text = render(cfg, stage, tmp_path / "slurm" / "config.yaml", tmp_path / "slurm", ROOT, python="/venv/bin/python")
    path = tmp_path / f"{stage}.sbatch"
    path.write_text(text)
    subprocess.run(["bash", "-n", str(path)], check=True)  # the rendered script is valid bash
    return text


# --- fast: rendering ----------------------------------------------------------------------------------------

def test_job_script_carries_the_config_sbatch_options(tmp_path):
    text = script_of(tmp_path, "ppo", "slurm.partition=gpu", "slurm.account=proj1", "slurm.time=2h",
                     "slurm.gpus_per_node=1", "slurm.cpus_per_task=8", "slurm.mem=64G",
                     "slurm.extra=[--constraint=a100,--exclusive]", "slurm.setup=[module load cuda]")
    for line in ("#SBATCH --job-name=rlhf-ppo", "#SBATCH --partition=gpu", "#SBATCH --account=proj1",
                 "#SBATCH --time=0-02:00:00", "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mem=64G", "#SBATCH --constraint=a100", "#SBATCH --exclusive", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@300", "#SBATCH --open-mode=append", f"#SBATCH --chdir={ROOT}",
                 f"#SBATCH --output={tmp_path / 'slurm' / 'ppo'}-%j.out", "module load cuda",
                 f"exec /venv/bin/python -m stages.ppo --config {tmp_path / 'slurm' / 'config.yaml'}"):
        assert line in text, line
    assert "accelerate" not in text  # one process: the stage itself, no launcher


def test_per_stage_settings_and_multi_node_accelerate_launch(tmp_path):
    overrides = ("slurm.time=1d", "slurm.nodes=2", "slurm.gpus_per_node=4", "slurm.accelerate_config=configs/accelerate/ddp.yaml",
                 "slurm.stages={ppo: {time: 12h, nodes: 1}}", "slurm.requeue=false", "slurm.signal_grace_s=0")
    sft = script_of(tmp_path, "sft", *overrides)
    assert "#SBATCH --nodes=2" in sft and "#SBATCH --time=1-00:00:00" in sft and "--no-requeue" in sft
    assert "#SBATCH --signal" not in sft
    for part in ("-m accelerate.commands.launch", f"--config_file {ROOT / 'configs/accelerate/ddp.yaml'}",
                 "--num_machines 2", "--num_processes 8", '--machine_rank "$SLURM_NODEID"',
                 '--main_process_ip "$MAIN_PROCESS_IP"', "--main_process_port 29500", "-m stages.sft"):
        assert part in sft, part
    ppo = script_of(tmp_path, "ppo", *overrides)
    assert "#SBATCH --nodes=1" in ppo and "#SBATCH --time=0-12:00:00" in ppo and "--num_machines 1" in ppo


def test_times_in_units_or_quoted_slurm_format_and_bare_numbers_refused(tmp_path):
    assert slurm_time("2h", "t") == "0-02:00:00" and slurm_time("1d12h30m", "t") == "1-12:30:00"
    assert slurm_time("4:00:00", "t") == "4:00:00" and slurm_time("2-00:00:00", "t") == "2-00:00:00"
    with pytest.raises(ConfigError, match="ambiguous"):
        slurm_time("7200", "slurm.time")
    bad = tmp_path / "bad.yaml"
    bad.write_text("slurm:\n  time: 2:00:00\n")  # YAML reads this as 7200 (seconds, base 60)
    with pytest.raises(ConfigError, match=r"slurm.time: '7200' is ambiguous"):
        render(load_config(bad), "sft", tmp_path / "c.yaml", tmp_path, ROOT)
    with pytest.raises(ConfigError, match=r"slurm.stages.ppo.bogus: unknown key"):
        script_of(tmp_path, "ppo", "slurm.stages={ppo: {bogus: 1}}")
    with pytest.raises(ConfigError, match=r"slurm.stages: unknown stage"):
        script_of(tmp_path, "ppo", "slurm.stages={pop: {time: 1h}}")


# --- fast: chaining, with stand-ins for sbatch and squeue ------------------------------------------------------

@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch that records its arguments and answers job ids 101, 102, ...; squeue that says PENDING for the
    ids listed in queued.txt."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f"""#!/bin/bash
n=$(( $(cat {tmp_path}/calls.txt 2>/dev/null | wc -l) + 101 ))
echo "$@" >> {tmp_path}/calls.txt
echo "$n;local"
""")
    (bin_dir / "squeue").write_text(f"""#!/bin/bash
grep -qx "$3" {tmp_path}/queued.txt 2>/dev/null && echo PENDING
exit 0
""")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return tmp_path


def test_chain_skips_finished_stages_and_links_the_rest_with_afterok(fake_slurm):
    run = fake_slurm / "run"
    (run / "sft").mkdir(parents=True)
    (run / "sft" / "DONE").write_text("{}")
    cfg = cfg_with(run_dir=run)
    assert plan(cfg, "eval") == ["rm", "ppo", "eval"]
    jobs = submit_chain(cfg, "eval")
    assert [(j.stage, j.job_id, j.after) for j in jobs] == [("rm", "101", None), ("ppo", "102", "101"),
                                                            ("eval", "103", "102")]
    calls = (fake_slurm / "calls.txt").read_text().splitlines()
    assert calls[0] == f"--parsable {run / 'slurm' / 'rm.sbatch'}"
    assert calls[1] == f"--parsable --dependency=afterok:101 --kill-on-invalid-dep=yes {run / 'slurm' / 'ppo.sbatch'}"
    assert [r["job_id"] for r in json.loads((run / "slurm" / "jobs.json").read_text())] == ["101", "102", "103"]
    saved = load_config(run / "slurm" / "config.yaml")  # what every job reads
    assert saved.run_dir == str(run)

    # Submitting again while rm and ppo are still queued keeps those jobs and only adds what is missing.
    (fake_slurm / "queued.txt").write_text("101\n102\n")
    again = submit_chain(cfg, "eval")
    assert [(j.stage, j.job_id, j.after) for j in again] == [("eval", "104", "102")]


def test_relative_overrides_are_refused_for_a_chain_before_anything_is_submitted(fake_slurm, capsys):
    run = fake_slurm / "run"
    code = slurm_main(["--config", str(DEMO_CONFIG), "--until", "ppo", f"run_dir={run}", "lora.r=8"])
    assert code == 2
    assert "overrides ['lora.r=8'] are relative to a stage, but 3 stages are submitted" in capsys.readouterr().err
    assert not (fake_slurm / "calls.txt").exists()
    code = slurm_main(["--config", str(DEMO_CONFIG), "--until", "sft", f"run_dir={run}", "lora.r=8"])
    assert code == 0 and load_config(run / "slurm" / "config.yaml").sft.lora.r == 8


def test_make_all_launcher_slurm_dry_run_prints_the_chain_and_submits_nothing(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(run_make("all", run) + ["LAUNCHER=slurm", "SLURM_FLAGS=--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    for stage in ("sft", "rm", "ppo", "eval"):
        assert f"# ---- {run / 'slurm' / stage}.sbatch (not submitted: --dry-run) ----" in proc.stdout
        assert f"-m stages.{stage} --config" in proc.stdout
    # then the chain it would submit, in order, each job waiting for the previous one
    chain = proc.stdout.split("# ---- the sbatch commands, in order (not submitted: --dry-run) ----\n")[1].splitlines()
    slurm_dir = run / "slurm"
    assert chain[:4] == [
        f"SFT_JOB=$(sbatch --parsable {slurm_dir}/sft.sbatch)",
        f"RM_JOB=$(sbatch --parsable --dependency=afterok:$SFT_JOB --kill-on-invalid-dep=yes {slurm_dir}/rm.sbatch)",
        f"PPO_JOB=$(sbatch --parsable --dependency=afterok:$RM_JOB --kill-on-invalid-dep=yes {slurm_dir}/ppo.sbatch)",
        f"EVAL_JOB=$(sbatch --parsable --dependency=afterok:$PPO_JOB --kill-on-invalid-dep=yes {slurm_dir}/eval.sbatch)"]
    assert not run.exists()


# --- slow: a real one-node cluster --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm_cluster():
    if subprocess.run([str(SETUP), "--check"], capture_output=True).returncode == 0:
        return
    if os.geteuid() != 0:
        pytest.skip("no SLURM cluster answers and this is not root, so scripts/slurm-local-cluster.sh cannot set "
                    "one up here (CI runs it as root)")
    if not shutil.which("apt-get") and not shutil.which("slurmctld"):
        pytest.skip("no apt-get to install slurmctld/slurmd/munge, and no SLURM installed")
    proc = subprocess.run([str(SETUP)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"setting up the local SLURM cluster failed:\n{proc.stdout}\n{proc.stderr}"


def job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "GONE")


def job_field(job_id: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return next((w.split("=", 1)[1] for w in out.split() if w.startswith(f"{field}=")), "")


def cluster_state(job_id: str | None) -> str:
    """What to show when a wait times out: the queue, the job's state and reason, the end of its log."""
    parts = [subprocess.run(["squeue"], capture_output=True, text=True).stdout]
    if job_id:
        parts.append(f"job {job_id}: {job_state(job_id)}, reason {job_field(job_id, 'Reason')}")
        log = job_field(job_id, "StdOut")
        if log and Path(log).is_file():
            parts.append(Path(log).read_text()[-3000:])
    return "\n".join(parts)


def wait_for(predicate, what: str, timeout: float = 600, every: float = 0.2, job: str | None = None):
    """Poll `predicate` until it is true. With `job`, a requeued job left pending (held after a launch that
    slurmd refused, or waiting out the requeue delay) is released and started again on each poll."""
    deadline, nudged = time.time() + timeout, 0.0
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if job and time.time() - nudged > 5:
            nudge(job)
            nudged = time.time()
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}\n{cluster_state(job)}")


def node_idle() -> bool:
    return subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.strip() == "idle"


def nudge(job_id: str) -> None:
    """A pending job that SLURM held (`launch failed requeued held`: slurmd refuses a credential issued in the
    second it revoked the old one, "Job credential revoked") is released; one waiting out the requeue delay
    (two minutes) is started now, once the node is free of its previous run."""
    if job_state(job_id) != "PENDING":
        return
    reason = job_field(job_id, "Reason")
    if "held" in reason.lower() or job_field(job_id, "Priority") == "0":
        subprocess.run(["scontrol", "release", job_id], capture_output=True)
    elif reason != "BeginTime":  # waiting on a dependency or its turn: leave it to the scheduler
        return
    if node_idle():
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)


def start_now_if_pending(job_id: str) -> None:
    """Wait until a requeued job is back in the queue, then start it now rather than after SLURM's two-minute
    requeue delay, a few seconds after the node is free of its previous run (see `nudge`)."""
    wait_for(lambda: job_state(job_id) == "PENDING", f"job {job_id} back in the queue", timeout=120)
    wait_for(node_idle, "the node to be idle", timeout=120, job=None)
    time.sleep(3)
    nudge(job_id)


def jobs_of(run: Path) -> dict[str, str]:
    return {r["stage"]: r["job_id"] for r in json.loads((run / "slurm" / "jobs.json").read_text())}


def checkpoints(stage_dir: Path) -> int:
    ckpts = [int(p.name.split("-")[1]) for p in (stage_dir / "checkpoints").glob("checkpoint-*")
             if (p / "state.json").exists()] if (stage_dir / "checkpoints").is_dir() else []
    return max(ckpts, default=0)


def chain_args(files: dict[str, str]) -> str:
    """A short chain on the first rows of the demo's files (each job tokenizes and scores its whole files)."""
    return (" ".join(small_file_args(files, "sft", "rm", "ppo"))
            + " sft.train.max_steps=10 rm.train.max_steps=10 ppo.steps=12 ppo.sampling.rollout_batch_size=16 "
            "ppo.update.num_minibatches=2 ppo.update.epochs=2 ppo.checkpoint.every=1 ppo.reward.norm_samples=16 ppo.eval_samples=8 "
            "ppo.monitor.every=0 ppo.guards.kl_budget=0 slurm.cpus_per_task=2 slurm.time=30m")
# The RM of 10 steps is weak: PPO exploits it and its KL can pass the guard's 6-nat budget, which would end the
# run before the requeues this test makes. The test is about requeue and resume, so the
# run has no KL budget and no held-out monitor.


@pytest.mark.slow
def test_demo_chain_on_a_real_cluster_survives_requeue_and_scancel(slurm_cluster, demo_dir, tmp_path):
    """`make ppo LAUNCHER=slurm` submits SFT -> RM -> PPO with afterok; the PPO job is then
    1. requeued by SLURM (`scontrol requeue`: SIGTERM, then back to the queue), as a preemption would;
    2. cancelled (`scancel`): it checkpoints and stops; `make ppo LAUNCHER=slurm` again submits PPO alone;
    and every time it resumes from its checkpoint, to a complete run of 12 steps. (The time-limit warning,
    SIGUSR1 to the batch script, which requeues the job itself: the 2-process test below.)"""
    run = tmp_path / "run"
    make = run_make("ppo", run, args=chain_args(small_demo_files(demo_dir, tmp_path / "data"))) + ["LAUNCHER=slurm"]
    subprocess.run(make, cwd=ROOT, check=True, capture_output=True, text=True)
    jobs = jobs_of(run)
    assert list(jobs) == ["sft", "rm", "ppo"]
    ppo, ppo_dir = jobs["ppo"], run / "ppo"

    # 1. preempted and requeued by the scheduler
    at = wait_for(lambda: checkpoints(ppo_dir) >= 2 and checkpoints(ppo_dir), "ppo checkpoint 2", timeout=900,
                  job=ppo)
    subprocess.run(["scontrol", "requeue", ppo], check=True, capture_output=True)
    start_now_if_pending(ppo)
    # 2. cancelled: the stage checkpoints and stops; the user submits again
    wait_for(lambda: checkpoints(ppo_dir) >= at + 3, "ppo to go on after the requeue", timeout=600, job=ppo)
    subprocess.run(["scancel", ppo], check=True, capture_output=True)
    wait_for(lambda: job_state(ppo) in ("CANCELLED", "GONE") and (ppo_dir / "PREEMPTED").exists(),
             "the cancelled ppo job to checkpoint and end", timeout=120)
    assert not (ppo_dir / "DONE").exists()
    resubmitted = subprocess.run(make, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    assert "[slurm] ppo: job" in resubmitted and "[slurm] sft" not in resubmitted  # only the unfinished stage
    last = jobs_of(run)["ppo"]
    assert last != ppo
    wait_for(lambda: job_state(last) in ("COMPLETED", "FAILED", "CANCELLED", "GONE"), "the last ppo job",
             timeout=900, job=last)

    for stage in ("sft", "rm", "ppo"):
        assert (run / stage / "DONE").exists(), (run / "slurm").glob(f"{stage}-*.out")
    log = (run / "slurm" / f"ppo-{ppo}.out").read_text()
    assert "restart 1" in log, log[-3000:]
    assert log.count("[ppo] resuming from") == 1, log[-3000:]
    assert "[ppo] resuming from" in (run / "slurm" / f"ppo-{last}.out").read_text()
    assert [r["step"] for r in read_metrics(ppo_dir / "metrics.jsonl") if "ppo/kl" in r] == list(range(1, 13))
    assert json.loads((ppo_dir / "DONE").read_text())["steps"] == 12


@pytest.mark.slow
def test_two_process_ppo_job_stops_together_on_the_time_limit_signal_and_resumes(slurm_cluster, rm_run, demo_dir,
                                                                                tmp_path):
    """PPO as 2 processes under `accelerate launch` inside the job: the launcher ignores SIGUSR1, both stage
    processes get it from the batch script, agree on the step, save one checkpoint, and the requeued job
    resumes with 2 processes again."""
    run = tmp_path / "run"
    for stage in ("sft", "rm"):
        shutil.copytree(rm_run / stage, run / stage)
    f = small_demo_files(demo_dir, tmp_path / "data")
    args = (" ".join(small_file_args(f, "ppo"))
            + " ppo.steps=8 ppo.sampling.rollout_batch_size=16 ppo.update.num_minibatches=2 ppo.update.epochs=2 ppo.checkpoint.every=100 "
            "ppo.reward.norm_samples=16 ppo.eval_samples=8 ppo.monitor.prompts=8 slurm.processes_per_node=2 "
            "slurm.accelerate_config=configs/accelerate/cpu-2proc.yaml")
    subprocess.run(run_make("ppo", run, args=args) + ["LAUNCHER=slurm"], cwd=ROOT, check=True, capture_output=True)
    job = jobs_of(run)["ppo"]
    metrics = run / "ppo" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(read_metrics(metrics)) >= 3, "3 ppo steps", timeout=600, job=job)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, capture_output=True)
    start_now_if_pending(job)
    wait_for(lambda: job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "GONE"), "the ppo job",
             timeout=900, job=job)

    log = (run / "slurm" / f"ppo-{job}.out").read_text()
    assert (run / "ppo" / "DONE").exists(), log[-3000:]
    assert "SIGUSR1: asking the stage to checkpoint and stop" in log and "requeueing job" in log, log[-3000:]
    assert log.count("received SIGUSR1") == 2, log[-3000:]  # both processes
    assert "restart 1" in log and "[ppo] resuming from" in log and "(8 per process, 2 processes)" in log
    assert "2 processes hold identical trained weights" in log
    assert [r["step"] for r in read_metrics(metrics)] == list(range(0, 9))  # 0: the monitor on the SFT policy
