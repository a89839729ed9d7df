"""Benchmark: is CPU training reproducible run to run, and what does making it so cost?

Why: a resumed run should end with the same weights as an uninterrupted one, and two uninterrupted runs with the same
seed should agree; the README states what holds. Sources of run-to-run differences on CPU: the order of rows the
data code produces (multi-threaded joins), and floating-point sums whose order depends on threads or on memory
alignment (Intel MKL picks code paths by alignment unless MKL_CBWR fixes them).

How: each configuration trains pretrain_coarse for --steps steps from the same seed on the mirror's data, twice, each
time in a fresh interpreter, and prints the training loss, a hash of the data batches it drew and the largest
weight difference between the two runs, with the mean step time.
    off              torch's default kernels (params `deterministic: false`), torch's default threads
    on               torch.use_deterministic_algorithms(True) (params `deterministic: true`, the default): the CPU
                     index_put_ with accumulate (the backward of an embedding-row gather) sorts instead of summing in
                     thread order
    off_one_thread   default kernels on one thread
    off_mkl_cbwr     default kernels with MKL_CBWR=COMPATIBLE (MKL's alignment-independent code path)
Needs the data stages' outputs (data/triples, data/kg, data/reviews) and C2CRS_DATA_DIR.
Run: C2CRS_DATA_DIR=/path/to/data .venv/bin/python bench/determinism.py [--steps 20] [--configs off on]
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import common

CONFIGS = {
    "off": ({"C2CRS_DETERMINISTIC": "0"}, None),
    "on": ({"C2CRS_DETERMINISTIC": "1"}, None),
    "off_one_thread": ({"C2CRS_DETERMINISTIC": "0"}, 1),
    "off_mkl_cbwr": ({"C2CRS_DETERMINISTIC": "0", "MKL_CBWR": "COMPATIBLE"}, None),
}


def one_run(steps: int, threads: int | None, out: Path) -> None:
    """Train `steps` coarse steps; save the weights and print a JSON line (loss, data hash, ms per step)."""
    import numpy as np
    import torch

    from models.c2crs import C2CRS
    from pipeline.config import load_params
    from stages.training import c2crs_train
    from stages.training.loop import adam, epoch_generator, seed_everything
    from stages.training.runs import training_run

    if threads:
        torch.set_num_threads(threads)
    params = load_params(common.ROOT / "params.yaml")
    run, config, _ = training_run(params, common.ROOT)
    seed_everything(params.seed, deterministic=os.environ["C2CRS_DETERMINISTIC"] == "1")
    model = C2CRS(config)
    optimizer = adam(model.parameters(), params.pretrain_coarse.learning_rate)
    batches = c2crs_train._pretraining_batches(run, params.pretrain_coarse, epoch_generator(params.seed, 0))[:steps]
    data_hash = hashlib.sha256()
    for rows in batches:
        data_hash.update(np.asarray(rows).tobytes())
        for row in rows:
            data_hash.update(repr(run.train.triples[row]).encode())
    losses, started = [], time.perf_counter()
    for rows in batches:
        loss = c2crs_train.coarse_losses(model, run, run.train, rows)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), params.pretrain_coarse.grad_clip)
        optimizer.step()
        losses.append(loss.item())
    elapsed = time.perf_counter() - started
    torch.save(model.state_dict(), out)
    print(
        json.dumps(
            {
                "loss": sum(losses) / len(losses),
                "data": data_hash.hexdigest()[:16],
                "ms_per_step": 1000 * elapsed / len(batches),
            }
        )
    )


def kernel_cost(repeats: int = 200) -> dict:
    """ms per forward + backward of the gather whose backward is the nondeterministic sum, at a finetune_rec step's
    shapes (the R-GCN rows of every item plus the context entities, 256 contexts of 32 entities), both ways.
    A micro-measurement: the step around it is much larger (README)."""
    import time

    import torch

    rows = torch.randn(8000, 128, requires_grad=True)
    index = torch.randint(0, 8000, (256, 32))
    result = {}
    for deterministic in (False, True, False, True):  # interleaved, so background load hits both alike
        torch.use_deterministic_algorithms(deterministic)
        started = time.perf_counter()
        for _ in range(repeats):
            rows.grad = None
            rows[index].sum().backward()
        result.setdefault("on" if deterministic else "off", []).append(1000 * (time.perf_counter() - started) / repeats)
    torch.use_deterministic_algorithms(False)
    return {k: round(min(v), 3) for k, v in result.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--kernel-only", action="store_true", help="only the gather kernel's cost, both ways")
    parser.add_argument("--one-run", nargs=2, metavar=("THREADS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_run:
        one_run(args.steps, int(args.one_run[0]) or None, Path(args.one_run[1]))
        return
    kernel = kernel_cost()
    print(f"gather forward + backward, ms (best of 2): default kernels {kernel['off']}, deterministic {kernel['on']}")
    if args.kernel_only:
        common.write_results("determinism_kernel", {"kernel_ms": kernel})
        return
    common.require_data_dir()
    import torch

    results = {}
    scratch = common.RESULTS_DIR / "determinism"
    scratch.mkdir(parents=True, exist_ok=True)
    for name in args.configs:
        env, threads = CONFIGS[name]
        runs = []
        for attempt in range(2):
            out = scratch / f"{name}-{attempt}.pt"
            printed = subprocess.run(
                [sys.executable, __file__, "--steps", str(args.steps), "--one-run", str(threads or 0), str(out)],
                env={**os.environ, **env},
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            runs.append(json.loads(printed.strip().splitlines()[-1]))
        first, second = (torch.load(scratch / f"{name}-{i}.pt") for i in range(2))
        largest = max(float((first[k] - second[k]).abs().max()) for k in first)
        results[name] = {
            "losses": [r["loss"] for r in runs],
            "data_hashes": [r["data"] for r in runs],
            "same_data": runs[0]["data"] == runs[1]["data"],
            "max_weight_difference": largest,
            "ms_per_step": [round(r["ms_per_step"], 1) for r in runs],
        }
        print(
            f"{name:11} loss {runs[0]['loss']:.7f} vs {runs[1]['loss']:.7f}; same data: "
            f"{results[name]['same_data']}; largest weight difference {largest:.3g}; ms/step "
            f"{results[name]['ms_per_step']}"
        )
    common.write_results("determinism", {"steps": args.steps, "configs": results, "kernel_ms": kernel})


if __name__ == "__main__":
    main()
