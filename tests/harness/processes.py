"""Stage processes for the tests: `python -m stages.<x>` forked from the session's stage server (`ForkedStage`,
`stage_process`), and a stage's ranks under accelerate's environment (`accelerate_processes`)."""

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from harness import stage_server

ROOT = Path(__file__).resolve().parents[2]

# The heavy imports every stage makes (~10 s of CPU each time: torch, transformers, peft, trl, datasets). A
# suite that started each stage as a fresh interpreter spent a third of its time on them; the stage server
# (tests/stage_server.py) imports them once for the session and forks each stage from there.
STAGE_IMPORTS = ["torch", "transformers", "peft", "trl", "datasets", "accelerate", "rlhf.sft", "rlhf.rm.train",
                 "rlhf.ppo.train", "rlhf.dpo", "rlhf.eval.run", "rlhf.export", "rlhf.preflight", "rlhf.cli"]


class ForkedStage:
    """`python -m stages.<stage> <argv>` as a process of its own (its own globals, seeds, signal handlers, exit
    code) forked from the session's stage server, which has already imported what stages import: the same run as
    a fresh interpreter's, without the ~10 s of imports. Like `subprocess.Popen`: `pid`, `poll()`,
    `send_signal()`, `communicate(timeout)` -> (stdout, stderr), `returncode`. Exceptions: the tests of what
    happens before torch loads and of `make` start real interpreters."""

    def __init__(self, stage: str, argv: list[str], env: dict[str, str] | None = None):
        self.args = [sys.executable, "-m", f"stages.{stage}", *argv]
        self._tmp = tempfile.TemporaryDirectory()
        self._out, self._err = (os.path.join(self._tmp.name, n) for n in ("out", "err"))
        self._proc = stage_server.Client(stage_server.ensure(STAGE_IMPORTS), f"stages.{stage}", argv,
                                         dict(env or os.environ), self._out, self._err)
        self.pid = self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def poll(self) -> int | None:
        return self._proc.poll()

    def send_signal(self, sig: int) -> None:
        if self._proc.poll() is None:
            os.kill(self.pid, sig)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        try:
            self._proc.wait(timeout)
        except TimeoutError:
            self.send_signal(signal.SIGKILL)
            self._proc.wait(60)
            raise subprocess.TimeoutExpired(self.args, timeout) from None
        read = lambda path: Path(path).read_text(errors="replace") if os.path.exists(path) else ""
        out, err = read(self._out), read(self._err)
        self._tmp.cleanup()
        return out, err


def stage_process(stage: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`ForkedStage` run to its end: stdout, stderr and the exit code."""
    proc = ForkedStage(stage, argv)
    out, err = proc.communicate(timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def accelerate_processes(stage: str, argv: list[str], accelerate_config: str, num_processes: int = 2,
                         timeout: float = 600) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file <accelerate_config> --num_processes N -m stages.<stage> <argv>`, with
    the ranks forked from the pre-imported server (`ForkedStage`) instead of started by torchrun as fresh
    interpreters (~25 s of CPU a launch on 2 cores). Each rank gets the environment accelerate's launcher
    computes from the config (its own `prepare_multi_gpu_env`) plus torchrun's rank variables; rank 0 hosts
    the rendezvous. stdout and stderr: the ranks' in rank order; the exit code: a failed rank's (not that of
    a rank stopped because another failed).
    The real launcher runs in tests/test_distributed.py's SFT test and the SLURM 2-process job."""
    import socket
    env = launch_env(accelerate_config, num_processes, stage, argv)
    with socket.socket() as s:  # a free port for rank 0's store (torchrun's main_process_port 0 does the same)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(num_processes),
               LOCAL_WORLD_SIZE=str(num_processes), GROUP_RANK="0", GROUP_WORLD_SIZE="1",
               ROLE_WORLD_SIZE=str(num_processes), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))  # as torchrun
    ranks = [ForkedStage(stage, argv, env | {"RANK": str(r), "LOCAL_RANK": str(r), "ROLE_RANK": str(r)})
             for r in range(num_processes)]
    deadline = time.time() + timeout  # as torchrun: one rank failing (or the time running out) stops the others
    while any(r.poll() is None for r in ranks) and not any(r.poll() for r in ranks) and time.time() < deadline:
        time.sleep(0.1)
    late = [r for r in ranks if r.poll() is None]
    for r in late:
        r.send_signal(signal.SIGKILL)
    outs = [rank.communicate(60) for rank in ranks]
    out, err = "".join(o for o, _ in outs), "".join(e for _, e in outs)
    if late and not any(r.returncode for r in ranks if r not in late):  # none failed: the time ran out
        raise subprocess.TimeoutExpired(ranks[0].args, timeout, out, err)
    code = next((r.returncode for r in ranks if r not in late and r.returncode), 0)  # a failure, not our kill
    return subprocess.CompletedProcess(ranks[0].args, code, out, err)


def launch_env(accelerate_config: str, num_processes: int, stage: str, argv: list[str]) -> dict[str, str]:
    """The environment `accelerate launch --config_file <accelerate_config> --num_processes N` gives its ranks,
    from accelerate's public launcher API: the config's keys passed as the launch command's own flags."""
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    cfg = yaml.safe_load((ROOT / accelerate_config).read_text())
    if cfg.get("distributed_type") != "MULTI_GPU":
        raise ValueError(f"{accelerate_config}: the forked ranks take a MULTI_GPU config (one process per rank)")
    flags = ["--multi_gpu", "--num_processes", str(num_processes), "--num_machines", str(cfg.get("num_machines", 1)),
             "--machine_rank", str(cfg.get("machine_rank", 0)), "--mixed_precision", cfg.get("mixed_precision", "no"),
             "--main_process_port", str(cfg.get("main_process_port", 0)), "--gpu_ids", str(cfg.get("gpu_ids", "all")),
             "--rdzv_backend", cfg.get("rdzv_backend", "static"), "--dynamo_backend", "no",
             "--num_cpu_threads_per_process", "1", *(["--cpu"] if cfg.get("use_cpu") else []),
             *(["--same_network"] if cfg.get("same_network") else []), "-m", f"stages.{stage}", *argv]
    return prepare_multi_gpu_env(launch_command_parser().parse_args(flags))
