"""Where the project lives on disk, and the git commit it runs from."""

import subprocess
from functools import cache
from pathlib import Path

_DVC_TEMP_EXPERIMENTS = (".dvc", "tmp", "exps")


@cache
def project_root() -> Path:
    """The repository root; for `dvc exp run --temp`, the workspace that launched the experiment.

    DVC runs temporary experiments in a copy under .dvc/tmp/exps/; MLflow runs and Prefect state must still land
    in the real workspace or they vanish with the copy.
    """
    root = Path(__file__).resolve().parents[1]
    parts = root.parts
    for i in range(len(parts) - len(_DVC_TEMP_EXPERIMENTS) + 1):
        if parts[i : i + len(_DVC_TEMP_EXPERIMENTS)] == _DVC_TEMP_EXPERIMENTS:
            return Path(*parts[:i])
    return root


@cache
def git_commit(cwd: Path | None = None) -> str:
    """The commit of the code being run, with '-dirty' when tracked files differ from it; 'unknown' outside git."""
    here = cwd or Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit
