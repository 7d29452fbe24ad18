"""SLURM: each stage as an sbatch job rendered from the same config, the pipeline as a chain of jobs.

    python -m rlhf.slurm --config configs/x.yaml --until ppo [--dry-run] [key=value ...]
    (what `make ppo LAUNCHER=slurm` runs; `make all LAUNCHER=slurm` is --until eval)

submits every stage up to `--until` that is not finished yet (no DONE) and not already queued by an earlier
submission, each job after the previous one (`--dependency=afterok`, `--kill-on-invalid-dep=yes`). The
config and the overrides are resolved and checked here, before anything is submitted, and saved as
`<log_dir>/config.yaml`, which every job of the chain reads: editing the config later changes nothing
under way. Scripts, logs (`<stage>-<jobid>.out`, appended across requeues) and `jobs.json` go to
`<log_dir>` (default `<run_dir>/slurm`).

A job runs its stage once per node with `srun`; with more than one process in all the stage runs under
`accelerate launch`, with the machine count, the node's rank and the main node's address taken from SLURM's
variables. Preemption (rlhf/preempt.py): the job asks for SIGUSR1 `signal_grace_s` before its time limit
(`--signal=B:USR1@...`); the batch script passes it to the stage (the launchers between ignore it), the
stage saves a checkpoint and exits, and the script requeues the job (`--requeue`), which resumes. SIGTERM
(scancel, `scontrol requeue`, preemption by the scheduler) reaches the stage directly: it checkpoints and
stops, and the scheduler decides whether the job comes back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf.config import SLURM_STAGES, ConfigError, PipelineConfig, SlurmConfig, load_config, to_yaml
from rlhf.runs import is_done

_DURATION = re.compile(r"^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def slurm_time(value, where: str) -> str:
    """A --time value: SLURM's own formats ("2:00:00", "1-12:00:00", quoted in YAML) or units ("2h", "1d12h",
    "90m"). A bare number is refused: YAML reads an unquoted 2:00:00 as 7200 (seconds, base 60), and SLURM
    would read 7200 as minutes."""
    text = str(value).strip()
    if re.fullmatch(r"\d+", text):
        raise ConfigError(f"{where}: {text!r} is ambiguous: give units ('2h', '90m', '1d12h') or SLURM's format in "
                          f"quotes ('\"2:00:00\"'); YAML reads an unquoted 2:00:00 as 7200 seconds")
    m = _DURATION.match(text)
    if m and any(m.groups()):
        d, h, mi, s = (int(g or 0) for g in m.groups())
        total = ((d * 24 + h) * 60 + mi) * 60 + s
        d, rest = divmod(total, 86400)
        return f"{d}-{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    if re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}|\d+-\d+|UNLIMITED|INFINITE", text):
        return text
    raise ConfigError(f"{where}: {text!r} is not a time: e.g. '2h', '1d12h', '\"4:00:00\"', '\"2-00:00:00\"'")


def for_stage(s: SlurmConfig, stage: str) -> SlurmConfig:
    """The job settings of one stage: the slurm section with its `stages.<stage>` changes applied, checked."""
    fields = {f.name: f for f in dataclasses.fields(SlurmConfig) if f.name != "stages"}
    unknown_stages = set(s.stages) - set(SLURM_STAGES)
    if unknown_stages:
        raise ConfigError(f"slurm.stages: unknown stage(s) {sorted(unknown_stages)}; stages: {list(SLURM_STAGES)}")
    changes = dict(s.stages.get(stage) or {})
    for key, value in changes.items():
        if key not in fields:
            raise ConfigError(f"slurm.stages.{stage}.{key}: unknown key; keys: {sorted(fields)}")
        kind = str(fields[key].type)
        if kind.startswith("int") and not (isinstance(value, int) or (value is None and "None" in kind)):
            raise ConfigError(f"slurm.stages.{stage}.{key}: expected an integer, got {value!r}")
    out = dataclasses.replace(s, **changes, stages={})
    out.time = slurm_time(out.time, f"slurm.stages.{stage}.time" if "time" in changes else "slurm.time")
    for key in ("nodes", "main_port"):
        if getattr(out, key) < 1:
            raise ConfigError(f"slurm.{key} must be at least 1, got {getattr(out, key)}")
    if out.gpus_per_node < 0 or (out.processes_per_node is not None and out.processes_per_node < 1):
        raise ConfigError("slurm.gpus_per_node must be >= 0 and slurm.processes_per_node >= 1")
    if out.accelerate_config and not Path(out.accelerate_config).is_file():
        raise ConfigError(f"slurm.accelerate_config: file not found: {out.accelerate_config}")
    return out


def processes_per_node(j: SlurmConfig) -> int:
    return j.processes_per_node or j.gpus_per_node or 1


def stage_command(j: SlurmConfig, stage: str, config_file: Path, python: str) -> str:
    """The command every node runs: the stage itself, or `accelerate launch` of it for several processes.
    $SLURM_NODEID and $MAIN_PROCESS_IP are left for the node's shell to expand."""
    stage_args = f"-m stages.{stage} --config {shlex.quote(str(config_file))}"
    per_node = processes_per_node(j)
    if j.nodes * per_node == 1:
        return f"{shlex.quote(python)} {stage_args}"
    launch = [shlex.quote(python), "-m accelerate.commands.launch"]
    if j.accelerate_config:
        launch.append(f"--config_file {shlex.quote(str(Path(j.accelerate_config).absolute()))}")
    elif j.gpus_per_node:
        launch.append("--multi_gpu")
    launch += [f"--num_machines {j.nodes}", f"--num_processes {j.nodes * per_node}",
               '--machine_rank "$SLURM_NODEID"', '--main_process_ip "$MAIN_PROCESS_IP"',
               f"--main_process_port {j.main_port}", stage_args]
    return " \\\n        ".join(launch)


