"""Where the test suite's CPU goes: a pytest plugin that charges every process's CPU time to the test it ran for.

    PYTHONPATH=scripts make test PYTEST_ARGS="-p suite_profile"
    SUITE_PROFILE=/tmp/profile.json (default: suite-profile.json in the working directory; beside it
    .tests.jsonl, each test's start and end, and .pids, the stages the stage server forked)

Wall time per test (pytest's --durations) says little on 2 cores shared by 3 workers and their stages; CPU time
does. The controller samples /proc twice a second: the user+system time of each process of this suite (those
that descend from the controller or were started with its SUITE_PROFILE) and the xdist worker it ran for: the
one that asked the suite's stage server for it (tests/stage_server.py lists the stages it forks in
SUITE_PROFILE.pids), the one named in its environment (PYTEST_XDIST_WORKER: inherited by `make`, `accelerate
launch` and SLURM jobs), or the worker it descends from. Workers log when each test starts and ends; at the end
each sampled increment of CPU is charged to the test its worker was running then. Printed: the total, the tests
and files that cost most, and each worker's busy time. Linux only (/proc).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import defaultdict
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
EVERY = 0.5


def _cpu_parent_worker(pid: str) -> tuple[float, str, str, str] | None:
    """CPU seconds so far, the parent's pid, and PYTEST_XDIST_WORKER and SUITE_PROFILE from the environment the
    process was started with ("" if none: a worker sets its name after it starts, so it lacks it there and what
    it forks has it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / TICK  # utime + stime
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    found = {}
    for item in env.split(b"\0"):
        key, _, value = item.partition(b"=")
        if key in (b"PYTEST_XDIST_WORKER", b"SUITE_PROFILE"):
            found[key] = value.decode()
    return cpu, fields[1], found.get(b"PYTEST_XDIST_WORKER", ""), found.get(b"SUITE_PROFILE", "")


class _Sampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.seen: dict[str, float] = {}  # pid -> CPU seconds at the last sample
        self.charges: list[tuple[float, float, str, float]] = []  # (from, to, pid, CPU seconds in between)
        self.last = time.time()
        self.parent: dict[str, str] = {}
        self.worker: dict[str, str] = {}  # pid -> the worker in its environment
        self.profile: dict[str, str] = {}  # pid -> SUITE_PROFILE in its environment
        self.sample(charge=False)  # what ran before the suite is not the suite's

    def sample(self, charge: bool = True):
        since, now = self.last, time.time()
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            got = _cpu_parent_worker(pid)
            if got is None:
                continue
            cpu, self.parent[pid], self.worker[pid], self.profile[pid] = got
            delta = cpu - self.seen.get(pid, 0.0)  # a process born since the last sample: all its CPU
            self.seen[pid] = cpu
            if charge and delta > 0:
                self.charges.append((since, now, pid, delta))
        self.last = now

    def in_suite(self, pid: str, controller: str, profile: str) -> bool:
        """Whether a process ran for this suite: it descends from the controller, or it was started with this
        suite's SUITE_PROFILE (a SLURM job, which the scheduler starts). Another suite on the machine (this one
        run inside it, say) carries its own workers' names: it must not be charged to these."""
        seen = set()
        while pid and pid not in seen:
            seen.add(pid)
            if pid == controller or self.profile.get(pid) == profile:
                return True
            pid = self.parent.get(pid, "")
        return False

    def worker_of(self, pid: str, worker_pids: dict[str, str], forked: dict[str, str]) -> str:
        """The worker a process ran for: the one that asked the stage server for it (`forked`), the one in its
        environment, or the worker it descends from."""
        seen = set()
        while pid and pid not in seen:
            seen.add(pid)
            if pid in forked:
                return forked[pid]
            if self.worker.get(pid):
                return self.worker[pid]
            if pid in worker_pids:
                return worker_pids[pid]
            pid = self.parent.get(pid, "")
        return ""

    def run(self):
        while not self.stop.wait(EVERY):
            self.sample()


def out_path() -> Path:
    return Path(os.environ.setdefault("SUITE_PROFILE", str(Path("suite-profile.json").resolve())))


def _log_path() -> Path:
    return out_path().with_suffix(".tests.jsonl")


def pytest_configure(config):
    if hasattr(config, "workerinput"):
        return
    path = _log_path()
    path.unlink(missing_ok=True)
    Path(str(out_path()) + ".pids").unlink(missing_ok=True)
    config._suite_sampler = _Sampler()
    config._suite_started = time.time()
    config._suite_sampler.start()


def pytest_runtest_protocol(item, nextitem):
    item._suite_start = time.time()


def pytest_runtest_makereport(item, call):
    if call.when != "teardown":
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    line = json.dumps({"test": item.nodeid, "worker": worker, "pid": str(os.getpid()),
                       "start": getattr(item, "_suite_start", call.start), "end": time.time()})
    with _log_path().open("a") as f:
        f.write(line + "\n")


def pytest_unconfigure(config):
    sampler = getattr(config, "_suite_sampler", None)
    if sampler is None:
        return
    sampler.stop.set()
    sampler.join()
    wall = time.time() - config._suite_started
    spans = defaultdict(list)  # worker -> [(start, end, test)]
    worker_pids = {}
    path = _log_path()
    for line in path.read_text().splitlines() if path.exists() else []:
        r = json.loads(line)
        spans[r["worker"]].append((r["start"], r["end"], r["test"]))
        worker_pids[r["pid"]] = r["worker"]
    pids = Path(str(out_path()) + ".pids")  # tests/stage_server.py: the stages it forked, for which worker
    forked = dict(line.split(" ", 1) for line in pids.read_text().splitlines()) if pids.exists() else {}
    per_test: dict[str, float] = defaultdict(float)
    controller, profile = str(os.getpid()), str(out_path())
    owner = {pid: sampler.worker_of(pid, worker_pids, forked) if sampler.in_suite(pid, controller, profile) else None
             for pid in {pid for _, _, pid, _ in sampler.charges}}  # None: another suite's process
    for since, now, pid, cpu in sampler.charges:
        worker = owner[pid]
        if worker is None:
            continue
        if not worker:
            per_test["not a worker (controller, others)"] += cpu
            continue
        # the CPU of an interval is spread evenly over it: a test gets the share of the interval it overlaps
        # (a slow sample that straddles a test's start would otherwise charge it the collection before it)
        length, left = max(now - since, 1e-9), cpu
        for s, e, test in spans.get(worker, ()):
            share = cpu * max(0.0, min(now, e) - max(since, s)) / length
            if share > 0:
                per_test[test] += share
                left -= share
        if left > 1e-9:
            per_test[f"{worker}: between tests"] += left
    per_file: dict[str, float] = defaultdict(float)
    for test, cpu in per_test.items():
        per_file[test.split("::")[0]] += cpu
    total = sum(per_test.values())
    busy = {w: round(sum(e - s for s, e, _ in v)) for w, v in sorted(spans.items())}
    report = {"wall_s": round(wall), "cpu_s": round(total), "busy_s_per_worker": busy,
              "files": {k: round(v, 1) for k, v in sorted(per_file.items(), key=lambda kv: -kv[1])},
              "tests": {k: round(v, 1) for k, v in sorted(per_test.items(), key=lambda kv: -kv[1])}}
    out = out_path()
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n[suite_profile] wall {wall:.0f} s, CPU {total:.0f} core-s (all processes); workers busy {busy}; "
          f"{out}")
    for test, cpu in list(report["tests"].items())[:25]:
        print(f"  {cpu:7.1f}  {test}")
