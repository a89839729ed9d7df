"""Training every variant of a params section (ablations, conv_baselines), several at once on a small CPU."""

import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from stages.io.stage_log import RecordingLog, StageLog

logger = logging.getLogger(__name__)

# (params, workspace, variant, log) -> (the variant's outcome, the inputs it read); a module-level function, so a
# worker process can import it
Trainer = Callable[..., tuple[dict, dict[str, Path]]]


def _train_in_worker(trainer: Trainer, params, workspace: Path, variant: str, threads: int):
    torch.set_num_threads(threads)
    log = RecordingLog()
    outcome, inputs = trainer(params, workspace, variant, log)
    return outcome, inputs, log.epochs


def train_variants(kind: str, trainer: Trainer, params, workspace: Path,
                   log: StageLog) -> dict[str, tuple[dict, dict[str, Path]]]:
    """Every variant of params.<kind>: {variant: (outcome, inputs read)}, in the section's order.

    With <kind>.workers > 1 the variants train in that many processes at once, each with an equal share of the
    CPU threads: on a small CPU two single-threaded trainings get more done than one using both cores.
    """
    section = getattr(params, kind)
    variants = list(section.variants)
    workers = min(section.workers, len(variants))
    done: dict[str, tuple[dict, dict[str, Path]]] = {}
    if workers <= 1:
        for variant in variants:
            done[variant] = trainer(params, workspace, variant, log)
        return done
    threads = max(1, torch.get_num_threads() // workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_train_in_worker, trainer, params, workspace, variant, threads): variant
                   for variant in variants}
        for future in as_completed(futures):
            outcome, inputs, epochs = future.result()
            for epoch, metrics in epochs:
                log.epoch(epoch, metrics)
            done[futures[future]] = outcome, inputs
            logger.info("%s %s trained: %s", kind, futures[future], outcome)
    return {variant: done[variant] for variant in variants}
