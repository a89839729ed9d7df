"""What the benchmark scripts share: the project root on sys.path, the data mirror, memory readings, results files.

The scripts run as `python bench/X.py` from the project root and import this module as `common` after putting
their own folder on sys.path. Importing it puts the project root first on sys.path and takes bench/ off it, so the
project's packages import and bench/stages.py does not shadow the stages package.
"""

import json
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
DATA_DIR_ENV = "C2CRS_DATA_DIR"  # the same name as pipeline.config.DATA_DIR_ENV
MIB = 1024 * 1024

sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]


def require_data_dir() -> Path:
    """The data mirror named by C2CRS_DATA_DIR, as given (not resolved); exit with a clear error if unset or missing."""
    data_dir = os.environ.get(DATA_DIR_ENV)
    if not data_dir:
        sys.exit(
            f"error: {DATA_DIR_ENV} is not set; point it at the data mirror, e.g. {DATA_DIR_ENV}=/work/shared/data"
        )
    if not Path(data_dir).is_dir():
        sys.exit(f"error: {DATA_DIR_ENV}={data_dir} is not a directory")
    return Path(data_dir)


def proc_status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM), in MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MIB  # the kernel reports kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def write_results(name: str, payload: dict) -> Path:
    """Write bench/results/<name>.json atomically: the benchmark's name, a UTC timestamp, the Python version and
    the CPU count, then payload. Prints "wrote ..." and returns the path."""
    path = RESULTS_DIR / f"{name}.json"
    record = {
        "benchmark": name,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        **payload,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        partial.write_text(json.dumps(record, indent=2) + "\n")
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    print(f"\nwrote {path.relative_to(ROOT)}")
    return path
