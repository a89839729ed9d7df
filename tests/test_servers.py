"""Local servers are stopped with their whole process group, and a dead server is reported with its log."""

import subprocess
import sys

import pytest

from pipeline.servers import Server, free_port


def start(code: str, tmp_path) -> Server:
    log = tmp_path / "server.log"
    process = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=open(log, "wb"),
                               stderr=subprocess.STDOUT)
    port = free_port()
    return Server("demo", f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/health", process, log)


def test_stop_ends_the_process_group(tmp_path):
    # The server starts a worker of its own, as uvicorn/gunicorn do; both must go.
    server = start("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; "
                   "time.sleep(120)']); print('up', flush=True); time.sleep(120)", tmp_path)
    group = server.process.pid
    server.stop()
    assert server.process.poll() is not None
    alive = subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True).stdout.split()
    assert alive == []


def test_a_server_that_dies_is_reported_with_its_log(tmp_path):
    server = start("import sys; print('port in use'); sys.exit(3)", tmp_path)
    with pytest.raises(RuntimeError, match=r"demo server exited with code 3; see .*server.log"):
        server.wait_until_healthy(timeout=30)
