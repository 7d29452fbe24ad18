"""The suite's stage server (tests/stage_server.py): one pre-imported process that forks each stage a test runs."""

import os
import signal
import time

import pytest

from harness import stage_server


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A server of this test's own (nothing preloaded), ended with the test."""
    directory = tmp_path / "srv"
    directory.mkdir()
    monkeypatch.setenv(stage_server.ENV, str(directory))
    monkeypatch.setenv(stage_server.ENV + "_WATCH", str(os.getpid()))
    yield stage_server.ensure([])
    stage_server.stop(directory)


def run(sock, tmp_path, module, *argv):
    out, err = str(tmp_path / "out"), str(tmp_path / "err")
    return stage_server.Client(sock, module, list(argv), dict(os.environ, MARK="from-the-client"), out, err), out, err


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] != "Z"  # a zombie has ended


def test_a_stage_runs_as_a_module_with_the_client_s_environment_and_exit_code(server, tmp_path):
    client, out, err = run(server, tmp_path, "timeit", "-n", "1", "-r", "1",
                           "import os, sys; print(os.environ['MARK'], os.getcwd()); sys.stdout.flush(); os._exit(3)")
    assert client.wait(60) == 3
    assert open(out).read().split() == ["from-the-client", str(stage_server.ROOT)]
    bad, _, err = run(server, tmp_path, "timeit", "-n", "1", "-r", "1", "1/0")
    assert bad.wait(60) != 0 and "ZeroDivisionError" in open(err).read()


def test_a_signal_ends_it_as_subprocess_reports_and_a_stopped_test_leaves_no_stage_running(server, tmp_path):
    sleep = ("-n", "1", "-r", "1", "import time; time.sleep(120)")
    client, _, _ = run(server, tmp_path, "timeit", *sleep)
    assert client.poll() is None
    with pytest.raises(TimeoutError):
        client.wait(0.2)
    os.kill(client.pid, signal.SIGTERM)
    assert client.wait(60) == -signal.SIGTERM and client.poll() == -signal.SIGTERM
    # a client that goes away (its test failed or timed out) takes its stage with it
    orphan, _, _ = run(server, tmp_path, "timeit", *sleep)
    assert alive(orphan.pid)
    orphan._conn.close()
    deadline = time.time() + 30
    while alive(orphan.pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(orphan.pid)
