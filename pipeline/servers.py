"""Local Prefect and MLflow servers on 127.0.0.1, started and stopped as child process groups."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from pipeline.paths import project_root

BIN = Path(sys.executable).parent


@dataclass
class Server:
    name: str
    url: str
    health_url: str
    process: subprocess.Popen
    log_path: Path

    def wait_until_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} server exited with code {self.process.returncode}; see {self.log_path}"
                )
            if is_healthy(self.health_url) and self.process.poll() is None:  # ours answers, not another's
                return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{self.name} server not healthy after {timeout:.0f} s; see {self.log_path}")

    def stop(self, grace: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def ui_record() -> Path:
    """Where `make ui` notes the Prefect server it started, so this checkout's `pipeline repro` can report to it."""
    return project_root() / ".prefect" / "ui-server.json"


def record_ui_server(server: Server) -> None:
    ui_record().parent.mkdir(parents=True, exist_ok=True)
    ui_record().write_text(json.dumps({"url": server.url, "pid": server.process.pid}), encoding="utf-8")


def forget_ui_server() -> None:
    ui_record().unlink(missing_ok=True)


def own_ui_server() -> str | None:
    """The URL of the Prefect server this checkout's `make ui` started, if it still runs and answers; never just
    whatever answers on the UI port (another checkout's server, which may go away mid-run)."""
    try:
        noted = json.loads(ui_record().read_text(encoding="utf-8"))
        os.kill(int(noted["pid"]), 0)
        url = str(noted["url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return url if is_healthy(f"{url}/api/health") else None


def is_healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dvc_executable() -> str:
    """DVC from PATH, else the one installed beside this Python (a venv that is not activated)."""
    return shutil.which("dvc") or str(BIN / "dvc")


def _start(
    name: str,
    command: list[str],
    url: str,
    health_url: str,
    env: dict[str, str] | None = None,
    log_name: str | None = None,
) -> Server:
    logs = project_root() / "logs"
    logs.mkdir(exist_ok=True)
    log_path = logs / (log_name or f"{name}-server.log")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=project_root(),
            env=env,
        )
    return Server(name, url, health_url, process, log_path)


class PortTaken(OSError):
    """The port a UI server needs is held by another program."""


def ensure_port_free(port: int, name: str, host: str = "127.0.0.1") -> None:
    """Fail naming the port when another program listens on it: our server could not bind it, and the other
    program would answer our health check in its place."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to a server
        try:
            probe.bind((host, port))
        except OSError:
            raise PortTaken(
                f"port {port} on {host}, which the {name} server needs, is taken by another program "
                f"(see `lsof -i :{port}`); stop that program first"
            ) from None


def start_prefect(port: int) -> Server:
    ensure_port_free(port, "prefect")
    url = f"http://127.0.0.1:{port}"
    return _start(
        "prefect",
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        url,
        f"{url}/api/health",
    )


def start_worker(pool: str, api_url: str, limit: int = 1) -> Server:
    """A Prefect process worker polling `pool`: flow runs of the deployments on it (from the UI or `prefect
    deployment run`) run here, `limit` at a time."""
    return _start(
        "prefect-worker",
        [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--limit", str(limit)],
        api_url,
        f"{api_url}/health",
        env={**os.environ, "PREFECT_API_URL": api_url},
        log_name="prefect-worker.log",
    )


def start_mlflow(port: int, backend_store_uri: str, artifact_root: str) -> Server:
    ensure_port_free(port, "mlflow")
    url = f"http://127.0.0.1:{port}"
    command = [
        str(BIN / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        backend_store_uri,
        "--default-artifact-root",
        artifact_root,
        "--workers",
        "1",
    ]
    return _start("mlflow", command, url, f"{url}/health")


def prefect_api() -> str | None:
    """The Prefect API the deployments go to: PREFECT_API_URL, else this checkout's `make ui` server."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    ui_url = own_ui_server()
    return f"{ui_url}/api" if ui_url else None
