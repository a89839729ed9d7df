"""Which pipeline invocation a stage run belongs to, so the MLflow runs of one `dvc repro` group under one parent.

Kept free of MLflow imports: `python -m pipeline repro` needs it before deciding whether anything runs at all.
"""

import os
import uuid
from pathlib import Path

INVOCATION_ENV = "C2CRS_INVOCATION"
TRIGGERED_BY_ENV = "C2CRS_TRIGGERED_BY"  # a deployment's flow run id, which the stage it runs tags its flow run with


def new_invocation() -> str:
    """Start a new pipeline invocation in this process and the ones it launches (dvc repro, subflows)."""
    key = f"run-{uuid.uuid4().hex[:12]}"
    os.environ[INVOCATION_ENV] = key
    return key


def current_invocation() -> str | None:
    """The invocation this stage belongs to: set by `pipeline repro` / `run all`, or the `dvc` process above us."""
    return os.environ.get(INVOCATION_ENV) or _dvc_ancestor()


def _dvc_ancestor() -> str | None:
    """A plain `dvc repro` runs each stage in its own process; its pid and start time identify the invocation."""
    pid = os.getppid()
    for _ in range(6):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        if any(Path(arg.decode(errors="replace")).name == "dvc" for arg in cmdline[:2]):
            return f"dvc-{pid}-{stat[19]}"
        pid = int(stat[1])
        if pid <= 1:
            return None
    return None
