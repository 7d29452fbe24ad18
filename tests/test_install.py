"""The tested install: constraints.txt pins what CI runs, `make setup` uses it, the venv matches it."""

import re
import subprocess
import tomllib
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    lines = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[^\s=]+", line) for line in lines), "every line is name==version"
    return {normal(line.split("==")[0]): line.split("==")[1] for line in lines}


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_constraints_pin_every_dependency_but_torch_and_the_venv_runs_them():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {normal(re.split(r"[<>=!~\[ ;]", r)[0])
              for r in project["dependencies"] + project["optional-dependencies"]["test"]}
    locked = pins()
    assert "torch" not in locked and "rlhf" not in locked  # torch: the Makefile's TORCH_SPEC
    assert sorted(wanted - {"torch"} - locked.keys()) == []
    stale = {name: (pinned, version(name)) for name, pinned in locked.items() if version(name) != pinned}
    assert stale == {}, "the venv differs from constraints.txt: `make setup`, or `make lock` to record it"


def dry_run(*targets: str) -> str:
    return subprocess.run(["make", "-n", "-B", *targets], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_make_setup_installs_with_the_constraints():
    dry = dry_run("setup")
    assert "pip install -q -c constraints.txt -e .\n" in dry                 # what the stages need
    assert "pip install -q -c constraints.txt -e '.[test]'" in dry         # then the test extra
    assert "pip install -q -c constraints.txt -e '.[test]'" in dry_run("test")


def test_the_demo_installs_only_what_the_stages_need():
    """A fresh `make demo` does not install the test extra (pytest, wandb and its dependencies)."""
    dry = dry_run("demo", "RUN=/nonexistent/run")
    assert "pip install -q -c constraints.txt -e .\n" in dry and "[test]" not in dry
