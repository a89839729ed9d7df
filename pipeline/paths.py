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
    """The commit of the code being run, with '-dirty' when tracked files differ from it; 'unknown' outside git.

    What the stages themselves write into git-tracked files (metrics, reports, dvc.lock) does not count: DVC
    deletes a stage's metrics before running it, so otherwise every run from a clean clone would be "dirty".
    """
    here = cwd or Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    from stages.io.graph import stage_making

    dirty = [line for line in changed if not all(path == "dvc.lock" or stage_making(path) for path in _paths(line))]
    return f"{commit}-dirty" if dirty else commit


def _paths(status_line: str) -> list[str]:
    """The path(s) of one `git status --porcelain` line ("XY path", or "XY old -> new" for a rename)."""
    return [part.strip('"') for part in status_line[3:].split(" -> ")]