def render(cfg: PipelineConfig, stage: str, config_file: Path, log_dir: Path, workdir: Path,
           python: str | None = None) -> str:
    """The sbatch script of one stage."""
    j = for_stage(cfg.slurm, stage)
    python = j.python or python or sys.executable
    opts = [f"--job-name={j.job_name}-{stage}", f"--nodes={j.nodes}", "--ntasks-per-node=1", f"--time={j.time}",
            f"--output={log_dir / stage}-%j.out", "--open-mode=append", f"--chdir={workdir}"]
    if j.gpus_per_node:
        opts.append(f"--gpus-per-node={j.gpus_per_node}")
    opts += [f"--cpus-per-task={j.cpus_per_task}"] if j.cpus_per_task else []
    opts += [f"--mem={j.mem}"] if j.mem else []
    opts += [f"--{k}={getattr(j, k)}" for k in ("partition", "account", "qos") if getattr(j, k)]
    opts += ["--requeue"] if j.requeue else ["--no-requeue"]
    opts += [f"--signal=B:USR1@{j.signal_grace_s}"] if j.signal_grace_s > 0 else []
    opts += list(j.extra)
    stage_dir = Path(cfg.run_dir) / stage
    header = ["#!/bin/bash", *(f"#SBATCH {o}" for o in opts),
              f"# rlhf {stage} stage, rendered by `python -m rlhf.slurm` on {time.strftime('%Y-%m-%d %H:%M:%S')}",
              f"# from {config_file} ({processes_per_node(j)} process(es) per node on {j.nodes} node(s)).",
              "set -uo pipefail", *j.setup]
    body = (JOB_BODY.replace("@STAGE_DIR@", shlex.quote(str(stage_dir))).replace("@REQUEUE@", str(int(j.requeue)))
            .replace("@COMMAND@", stage_command(j, stage, config_file, python)))
    return "\n".join(header) + "\n" + body


# The job after its #SBATCH header and setup lines (@...@ are filled in by `render`).
JOB_BODY = """STAGE_DIR=@STAGE_DIR@
echo "[slurm] job $SLURM_JOB_ID ($SLURM_JOB_NAME), restart ${SLURM_RESTART_COUNT:-0}, nodes $SLURM_JOB_NODELIST, $(date '+%F %T')"
export MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# SIGUSR1 before the time limit: the stage checkpoints and stops; then the job is requeued.
# SIGTERM (scancel, scontrol requeue, preemption) reaches the stage from SLURM itself.
requeue=0
on_usr1() {
    echo "[slurm] SIGUSR1: asking the stage to checkpoint and stop"; requeue=@REQUEUE@
    scancel --signal=USR1 "$SLURM_JOB_ID"  # every process of the job steps (not this script)
}
trap on_usr1 USR1
trap 'echo "[slurm] SIGTERM: the stage checkpoints and stops"' TERM

# once per node; the launchers ignore SIGUSR1, the stage's processes catch it
node_task() {
    trap '' USR1
    exec @COMMAND@
}
export -f node_task
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c node_task &
pid=$!
while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done  # a trapped signal interrupts wait
wait "$pid"; rc=$?

if [ -f "$STAGE_DIR/DONE" ]; then echo "[slurm] $STAGE_DIR finished"; exit 0; fi
if [ "$requeue" = 1 ]; then
    echo "[slurm] requeueing job $SLURM_JOB_ID; it resumes from the last checkpoint"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
fi
echo "[slurm] $STAGE_DIR did not finish (exit $rc)"
exit $(( rc == 0 ? 1 : rc ))
"""


@dataclass
class Submitted:
    stage: str
    job_id: str
    script: str
    after: str | None
    submitted: str


def queued_jobs(history: list[dict]) -> dict[str, str]:
    """Stages whose job from an earlier submission (`jobs.json`) is still pending or running: stage -> job id."""
    out = {}
    for rec in history:
        state = subprocess.run(["squeue", "-h", "-j", rec["job_id"], "-o", "%T"], capture_output=True, text=True)
        if state.returncode == 0 and state.stdout.strip() in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED",
                                                               "COMPLETING", "SUSPENDED", "REQUEUE_HOLD"):
            out[rec["stage"]] = rec["job_id"]
    return out


