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
    assert "scripts/install.py -c constraints.txt -e .\n" in dry            # what the stages need
    assert "scripts/install.py -c constraints.txt -e '.[test]'" in dry    # then the test extra
    assert "scripts/install.py -c constraints.txt -e '.[test]'" in dry_run("test")


def test_the_demo_installs_only_what_the_stages_need():
    """A fresh `make demo` does not install the test extra (pytest, wandb and its dependencies)."""
    dry = dry_run("demo", "RUN=/nonexistent/run")
    assert "scripts/install.py -c constraints.txt -e .\n" in dry and "[test]" not in dry


def load_install():
    import importlib.util
    spec = importlib.util.spec_from_file_location("install", ROOT / "scripts" / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_uv_gets_the_package_sources_pip_is_configured_with():
    install = load_install()
    listed = ("global.cert='/etc/ssl/certs/ca.crt'\n"
              "global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'\n"
              "global.find-links='/opt/wheels'\n"
              ":env:.find-links='/env/wheels'\n"
              "user.index-url='https://mirror.example/simple'\n")
    assert install.pip_sources(listed) == [
        "--find-links", "/env/wheels",                       # the environment wins over the files, as in pip
        "--index-url", "https://mirror.example/simple",
        "--extra-index-url", "file:///opt/a/simple", "--extra-index-url", "file:///opt/b/simple",
        "--index-strategy", "unsafe-best-match"]             # pip's rule over several sources
    assert install.pip_sources("global.cert='/x'\n") == []


def test_pip_runs_when_uv_fails(monkeypatch):
    install = load_install()
    calls = []

    def run(cmd, **_):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0 if cmd[1:3] == ["-m", "pip"] else 1, stdout="")

    monkeypatch.setattr(install.subprocess, "run", run)
    monkeypatch.setattr(install, "uv", lambda: Path("/venv/bin/uv"))
    monkeypatch.delenv("INSTALLER", raising=False)
    assert install.main(["--upgrade", "-e", ".[test]"]) == 0
    assert calls[-2][:3] == ["/venv/bin/uv", "pip", "install"]
    assert calls[-1][1:] == ["-m", "pip", "install", "-q", "--upgrade-strategy", "eager", "--upgrade", "-e", ".[test]"]
    calls.clear()
    monkeypatch.setenv("INSTALLER", "pip")
    assert install.main(["-e", "."]) == 0 and [c[1:3] for c in calls] == [["-m", "pip"]]
