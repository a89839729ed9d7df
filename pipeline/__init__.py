"""Orchestration of the c2crs pipeline: config, CLI, Prefect flows, MLflow tracking, Parquet IO.

Importing this package sets the process environment that Prefect, MLflow and DVC read at import time, so it must
happen before any of them is imported. Values already set by the user win.
"""

import os
from pathlib import Path

from pipeline.paths import project_root

_ENVIRONMENT_DEFAULTS = {
    # Telemetry off everywhere: nothing in this project may try the network on its own.
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    # Ephemeral Prefect (no server) sometimes needs more than the default 20 s to start on 2 cores.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    # Stage logs (plain `logging`) show up in the Prefect UI next to the flow's own.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "stages,pipeline",
    # A task called outside a flow (e.g. a download in a test) logs locally instead of warning.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    # Flow runs of this project live in the project, so `make ui` shows the runs made by `make run`.
    "PREFECT_HOME": str(Path(project_root()) / ".prefect"),
}

for _name, _value in _ENVIRONMENT_DEFAULTS.items():
    os.environ.setdefault(_name, _value)
