"""Data-parallel training (stages/training/distributed.py): two CPU processes under torchrun with gloo train the
recommender to the same weights as one process on the same global batches."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import load_params
from stages.io.graph import stage_body
from stages.training import runs
from stages.training.distributed import SINGLE_PROCESS, Ranks
from tests.conftest import PROJECT

WORKER = """
import sys
from pathlib import Path
sys.path.insert(0, {project!r})
import pipeline  # noqa: F401
from pipeline.config import load_params
from stages.io.stage_log import NO_LOG
from stages.training import runs

params_file = Path({params_file!r})
params = load_params(params_file)
_, outcome, _ = runs.train_c2crs("finetune_rec", params, params_file.parent, NO_LOG, None, Path({out!r}))
assert runs.training_run(params, params_file.parent)[0].ranks.world_size == 2
"""


def test_shards_cover_the_batch_and_scale_to_its_mean():
    rows = np.arange(7)
    shards = [Ranks(rank, 2).shard(rows) for rank in range(2)]
    assert sorted(np.concatenate([mine for mine, _ in shards]).tolist()) == rows.tolist()
    # each shard's mean loss x its factor, averaged over the processes (DDP) = the batch's mean
    losses = rows.astype(float) ** 2
    assert np.mean([losses[mine].mean() * share for mine, share in shards]) == pytest.approx(losses.mean())
    mine, share = Ranks(0, 4).shard(rows[:3])  # fewer rows than processes: each takes the whole batch
    assert mine.tolist() == [0, 1, 2] and share == 1.0
    assert SINGLE_PROCESS.shard(rows)[1] == 1.0 and not SINGLE_PROCESS.active


def test_two_gloo_processes_train_the_recommender_like_one(params_file, tmp_path):
    raw = yaml.safe_load(params_file.read_text())
    raw["model"]["dropout"] = 0.0  # each process would draw its own dropout masks
    raw["finetune_rec"].update(epochs=2, batch_size=5)  # odd: the shards differ in size
    params_file.write_text(yaml.safe_dump(raw))
    params = load_params(params_file)
    workspace = params_file.parent
    for stage in ("ingest", "reviews", "kg", "triples"):
        stage_body(stage)(params, workspace)

    single = runs.train_c2crs("finetune_rec", params, workspace, runs.StageLog(), None, tmp_path / "single.pt")[1]
    for checkpoint in (workspace / "data/checkpoints").iterdir():  # the same key: do not resume the single run
        for path in checkpoint.iterdir():
            path.unlink()

    raw["distributed"] = True
    params_file.write_text(yaml.safe_dump(raw))
    worker = tmp_path / "worker.py"
    worker.write_text(
        WORKER.format(project=str(PROJECT), params_file=str(params_file), out=str(tmp_path / "distributed.pt"))
    )
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]

    one, two = (
        torch.load(tmp_path / f"{name}.pt", weights_only=True)["state_dict"] for name in ("single", "distributed")
    )
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-5), key
    assert single["epochs_run"] == 2
