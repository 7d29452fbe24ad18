"""The suite's own scheduling (tests/harness/order.py): a group's tests run on one pytest-xdist process, and the
order follows the markers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.order import order

ROOT = Path(__file__).resolve().parent.parent

FAKE_FAMILIES = '''
import os, time, pytest

@pytest.fixture(scope="session", params=[pytest.param(f, marks=pytest.mark.xdist_group(f)) for f in ("alpha", "beta", "gamma")])
def family_run(request):
    with open(os.environ["BUILDS"], "a") as f:
        f.write(f"{request.param} {os.environ['PYTEST_XDIST_WORKER']}\\n")
    return request.param

@pytest.mark.parametrize("n", range(4))
def test_unrelated(n):
    time.sleep(0.1)

def test_one(family_run): time.sleep(0.1)
def test_two(family_run): time.sleep(0.1)
def test_three(family_run): time.sleep(0.1)
'''


def test_each_family_pipeline_is_built_once_on_one_process(tmp_path):
    """Three processes and three families: each family's session fixture is built once (it would be built on
    every process that runs one of its tests if the group were not kept together: what pytest 9.2 does)."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_families.py").write_text(FAKE_FAMILIES)
    builds = tmp_path / "builds.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")} | {"BUILDS": str(builds)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "3", "--dist",
                           "loadgroup", "--rootdir", str(tmp_path), "tests"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "13 passed" in done.stdout
    built = builds.read_text().split()[::2]
    assert sorted(built) == ["alpha", "beta", "gamma"], builds.read_text()


class Item:
    """What order() reads of a pytest item: its id, fixtures and markers."""

    def __init__(self, nodeid: str, *fixtures: str, group: str | None = None, early: int | None = None):
        self.nodeid, self.fixturenames = nodeid, list(fixtures)
        self.marks = {"xdist_group": pytest.mark.xdist_group(group).mark if group else None,
                      "early": pytest.mark.early(early).mark if early is not None else None}

    def get_closest_marker(self, name: str):
        return self.marks.get(name)


def test_order_the_longest_group_and_the_chain_then_the_long_groups_then_by_the_runs_each_test_needs():
    """The real model's chain (the longest group, needing no demo run) first, then the test that builds the
    demo's chain, with the long test that needs that chain after it on its process; then the other long groups
    (each whole, on one process, minutes long), then the longest single tests, then tests by the shared runs they
    need: none, SFT, RM, PPO; a group among its equals first."""
    items = [Item("a::test_needs_ppo", "ppo_run"), Item("a::test_plain"),
             Item("m::test_real_chain", group="real-model", early=0),
             Item("c::test_after_starter", "ppo_run", group="chain", early=1), Item("r::test_longest", early=4),
             Item("s::test_chain", group="slurm", early=1), Item("a::test_needs_sft", "sft_run"),
             Item("p::test_starter", "ppo_run", group="chain", early=0),
             Item("d::test_rm", "rm_run", group="distributed", early=2), Item("f::test_x[gpt2]", group="family-gpt2"),
             Item("a::test_needs_rm", "rm_run"), Item("d::test_units", group="distributed", early=2),
             Item("s::test_2proc", "rm_run", group="slurm", early=1),
             Item("m::test_real_export", group="real-model", early=0)]
    order(items)
    assert [i.nodeid.split("::")[1] for i in items] == [
        "test_real_chain", "test_real_export", "test_starter", "test_after_starter", "test_chain", "test_2proc",
        "test_rm", "test_units", "test_longest", "test_x[gpt2]", "test_plain", "test_needs_sft", "test_needs_rm",
        "test_needs_ppo"]


def test_the_suite_s_groups_are_markers_on_its_tests(pytestconfig):
    """The long modules and the chain carry their markers (a renamed test keeps them)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "tests/test_slurm.py", "tests/test_ppo.py", "tests/test_compare.py", "-m", "early"],
                          cwd=ROOT, capture_output=True, text=True)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    assert any("test_ppo_raises_rm_and_gold_scores_at_a_small_kl" in i for i in ids)
    assert any("test_make_compare_on_the_demo_with_a_few_steps" in i for i in ids)
    assert sum(i.startswith("tests/test_slurm.py") for i in ids) >= 5


BURN = '''
import subprocess, sys, time

def test_burns_in_a_child():
    subprocess.run([sys.executable, "-c", "import time\\nt = time.process_time()\\nwhile time.process_time() - t < 1.5: pass"])
    time.sleep(1.5)  # a reaped child's CPU shows in its parent's counters: let the sampler see it within this test

def test_idles():
    time.sleep(1.0)
'''
BUSY = "while True: pass"


def test_suite_profile_charges_a_child_process_s_cpu_to_its_test(tmp_path):
    """scripts/suite_profile.py: the CPU of a process a test starts is charged to that test, and that of another
    suite's processes (this suite's own, when it runs this test) to none."""
    (tmp_path / "test_burn.py").write_text(BURN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    # another suite's processes on the same machine, named after the same workers: never charged to these tests
    others = [subprocess.Popen([sys.executable, "-c", BUSY], env=env | {"PYTEST_XDIST_WORKER": w})
              for w in ("gw0", "gw1")]
    env |= {"PYTHONPATH": str(ROOT / "scripts"), "SUITE_PROFILE": str(tmp_path / "profile.json")}
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "-p",
                               "suite_profile", "--rootdir", str(tmp_path), str(tmp_path)], cwd=tmp_path, env=env,
                              capture_output=True, text=True)
    finally:
        for other in others:
            other.kill()
            other.wait()
    assert done.returncode == 0, done.stdout + done.stderr
    tests = json.loads((tmp_path / "profile.json").read_text())["tests"]
    assert tests["test_burn.py::test_burns_in_a_child"] >= 1.0, tests
    assert tests.get("test_burn.py::test_idles", 0) < 0.5, tests
