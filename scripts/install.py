"""`pip install` for the Makefile's venv, through uv when it can be had: the same arguments, half the time.

    .venv/bin/python scripts/install.py -c constraints.txt -e '.[test]'

uv (a pip-compatible installer, itself a wheel on PyPI) is installed into the venv on first use. It does
not read pip's settings (pip.conf, PIP_* variables), so the package sources pip is configured with
(find-links, index-url, extra-index-url) are handed to it, with pip's rule for several indexes (the best
version over all of them), and it compiles the bytecode as pip does. Where uv cannot be installed or fails, pip runs
with the same arguments.
INSTALLER=pip (the Makefile's variable, read here from the environment) uses pip alone.
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

SOURCES = ("find-links", "index-url", "extra-index-url")


def pip(*args: str, quiet: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=quiet, text=True)


def pip_sources(config_list: str) -> list[str]:
    """uv's flags for the package sources in `pip config list` output. It lists pip's settings in the order pip
    loads them (global, user and site files, then the environment), so a later line wins, as in pip."""
    found: dict[str, str] = {}
    for line in config_list.splitlines():
        scope_key, _, value = line.partition("=")
        key = scope_key.rpartition(".")[2]
        if key in SOURCES:
            found[key] = value.strip().strip("'\"")
    flags = []
    for key in SOURCES:
        for value in found.get(key, "").split():
            flags += [f"--{key}", value]
    if "extra-index-url" in found or "find-links" in found:
        flags += ["--index-strategy", "unsafe-best-match"]  # pip's rule: the best version over every source
    return flags


def uv() -> Path | None:
    exe = Path(sys.executable).parent / "uv"
    if not exe.exists() and pip("install", "-q", "uv", quiet=True).returncode != 0:
        return None
    return exe if exe.exists() else None


def main(args: list[str]) -> int:
    exe = None if os.environ.get("INSTALLER") == "pip" else uv()
    if exe is not None:
        sources = pip_sources(pip("config", "list", quiet=True).stdout)
        # --compile-bytecode: as pip does; without it every import compiles afresh where PYTHONDONTWRITEBYTECODE is
        # set (each stage's imports took 20 s instead of 9 here)
        cmd = [str(exe), "pip", "install", "--python", sys.executable, "-q", "--compile-bytecode", *sources, *args]
        if subprocess.run(cmd).returncode == 0:
            return 0
        print(f"install: uv failed ({shlex.join(cmd)}); trying pip", file=sys.stderr)
    eager = ["--upgrade-strategy", "eager"] if "--upgrade" in args else []  # as uv's --upgrade: dependencies too
    return pip("install", "-q", *eager, *args).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
