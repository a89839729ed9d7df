"""Data-parallel training across processes started by torchrun (params `distributed: true`).

    torchrun --nproc_per_node 2 -m pipeline run finetune_rec      # 2 CPU processes (gloo), or 2 GPUs (nccl)

Every process draws the same batches (the epoch generator is seeded by (seed, epoch)) and trains on its own slice
of each one; DistributedDataParallel averages the gradients, and each slice's loss is scaled by its share of the
batch, so a step equals the single-process step on the whole batch (up to float rounding) whatever the split. The
losses must be means over independent rows for that (the recommender's and the generator's are); the contrastive
losses use in-batch negatives, so under data parallelism each process's negatives are its own slice, as in the
reference code's multi-GPU runs. Only the first process writes checkpoints, models, metrics and MLflow runs; the
others wait for it where they read what it wrote.
"""

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


class _Step(torch.nn.Module):
    """Lets DistributedDataParallel wrap a training step that calls the model's methods rather than forward: the
    step's parameters are the model's, so DDP's gradient hooks fire for whatever the step used."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, step: Callable, rows: np.ndarray) -> torch.Tensor:
        return step(rows)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def shard(self, rows: np.ndarray) -> tuple[np.ndarray, float]:
        """This process's rows of a batch and the factor that makes DDP's gradient mean the whole batch's mean.

        A batch smaller than the world is not split: every process takes it whole (factor 1; the mean of equal
        gradients is that gradient)."""
        if not self.active or len(rows) < self.world_size:
            return rows, 1.0
        mine = rows[self.rank :: self.world_size]
        return mine, self.world_size * len(mine) / len(rows)

    def step_runner(self, model: torch.nn.Module) -> Callable[[Callable, np.ndarray], torch.Tensor]:
        """run(step, rows) -> loss: the step itself, or through DistributedDataParallel when distributed."""
        if not self.active:
            return lambda step, rows: step(rows)
        device = next(model.parameters()).device
        return torch.nn.parallel.DistributedDataParallel(
            _Step(model), device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )

    def mean(self, total: float, count: int) -> float:
        """A per-row mean over every process's rows."""
        if self.active:
            values = torch.tensor([total, count], dtype=torch.float64)
            dist.all_reduce(values)
            total, count = values.tolist()
        return total / max(count, 1)


SINGLE_PROCESS = Ranks()


def barrier() -> None:
    """Wait for every process (after the first one wrote what the others read next); nothing without torchrun."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def setup(enabled: bool, device: torch.device) -> tuple[Ranks, torch.device]:
    """The process group of a torchrun launch when params ask for it (gloo on CPU, nccl on CUDA: one GPU per
    process, LOCAL_RANK's), else one process. With distributed: true but no torchrun (WORLD_SIZE unset or 1)
    training runs in this one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not enabled or world_size <= 1:
        return SINGLE_PROCESS, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size()), device
