"""Local servers are stopped with their whole process group, and a dead server is reported with its log."""

import socket
import subprocess
import sys

import pytest

from pipeline.servers import Server, free_port


def start(code: str, tmp_path) -> Server:
    log = tmp_path / "server.log"
    process = subprocess.Popen(
        [sys.executable, "-c", code], start_new_session=True, stdout=open(log, "wb"), stderr=subprocess.STDOUT
    )
    port = free_port()
    return Server("demo", f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/health", process, log)


def test_stop_ends_the_process_group(tmp_path):
    # The server starts a worker of its own, as uvicorn/gunicorn do; both must go.
    server = start(
        "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; "
        "time.sleep(120)']); print('up', flush=True); time.sleep(120)",
        tmp_path,
    )
    group = server.process.pid
    server.stop()
    assert server.process.poll() is not None
    alive = subprocess.run(["pgrep", "-g", str(group)], capture_output=True, text=True).stdout.split()
    assert alive == []


def test_a_server_that_dies_is_reported_with_its_log(tmp_path):
    server = start("import sys; print('port in use'); sys.exit(3)", tmp_path)
    with pytest.raises(RuntimeError, match=r"demo server exited with code 3; see .*server.log"):
        server.wait_until_healthy(timeout=30)


def test_repro_reports_only_to_the_ui_server_of_this_checkout(tmp_path, monkeypatch):
    """Whatever answers on port 4200 may be another checkout's server; only the one `make ui` noted (alive and
    healthy) is used."""
    import http.server
    import threading

    from pipeline import servers

    monkeypatch.setattr(servers, "project_root", lambda: tmp_path)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    port = free_port()
    httpd = http.server.HTTPServer(("127.0.0.1", port), Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        assert servers.own_ui_server() is None  # a healthy server, but not noted by this checkout
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        noted = Server("prefect", f"http://127.0.0.1:{port}", "", process, tmp_path / "log")
        servers.record_ui_server(noted)
        assert servers.own_ui_server() == f"http://127.0.0.1:{port}"
        process.kill()
        process.wait()
        assert servers.own_ui_server() is None  # the process that made it is gone
        servers.forget_ui_server()
        assert not servers.ui_record().exists()
    finally:
        httpd.shutdown()


def test_a_ui_server_refuses_a_port_that_another_program_holds(monkeypatch):
    from pipeline import servers

    def never(*args, **kwargs):
        raise AssertionError("no server may start on a taken port")

    monkeypatch.setattr(servers, "_start", never)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        for start in (lambda: servers.start_prefect(port), lambda: servers.start_mlflow(port, "sqlite://", "x")):
            with pytest.raises(
                servers.PortTaken,
                match=f"port {port} on 127.0.0.1, which the .* server needs, is taken by another program",
            ):
                start()
    servers.ensure_port_free(port, "prefect")  # free again once the other program let go
