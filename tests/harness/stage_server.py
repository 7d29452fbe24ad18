"""One process per test session that has imported what stages import, and forks a child for each stage a test
runs: `python -m stages.<x>` without the ~10 s of imports a fresh interpreter spends (tests/conftest.py:
`ForkedStage`). One for the whole session rather than one per pytest-xdist process: each would import the same
modules again (~13 s of CPU on 2 cores).

The first process to need it starts it (`ensure`, under a lock) in the session's directory, which the pytest
controller names in RLHF_STAGE_SERVER; it ends with the controller (`--watch PID`) or when told to (`stop`).
Protocol, over a Unix socket, one connection per stage: the client sends one JSON line {module, argv, env, out,
err}; the server forks and answers {"pid": N}; when the child ends, {"exit": code} (negative: killed by that
signal, as `subprocess` says it), and closes the connection. The server is one thread: it forks from a process
with no other threads, and a SIGCHLD wakes its select loop.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = "RLHF_STAGE_SERVER"  # the session's directory: sock, pid, lock, log


def run_child(module: str, argv: list[str], env: dict, out: str, err: str) -> None:
    """In the forked child: `python -m <module> <argv>` from the repo root, with the client's environment,
    stdout and stderr into files; the exit code is the stage's."""
    import runpy
    import traceback
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = [module, *argv]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:  # as the interpreter does: None is 0, an int is the code, anything else printed and 1
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def serve(directory: Path, watch: int, preload: list[str]) -> None:
    import importlib
    # first: the repository's own rlhf (whatever an installed package points at), and tests/, where a stage finds
    # the test modules it imports as plug-ins (tests.test_ppo:pays_for_repeats) and their helpers (tests/checks.py)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    for module in preload:
        importlib.import_module(module)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the select below
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = directory / "sock.tmp"
    listener.bind(str(tmp))
    listener.listen(64)
    os.rename(tmp, directory / "sock")  # clients connect once the name exists
    select = selectors.DefaultSelector()
    select.register(listener, selectors.EVENT_READ)
    select.register(wake_r, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    while True:
        try:
            os.kill(watch, 0)
        except ProcessLookupError:  # the session has ended (or was killed): so do the stages it left running
            for pid in children:
                _kill(pid)
            return
        for key, _ in select.select(timeout=1.0):
            if isinstance(key.data, int):  # a client's connection: it only ever closes (its test has stopped)
                try:
                    closed = not key.fileobj.recv(1)
                except OSError:
                    closed = True
                if closed:
                    select.unregister(key.fileobj)
                    _kill(key.data)
            elif key.fileobj is listener:
                conn, _ = listener.accept()
                with conn.makefile("r") as f:
                    request = json.loads(f.readline())
                pid = os.fork()
                if pid == 0:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    select.close()
                    listener.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    for other in children.values():
                        other.close()
                    conn.close()
                    run_child(request["module"], request["argv"], request["env"], request["out"], request["err"])
                children[pid] = conn
                _send(conn, {"pid": pid})
                select.register(conn, selectors.EVENT_READ, data=pid)
                if profile := request["env"].get("SUITE_PROFILE"):  # scripts/suite_profile.py: whose stage it is
                    with open(profile + ".pids", "a") as f:
                        f.write(f"{pid} {request['env'].get('PYTEST_XDIST_WORKER', '')}\n")
            else:
                os.read(wake_r, 4096)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = children.pop(pid, None)
            if conn is not None:
                if conn in select.get_map():  # not if its client had gone (unregistered then)
                    select.unregister(conn)
                _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
                conn.close()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _send(conn: socket.socket, message: dict) -> None:
    try:
        conn.sendall((json.dumps(message) + "\n").encode())
    except OSError:  # the client has gone (its test failed or was stopped)
        pass


def ensure(preload: list[str], timeout: float = 600) -> Path:
    """The server's socket, the server started first if no process of this session has started it."""
    from filelock import FileLock
    directory = Path(os.environ[ENV])
    sock = directory / "sock"
    with FileLock(str(directory / "lock")):
        if not sock.exists():
            with open(directory / "log", "ab") as log:
                server = subprocess.Popen([sys.executable, __file__, str(directory), os.environ[ENV + "_WATCH"],
                                           *preload], cwd=ROOT, stdout=log, stderr=log, start_new_session=True)
            (directory / "pid").write_text(str(server.pid))
            deadline = time.time() + timeout
            while not sock.exists():
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"the stage server did not start: {(directory / 'log').read_text()[-3000:]}")
                time.sleep(0.05)
    return sock


def stop(directory: Path) -> None:
    pid = directory / "pid"
    if pid.exists():
        try:
            os.kill(int(pid.read_text()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass


class Client:
    """One stage run: `pid`, `poll()`, `wait(timeout)` -> the exit code (TimeoutError if it has not ended)."""

    def __init__(self, sock: Path, module: str, argv: list[str], env: dict, out: str, err: str):
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(str(sock))
        self._conn.sendall((json.dumps({"module": module, "argv": argv, "env": env, "out": out, "err": err})
                            + "\n").encode())
        self._buffer = b""
        self.pid = self._read(None)["pid"]
        self.exitcode: int | None = None

    def _read(self, timeout: float | None) -> dict:
        self._conn.settimeout(timeout)
        while b"\n" not in self._buffer:
            chunk = self._conn.recv(4096)
            if not chunk:
                raise RuntimeError("the stage server closed the connection without an exit code")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def poll(self) -> int | None:
        if self.exitcode is None:
            try:
                self.exitcode = self._read(0)["exit"]
            except (BlockingIOError, TimeoutError, socket.timeout):
                return None
            self._conn.close()
        return self.exitcode

    def wait(self, timeout: float | None) -> int:
        if self.exitcode is None:
            try:
                self.exitcode = self._read(timeout)["exit"]
            except (TimeoutError, socket.timeout):
                raise TimeoutError from None
            self._conn.close()
        return self.exitcode


if __name__ == "__main__":
    serve(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
