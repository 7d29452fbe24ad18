"""The suite's own scheduling (tests/conftest.py): a group's tests run on one pytest-xdist process."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import AFTER_STARTER, LONGEST, STARTER, _group, pytest_collection_modifyitems

ROOT = Path(__file__).resolve().parent.parent

FAKE_CONFTEST = f'''
import importlib.util, sys
sys.path.insert(0, {str(ROOT / "tests")!r})  # the suite's conftest imports tests/stage_server.py
spec = importlib.util.spec_from_file_location("suite_conftest", {str(ROOT / "tests" / "conftest.py")!r})
suite = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
pytest_xdist_make_scheduler = suite.pytest_xdist_make_scheduler
pytest_collection_modifyitems = suite.pytest_collection_modifyitems
'''
FAKE_FAMILIES = '''
import os, time, pytest

@pytest.fixture(scope="session", params=["alpha", "beta", "gamma"])
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


def test_group_of_a_test_id():
    assert _group("tests/test_families.py::test_pad_is_no_stop_token[qwen2.5-instruct]") == "family-qwen2.5-instruct"
    assert _group("tests/test_families.py::test_every_family_has_its_expected_rendering") is None
    assert _group("tests/test_slurm.py::test_chain[x]") == "tests/test_slurm.py"
    assert _group("tests/test_distributed.py::test_two_process_ppo[gae]") == "tests/test_distributed.py"
    assert _group("tests/test_ppo.py::test_x") is None
    assert _group(STARTER) == _group(AFTER_STARTER[0]) == "chain"


def test_each_family_pipeline_is_built_once_on_one_process(tmp_path):
    """Three processes and three families: each family's session fixture is built once (it would be built on
    every process that runs one of its tests if the group were not kept together)."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "conftest.py").write_text(FAKE_CONFTEST)
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
    def __init__(self, nodeid: str, *fixtures: str):
        self.nodeid, self.fixturenames = nodeid, list(fixtures)


def test_order_the_chain_then_the_long_groups_then_by_the_runs_each_test_needs():
    """The test that builds the demo's chain first, with the long tests that need that chain after it on its
    process; then the SLURM and 2-process groups (each whole, on one process, minutes long), then tests by the
    shared runs they need: none, SFT, RM, PPO; a group among its equals first, then the longest single tests."""
    items = [Item("tests/test_a.py::test_needs_ppo", "ppo_run"), Item("tests/test_a.py::test_plain"),
             Item(AFTER_STARTER[0], "ppo_run"), Item(LONGEST[0]),
             Item("tests/test_slurm.py::test_chain"), Item("tests/test_a.py::test_needs_sft", "sft_run"),
             Item(STARTER, "ppo_run"), Item("tests/test_distributed.py::test_rm", "rm_run"),
             Item("tests/test_families.py::test_x[gpt2]"), Item("tests/test_a.py::test_needs_rm", "rm_run"),
             Item("tests/test_distributed.py::test_units"), Item("tests/test_slurm.py::test_2proc", "rm_run")]
    pytest_collection_modifyitems(items)
    name = lambda nodeid: nodeid.split("::")[1]
    assert [name(i.nodeid) for i in items] == [
        name(STARTER), name(AFTER_STARTER[0]), "test_chain", "test_2proc", "test_rm", "test_units", "test_x[gpt2]",
        name(LONGEST[0]), "test_plain", "test_needs_sft", "test_needs_rm", "test_needs_ppo"]


def test_the_named_tests_exist():
    """A renamed test would silently lose its place in the order."""
    for nodeid in (STARTER, *AFTER_STARTER, *LONGEST):
        path, name = nodeid.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), nodeid


BURN = '''
import subprocess, sys, time

def test_burns_in_a_child():
    subprocess.run([sys.executable, "-c", "import time\\nt = time.process_time()\\nwhile time.process_time() - t < 1.5: pass"])
    time.sleep(1.5)  # a reaped child's CPU shows in its parent's counters: let the sampler see it within this test

def test_idles():
    time.sleep(1.0)
'''


def test_suite_profile_charges_a_child_process_s_cpu_to_its_test(tmp_path):
    """scripts/suite_profile.py: the CPU of a process a test starts is charged to that test."""
    (tmp_path / "test_burn.py").write_text(BURN)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env |= {"PYTHONPATH": str(ROOT / "scripts"), "SUITE_PROFILE": str(tmp_path / "profile.json")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "-p",
                           "suite_profile", "--rootdir", str(tmp_path), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    tests = json.loads((tmp_path / "profile.json").read_text())["tests"]
    assert tests["test_burn.py::test_burns_in_a_child"] >= 1.0, tests
    assert tests.get("test_burn.py::test_idles", 0) < 0.5, tests