def plan(cfg: PipelineConfig, until: str) -> list[str]:
    """The stages to submit: every stage up to `until` that has not finished."""
    if until not in SLURM_STAGES:
        raise ConfigError(f"unknown stage {until!r}; stages: {list(SLURM_STAGES)}")
    upto = SLURM_STAGES[:SLURM_STAGES.index(until) + 1]
    return [s for s in upto if not is_done(Path(cfg.run_dir) / s)]


def sbatch_command(sbatch: str, after: str | None) -> list[str]:
    """sbatch's arguments for one job of the chain; `after`: the job id it waits for (afterok), if any."""
    cmd = [sbatch, "--parsable"]
    if after:
        cmd += [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"]
    return cmd


def dry_run_chain(stages: list[str], log_dir: Path, sbatch: str = "sbatch") -> str:
    """The submissions as shell lines, each job id kept in a variable ($SFT_JOB, ...) the next one waits for."""
    lines, previous = [], None
    for s in stages:
        var = f"{s.upper()}_JOB"
        cmd = sbatch_command(sbatch, f"${previous}" if previous else None) + [str(log_dir / f"{s}.sbatch")]
        lines.append(f"{var}=$({' '.join(c if c.startswith('--') else shlex.quote(c) for c in cmd)})")
        previous = var
    return "\n".join(lines)


def submit_chain(cfg: PipelineConfig, until: str, dry_run: bool = False, sbatch: str = "sbatch",
                 out=sys.stdout) -> list[Submitted]:
    log_dir = Path(cfg.slurm.log_dir or Path(cfg.run_dir) / "slurm").absolute()
    workdir = Path.cwd()
    stages = plan(cfg, until)
    if not stages:
        print(f"[slurm] nothing to submit: every stage up to {until} has finished in {cfg.run_dir}", file=out)
        return []
    config_file = log_dir / "config.yaml"
    scripts = {s: render(cfg, s, config_file, log_dir, workdir) for s in stages}  # all checked before submitting
    if dry_run:
        for s in stages:
            print(f"# ---- {log_dir / s}.sbatch (not submitted: --dry-run) ----\n{scripts[s]}", file=out)
        print("# ---- the sbatch commands, in order (not submitted: --dry-run) ----", file=out)
        print(dry_run_chain(stages, log_dir, sbatch), file=out)
        return []

    log_dir.mkdir(parents=True, exist_ok=True)
    tmp = config_file.with_suffix(".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(config_file)
    history = json.loads((log_dir / "jobs.json").read_text()) if (log_dir / "jobs.json").is_file() else []
    queued = queued_jobs(history)
    done, previous = [], None
    for s in stages:
        if s in queued:
            print(f"[slurm] {s}: job {queued[s]} from an earlier submission is still queued; keeping it", file=out)
            previous = queued[s]
            continue
        script = log_dir / f"{s}.sbatch"
        script.write_text(scripts[s])
        cmd = sbatch_command(sbatch, previous)
        result = subprocess.run(cmd + [str(script)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed for the {s} stage ({' '.join(cmd)} {script}):\n{result.stderr.strip()}")
        job_id = result.stdout.strip().split(";")[0]
        rec = Submitted(s, job_id, str(script), previous, time.strftime("%Y-%m-%dT%H:%M:%S"))
        done.append(rec)
        history.append(dataclasses.asdict(rec))
        (log_dir / "jobs.json").write_text(json.dumps(history, indent=2) + "\n")
        print(f"[slurm] {s}: job {job_id}" + (f" (after {previous})" if previous else "")
              + f", log {log_dir / s}-{job_id}.out", file=out)
        previous = job_id
    if done:
        ids = " ".join(r.job_id for r in done)
        print(f"[slurm] watch: squeue -j {ids.replace(' ', ',')}   cancel: scancel {ids}", file=out)
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf.slurm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (see configs/)")
    parser.add_argument("--until", default="eval", choices=SLURM_STAGES,
                        help="the last stage to submit; the unfinished ones before it are submitted too")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the job scripts and the sbatch command lines; submit nothing")
    parser.add_argument("--sbatch", default="sbatch", help="the sbatch command (default: sbatch)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="absolute keys (sft.lora.r=8); relative ones (lora.r=8) only when one stage is submitted")
    args = parser.parse_args(argv)
    top = {f.name for f in dataclasses.fields(PipelineConfig)}
    relative = [o for o in args.overrides if o.split("=", 1)[0].split(".")[0] not in top]
    try:
        cfg = load_config(args.config, [o for o in args.overrides if o not in relative])
        stages = plan(cfg, args.until)
        if relative and len(stages) > 1:
            raise ConfigError(f"overrides {relative} are relative to a stage, but {len(stages)} stages are "
                              f"submitted ({', '.join(stages)}): write them in full, e.g. {stages[0]}.{relative[0]}")
        if stages:
            cfg = load_config(args.config, args.overrides, stages[0] if len(stages) == 1 else None)
        submit_chain(cfg, args.until, args.dry_run, args.sbatch)  # says so when there is nothing to submit
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, FileNotFoundError) as e:
        hint = " (no SLURM commands here: submit from a login node)" if isinstance(e, FileNotFoundError) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
