"""What every training stage shares: seeding, checkpoints that make a killed run resumable, early stopping.

A checkpoint holds the model, the optimizer, every random generator's state and the loop's own state, written
atomically after each epoch. A run killed midway restarts from its last checkpoint and, with the same seed, ends
with the same weights and metrics as a run that was never interrupted: the batches of epoch k are drawn from a
generator seeded with (seed, k), so they do not depend on how many epochs ran in this process. Two runs agree bit for
bit on CPU with params `deterministic: true` (torch's deterministic kernels) or with one thread.
"""

import contextlib
import fcntl
import logging
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stages.io.outputs import is_main_process
from stages.training.distributed import barrier

log = logging.getLogger(__name__)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed every generator; deterministic: torch's deterministic kernels (on CPU with several threads, the
    accumulating index_put_ behind the backward of an embedding-row gather otherwise sums in thread order, and two
    runs drift apart by ~1e-4 within a few steps; bench/determinism.py). Deterministic mode would also fill every
    new tensor with NaN (to expose reads of uninitialised memory): 8 % of a CPU training step, and no kernel we run
    reads memory it did not write, so that fill stays off."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


def resolve_device(device: str) -> str:
    """auto picks CUDA when torch sees a GPU; an explicit cuda without one is an error, not a silent fallback.

    Checked when a stage needs a device, not at load time, so params stay loadable on a machine without CUDA.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("params.yaml: device: cuda was asked for but torch sees no CUDA device; use auto or cpu")
    return device


def adam(parameters, learning_rate: float) -> torch.optim.Adam:
    """Adam as one fused kernel over all parameters (CPU and CUDA): the same update rule as the default per-tensor
    loop up to float rounding, and 10x faster on the featureless R-GCN's 68M weights (0.07 s a step vs 0.7 s)."""
    return torch.optim.Adam(parameters, lr=learning_rate, fused=True)


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout) inside the block, and back in the mode it had after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, parameters, grad_clip: float) -> None:
    """One update: clear the gradients, backpropagate `loss`, clip the parameters' gradient norm, step."""
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()


def epoch_generator(seed: int, epoch: int) -> np.random.Generator:
    """The batch order of one epoch, independent of what ran before it in the process."""
    return np.random.default_rng([seed, epoch])


@dataclass
class LoopState:
    """The training loop's own state, saved with the weights."""

    epoch: int = 0  # epochs completed
    best_metric: float | None = None
    best_epoch: int | None = None
    epochs_without_improvement: int = 0
    history: list[dict] = field(default_factory=list)
    patience_reference: float | None = None  # the metric at the last epoch that improved by min_improvement


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: LoopState) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "loop": state.__dict__,
            "rng": {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()},
        },
        temporary,
    )
    temporary.replace(path)


def _numpy_state() -> tuple:
    """numpy's generator state as plain values and a tensor, which torch.load(weights_only=True) accepts."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> LoopState:
    """weights_only: a checkpoint is tensors, numbers, strings and containers; nothing in it is code to run."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["model"])
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    random.setstate(checkpoint["rng"]["python"])
    name, keys, position, has_gauss, cached = checkpoint["rng"]["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(checkpoint["rng"]["torch"])
    return LoopState(**checkpoint["loop"])


def autocast(device: torch.device, precision: str):
    """params precision: bf16 runs the forward pass under torch.autocast with bfloat16 (matrix products in bf16,
    softmax, norms and losses in float32; the weights, gradients and Adam stay float32), made for CUDA GPUs with bf16
    (Ampere and later); fp32 changes nothing."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    checkpoint_dir: Path,
    epochs: int,
    train_epoch: Callable[[int], dict],
    validate: Callable[[], dict] | None = None,
    monitor: str | None = None,
    higher_is_better: bool = True,
    patience: int | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    min_improvement: float = 0.0,
) -> LoopState:
    """Run epochs, resuming from checkpoint_dir/last.pt; keep checkpoint_dir/best.pt by the monitored metric.

    train_epoch(epoch) returns the epoch's training metrics; validate() the validation metrics (the test split is
    never seen here). Early stopping after `patience` epochs without improvement of `monitor` by at least
    `min_improvement` (a fraction of the value at the last such improvement: 0.01 stops once the metric has moved
    by under 1 % for `patience` epochs, i.e. has flattened); best.pt is still the best epoch. Two processes with
    the same checkpoint_dir (stages side by side that share a run, e.g. an ablation variant and the main model) take
    turns: the second waits, then resumes the first's finished run.
    """
    with _exclusive(checkpoint_dir):
        return _train(
            model,
            optimizer,
            checkpoint_dir,
            epochs,
            train_epoch,
            validate,
            monitor,
            higher_is_better,
            patience,
            on_epoch,
            min_improvement,
        )


@contextlib.contextmanager
def _exclusive(checkpoint_dir: Path) -> Iterator[None]:
    """Hold checkpoint_dir's lock file (the first process only: the others of a distributed run follow it)."""
    if not is_main_process():
        yield
        return
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with open(checkpoint_dir / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another process trains this run; waiting for it", checkpoint_dir)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _better(value: float, than: float | None, higher_is_better: bool, by: float = 0.0) -> bool:
    """Whether value beats `than` by more than the fraction `by` of it (any value beats None)."""
    if than is None:
        return True
    margin = by * abs(than)
    return value > than + margin if higher_is_better else value < than - margin


def _train(
    model,
    optimizer,
    checkpoint_dir,
    epochs,
    train_epoch,
    validate,
    monitor,
    higher_is_better,
    patience,
    on_epoch,
    min_improvement,
) -> LoopState:
    last, best = checkpoint_dir / "last.pt", checkpoint_dir / "best.pt"
    state = LoopState()
    if last.is_file():
        state = load_checkpoint(last, model, optimizer)
        log.info("resumed from %s after epoch %d", last, state.epoch)
        for row in state.history if on_epoch is not None else ():  # the resumed run's log gets the whole curve
            on_epoch(row["epoch"], {k: v for k, v in row.items() if k != "epoch"})
    while state.epoch < epochs and not (patience is not None and state.epochs_without_improvement >= patience):
        epoch = state.epoch
        model.train()
        metrics = {f"train_{k}": v for k, v in train_epoch(epoch).items()}
        if validate is not None:
            model.eval()
            with torch.no_grad():
                metrics.update({f"valid_{k}": v for k, v in validate().items()})
        state.epoch = epoch + 1
        state.history.append({"epoch": state.epoch, **metrics})
        improved = significant = True
        if monitor is not None:
            value = metrics[monitor]
            improved = _better(value, state.best_metric, higher_is_better)
            significant = _better(value, state.patience_reference, higher_is_better, min_improvement)
            if improved:
                state.best_metric, state.best_epoch = value, state.epoch
            if significant:
                state.patience_reference = value
        state.epochs_without_improvement = 0 if significant else state.epochs_without_improvement + 1
        if improved and is_main_process():
            save_checkpoint(best, model, optimizer, state)
        if is_main_process():
            save_checkpoint(last, model, optimizer, state)
        if on_epoch is not None:
            on_epoch(state.epoch, metrics)
        log.info("epoch %d: %s", state.epoch, {k: round(v, 4) for k, v in metrics.items()})
    barrier()  # distributed: the others read best.pt next, once the first process has written it
    return state
