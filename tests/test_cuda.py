"""The CUDA path (params device: cuda): every training stage and the evaluation on a GPU, on the fixture mirror.
Skipped, with the reason, on a machine without one (the CPU path is what every other test runs)."""

import json

import pytest
import torch
import yaml

from pipeline.config import load_params
from stages.io.graph import stage_body, stage_instances

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: torch.cuda.is_available() is False (the CUDA path is exercised on a GPU machine)",
)


@pytest.mark.usefixtures("mlflow_store")
def test_every_stage_runs_on_cuda(params_file):
    raw = yaml.safe_load(params_file.read_text())
    raw["device"] = "cuda"
    raw["ablations"]["variants"] = {"wo_coarse": {"pretrain_coarse.epochs": 0}}
    raw["conv_baselines"]["variants"] = {"transformer": raw["conv_baselines"]["variants"]["transformer"]}
    params_file.write_text(yaml.safe_dump(raw))
    params = load_params(params_file)
    workspace = params_file.parent
    for stage in stage_instances(params):
        stage_body(stage)(params, workspace)
    saved = torch.load(workspace / "data/models/c2crs_rec.pt", weights_only=True, map_location="cpu")
    assert all(torch.isfinite(value).all() for value in saved["state_dict"].values() if value.is_floating_point())
    results = json.loads((workspace / "reports/rec.json").read_text())
    assert results["c2crs"]["all_turns"]["n"] > 0
