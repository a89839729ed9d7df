"""Benchmark: time per training step of each C2-CRS training stage, split into data / forward / backward, against a
reference-style step (the original code's choices) measured in the same run.

Over 400 lines because one script measures both configurations in child processes with their timers and memory caps;
split them and the two measurements could drift apart.

Why: the training stages are the pipeline's long part on a CPU. Our steps are built for it: the R-GCN runs only on
the entities a batch needs (KGEncoder.forward_nodes, the one-hop neighbourhood), contexts are length-bucketed and a
batch pads only to its own longest context (TokenEncoder also drops all-padding trailing columns), review sentences
pad to the batch's longest, and the model sizes are CPU-sized. This measures what each of those buys together, on
the data the pipeline built (data/triples, data/kg, data/reviews: the outputs of the data stages run on the mirror).

How: for each stage (pretrain_coarse, pretrain_fine, finetune_rec) and each configuration, a fresh interpreter
builds Run and C2CRSConfig as the stage does (stages.training.runs.training_run, params.yaml), draws epoch 0's batches
as the stage does (stages.c2crs_train._pretraining_batches, or the shuffled (sample, item) pairs of
finetune_recommender), runs 1 warm-up step and then --steps timed steps, each one as the stage does it:
    pretrain_coarse  coarse_losses                              then zero_grad, backward, clip, Adam step
    pretrain_fine    fine_losses + coarse_weight x coarse_losses (one encode_context for both) then the same
    finetune_rec     recommendation_batch, _node_rows(with_items), recommendation_logits/_loss, then the same
The split: data = the time inside the batch builders the step calls (context_batch, fine_batch and pad, wrapped
with a timer in stages.c2crs_train); forward = the rest of the time up to the loss (of which "R-GCN"
is the time inside model.entity_graph); backward = zero_grad + backward + gradient clipping + optimizer step.
samples/s = batch rows / mean step time. Models start from random weights (the stages start pretrain_fine and
finetune_rec from the previous stage's weights; the values do not change the work of a step).

Configurations:
  ours       params.yaml as is.
  reference  params.yaml with params/reference.yaml applied (every key but device: the authors' sizes, the
             featureless R-GCN, six heads, NT-Xent, every context entity, one sample per (turn, movie) over every
             turn, batch 256 for pre-training, the training softmax over all entities), and the reference code's
             way of running it:
             - the R-GCN over the whole graph every step: model.entity_graph(edge_index, edge_type) with nodes=None,
               ids used unrenumbered, once per step (pretrain_fine's fine and coarse losses share it, as one forward
               of the reference model computes it once; ours runs forward_nodes in each, as the stage does). Our
               FeaturelessRGCN builds W_r only for the (source, relation) pairs with an edge, where PyG's RGCNConv
               builds it for every entity and relation, so this is a lower bound of the reference's R-GCN cost;
             - contexts padded to 256 tokens and review sentences (review view and fine sentences) to 40 tokens,
               and the Transformer run over every column: TokenEncoder's drop of all-padding trailing columns is
               replaced in that process by the same forward without it (otherwise the padding would be cut again
               before the Transformer and cost only the data step); each distinct sentence of a step is encoded once
               in both configurations (stages.c2crs_train.StepSentences), so the reference's sentence cost is again a
               lower bound;
             - --reference-batch (default 256) for pre-training; if that process fails, e.g. out of memory, it is
               retried at half the batch and the table says so. finetune_rec keeps params.yaml's batch (256).
Speed-up = reference step time / our step time (per step; the batches differ in size for pre-training), and per
sample = (reference s/sample) / (our s/sample), i.e. our samples/s over the reference's.

Each (stage, configuration) runs in its own fresh interpreter, so memory (VmHWM, peak RSS incl. the data tables)
is that measurement's alone and a full-graph step at batch 256 (PyG's RGCNConv keeps a [n_entities, kg_dim]
tensor per relation for backward: ~11 GiB here) cannot crowd out the others. Each interpreter caps its address
space at the machine's available memory minus 1.5 GiB, so a step that does not fit fails with an allocation
error there (and is retried at half the batch) instead of the OOM killer ending another process. Other processes
using the CPU (a `python -m pipeline run ...`) slow every step; the script records whether one was running.

    .venv/bin/python bench/train.py [--steps N] [--stages pretrain_coarse ...] [--configs ours reference]
                                    [--reference-batch 256] [--batch N (smoke tests: every batch size = N)]

Needs the data stages' outputs in data/ (python -m pipeline run triples). Prints a table and writes
bench/results/train.json.
"""

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for common, also when run with runpy
# common puts the project root first on sys.path and takes bench/ off it: bench/stages.py would shadow stages/.
from common import DATA_DIR_ENV, MIB, ROOT, proc_status_mib, write_results  # noqa: E402

TRAIN_STAGES = ("pretrain_coarse", "pretrain_fine", "finetune_rec")
CONFIGS = ("ours", "reference")
REFERENCE_PARAMS = ROOT / "params/reference.yaml"
REFERENCE_CONTEXT_TOKENS = 256
REFERENCE_SENTENCE_TOKENS = 40
CHILD_TIMEOUT_SECONDS = 3600
MEMORY_MARGIN_MIB = 1536  # left to the rest of the machine by each measurement
TRAINING_INPUTS = (
    "data/triples/samples.parquet",
    "data/triples/triples.parquet",
    "data/triples/vocab.parquet",
    "data/reviews/review_sentences.parquet",
    "data/kg/entities.parquet",
    "data/kg/relations.parquet",
    "data/kg/edges.parquet",
)


# --- in the child process -------------------------------------------------------------------------------------


class Clock:
    """Seconds spent inside wrapped functions since the last reset (not nested: the wrapped ones do not call
    each other through the wrappers)."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def untrimmed_token_forward(self, ids):
    """TokenEncoder.forward without dropping the all-padding trailing columns: the Transformer sees every column
    of the padded batch, as in the reference code. Otherwise the same computation (models/c2crs.py)."""
    import torch

    B, L = ids.shape
    if L > self.max_positions:
        raise ValueError(f"sequence length {L} > max_positions {self.max_positions}: truncate before encoding")
    pad = ids.eq(self.pad_id)
    attn_pad = pad.clone()
    attn_pad[:, 0] &= ~pad.all(dim=1)
    x = self.tokens(ids) + self.positions(torch.arange(L, device=ids.device))
    return self.transformer(self.dropout(x), src_key_padding_mask=attn_pad), pad


def meminfo_mib(field: str) -> float:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MIB
    raise RuntimeError(f"/proc/meminfo has no {field}")


def cap_memory() -> float:
    """Cap this process's address space at what it maps now + the machine's available memory - a margin, so a step
    too large for the machine fails here with an allocation error (and the parent retries a smaller batch)
    instead of the kernel's OOM killer picking some other process. Returns the headroom granted, in MiB."""
    headroom = meminfo_mib("MemAvailable") - MEMORY_MARGIN_MIB
    limit = int((proc_status_mib("VmSize") + max(headroom, 0)) * MIB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return headroom


class Instruments:
    """Timers and width records around the batch builders and the R-GCN of one child process; in the reference
    configuration also the reference code's way of running (full-width padding, the whole-graph R-GCN)."""

    def __init__(self, run, reference: bool):
        self.data, self.graph = Clock(), Clock()
        self.widths: dict[str, list[int]] = {"context": [], "sentence": []}
        self.graph_rows: list[int] = []
        self.full_graph: dict = {}  # the reference's whole-graph N of the current step
        self.run, self.reference = run, reference

    def reset(self) -> None:
        self.data.seconds = self.graph.seconds = 0.0
        self.full_graph.clear()
        del self.widths["context"][:], self.widths["sentence"][:], self.graph_rows[:]

    def patch_builders(self) -> None:
        """The batch builders the steps call, timed (data); and in the reference configuration, padded to full
        width."""
        import torch.nn.functional as F

        from models import c2crs as c2crs_model
        from stages.training import c2crs_train

        context_batch, fine_batch, pad = c2crs_train.context_batch, c2crs_train.fine_batch, c2crs_train.pad
        pad_id, reference, widths = self.run.pad_id, self.reference, self.widths

        def context_batch_(*args, **kwargs):
            batch = context_batch(*args, **kwargs)
            if reference:
                width = REFERENCE_CONTEXT_TOKENS - batch["context_ids"].shape[-1]
                batch["context_ids"] = F.pad(batch["context_ids"], (0, width), value=pad_id)
            widths["context"].append(batch["context_ids"].shape[-1])
            return batch

        def pad_(rows, value, min_length=1):  # stages.c2crs_train uses pad for the review sentences only
            out = pad(rows, value, max(min_length, REFERENCE_SENTENCE_TOKENS) if reference else min_length)
            widths["sentence"].append(out.shape[1])
            return out

        c2crs_train.context_batch = self.data.wrap(context_batch_)
        c2crs_train.fine_batch = self.data.wrap(fine_batch)
        c2crs_train.pad = self.data.wrap(pad_)
        if reference:
            c2crs_model.TokenEncoder.forward = untrimmed_token_forward
            c2crs_train._node_rows = self.full_graph_rows

    def full_graph_rows(self, model, run, *entity_ids, with_items=False):
        """The R-GCN over the whole graph: N for every entity, the ids unrenumbered. Computed once per step
        (pretrain_fine's fine and coarse losses share it, as one forward of the reference model does)."""
        if "N" not in self.full_graph:
            self.full_graph["N"] = model.entity_graph(
                run.graph.edge_index.to(run.device), run.graph.edge_type.to(run.device)
            )
        return self.full_graph["N"], list(entity_ids)

    def patch_model(self, model) -> None:
        """Time model.entity_graph and count the rows it computes."""
        entity_graph, n_entities = model.entity_graph, self.run.graph.n_entities

        def entity_graph_(edge_index, edge_type, nodes=None):
            self.graph_rows.append(n_entities if nodes is None else len(nodes))
            return entity_graph(edge_index, edge_type, nodes)

        model.entity_graph = self.graph.wrap(entity_graph_)


def load_stage(stage: str, config: str, reference_batch: int, batch_override: int | None):
    """params (with params/reference.yaml applied for the reference), Run, C2CRSConfig and the stage's section, as
    the stage builds them; and the seconds loading took."""
    import pipeline  # noqa: F401  (first: sets the environment the libraries read at import)
    from pipeline.config import Params, apply_overrides, load_params, reference_overrides
    from stages.training.runs import training_run

    params = load_params(ROOT / "params.yaml")
    if config == "reference":  # the machine's device, as ours
        overrides = {k: v for k, v in reference_overrides(REFERENCE_PARAMS).items() if k != "device"}
        params = Params.model_validate(apply_overrides(dict(params), "reference", overrides, kind="reference"))
    load_start = time.perf_counter()
    run, model_config, _ = training_run(params, ROOT)
    load_seconds = time.perf_counter() - load_start
    cfg = getattr(params, stage)
    if config == "reference":
        model_config = dataclasses.replace(
            model_config, max_positions=max(model_config.max_positions, REFERENCE_CONTEXT_TOKENS)
        )
        if stage != "finetune_rec":
            cfg = cfg.model_copy(update={"batch_size": reference_batch})
    if batch_override:
        cfg = cfg.model_copy(update={"batch_size": batch_override})
    return params, run, model_config, cfg, load_seconds


def stage_steps(stage: str, model, run, cfg, rng):
    """Epoch 0's batches and the step's loss function, each as the stage computes them."""
    import torch

    from stages.training import c2crs_train
    from stages.training.c2crs_data import recommendation_rows

    if stage == "finetune_rec":
        sample_rows, target_items = recommendation_rows(run.train)
        order = rng.permutation(len(sample_rows))
        batches = [order[start : start + cfg.batch_size] for start in range(0, len(order), cfg.batch_size)]

        def step_loss(picked):  # the body of finetune_recommender's train_epoch loop, up to the loss
            entity_ids = c2crs_train.recommendation_batch(
                run.train, sample_rows[picked], run.max_context_entities, run.device
            )
            all_entities = cfg.softmax_over == "entities"
            nodes, (entity_ids,) = c2crs_train._node_rows(model, run, entity_ids, with_items=not all_entities)
            logits = model.recommendation_logits(nodes, entity_ids, all_entities=all_entities)
            return model.recommendation_loss(logits, torch.as_tensor(target_items[picked], device=run.device))

        return batches, step_loss
    model.cfg.temperature = cfg.temperature
    batches = c2crs_train._pretraining_batches(run, cfg, rng)
    if stage == "pretrain_coarse":
        return batches, lambda rows: c2crs_train.coarse_losses(model, run, run.train, rows)

    def step_loss(rows):  # pretrain_fine's step_loss(run.train, rng)
        context = c2crs_train.encode_context(model, run, run.train, rows)
        fine = c2crs_train.fine_losses(model, run, run.train, rows, cfg.max_triples_per_sample, rng, context)
        coarse = (
            c2crs_train.coarse_losses(model, run, run.train, rows, context) if cfg.coarse_weight else torch.zeros(())
        )
        return model.pretraining_loss(fine, coarse, cfg.coarse_weight)

    return batches, step_loss


def timed_steps(label: str, steps: int, batches, step_loss, model, optimizer, cfg, device, tools: Instruments):
    """One warm-up step, then `steps` timed ones, each split into data / forward / R-GCN / backward."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    records = []
    for i in range(steps + 1):  # step 0 is the warm-up
        rows = batches[i % len(batches)]
        tools.reset()
        sync()
        start = time.perf_counter()
        loss = step_loss(rows)
        sync()
        forward_end = time.perf_counter()
        optimizer.zero_grad()  # as stages.training.loop.optimizer_step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        loss_value = loss.item()
        sync()
        end = time.perf_counter()
        del loss
        records.append(
            {
                "rows": len(rows),
                "step_seconds": end - start,
                "data_seconds": tools.data.seconds,
                "forward_seconds": forward_end - start - tools.data.seconds,
                "rgcn_seconds": tools.graph.seconds,
                "backward_seconds": end - forward_end,
                "context_width": max(tools.widths["context"], default=0),
                "sentence_width": max(tools.widths["sentence"], default=0),
                "rgcn_rows": sum(tools.graph_rows),
                "loss": loss_value,
            }
        )
        print(f"  {label} step {i}{' (warm-up)' if i == 0 else ''}: {end - start:.3f} s", file=sys.stderr, flush=True)
    return records


MEAN_FIELDS = (
    "step_seconds",
    "data_seconds",
    "forward_seconds",
    "rgcn_seconds",
    "backward_seconds",
    "context_width",
    "sentence_width",
    "rgcn_rows",
)
MODEL_FIELDS = (
    "token_dim",
    "kg_dim",
    "ffn_dim",
    "n_layers",
    "n_heads",
    "max_positions",
    "kg_encoder",
    "projection_heads",
    "contrastive_loss",
)


def measure(stage: str, config: str, steps: int, reference_batch: int, batch_override: int | None) -> dict:
    import torch

    from models.c2crs import C2CRS
    from stages.training.loop import adam, epoch_generator, seed_everything

    params, run, model_config, cfg, load_seconds = load_stage(stage, config, reference_batch, batch_override)
    memory_cap_mib = cap_memory()
    tools = Instruments(run, reference=config == "reference")
    tools.patch_builders()
    seed_everything(params.seed)
    model = C2CRS(model_config).to(run.device)
    model.train()
    tools.patch_model(model)
    optimizer = adam(model.parameters(), cfg.learning_rate)
    batches, step_loss = stage_steps(stage, model, run, cfg, epoch_generator(run.seed, 0))
    rss_before_steps = proc_status_mib("VmRSS")
    load_before = os.getloadavg()[0]
    records = timed_steps(f"{stage} {config}", steps, batches, step_loss, model, optimizer, cfg, run.device, tools)
    timed = records[1:]
    return {
        "stage": stage,
        "config": config,
        "batch_size": cfg.batch_size,
        "model": {k: getattr(model_config, k) for k in MODEL_FIELDS},
        "parameters": sum(p.numel() for p in model.parameters()),
        "sample_unit": getattr(cfg, "sample_unit", None),
        "softmax_over": getattr(cfg, "softmax_over", None),
        "max_review_sentences": run.max_review_sentences,
        "device": str(run.device),
        "torch_threads": torch.get_num_threads(),
        "load_seconds": load_seconds,
        "steps": len(timed),
        "warmup": records[0],
        "records": timed,
        "mean": {k: statistics.fmean(r[k] for r in timed) for k in MEAN_FIELDS},
        "step_seconds_min": min(r["step_seconds"] for r in timed),
        "step_seconds_max": max(r["step_seconds"] for r in timed),
        "samples_per_second": sum(r["rows"] for r in timed) / sum(r["step_seconds"] for r in timed),
        "rows_per_step": statistics.fmean(r["rows"] for r in timed),
        "rss_before_steps_mib": rss_before_steps,
        "peak_rss_mib": proc_status_mib("VmHWM"),
        "memory_headroom_mib": memory_cap_mib,
        "load_average_1min": {"before_steps": load_before, "after_steps": os.getloadavg()[0]},
    }


# --- in the parent process ------------------------------------------------------------------------------------


def busy_pipeline_runs() -> list[str]:
    """`python -m pipeline run ...` processes running now (they share the CPU with the measurement)."""
    found = subprocess.run(["pgrep", "-af", "pipeline run"], capture_output=True, text=True)
    return [line for line in found.stdout.splitlines() if line.split(maxsplit=1)[0] != str(os.getpid())]


def run_child(stage: str, config: str, args, reference_batch: int) -> tuple[dict | None, str]:
    command = [
        sys.executable,
        __file__,
        "--child",
        stage,
        config,
        "--steps",
        str(args.steps),
        "--reference-batch",
        str(reference_batch),
    ] + (["--batch", str(args.batch)] if args.batch else [])
    try:
        child = subprocess.run(
            command,
            cwd=ROOT,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=CHILD_TIMEOUT_SECONDS,
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {CHILD_TIMEOUT_SECONDS} s"
    if child.returncode != 0:
        return None, f"exit {child.returncode}: {child.stderr[-3000:]}"
    return json.loads(child.stdout.strip().splitlines()[-1]), ""


def measure_pair(stage: str, args) -> dict[str, dict]:
    results = {}
    for config in args.configs:
        batch = args.reference_batch
        while True:
            result, error = run_child(stage, config, args, batch)
            if result is not None:
                break
            # Only the reference pre-training batch is ours to shrink (e.g. out of memory at 256).
            if config != "reference" or stage == "finetune_rec" or args.batch or batch <= 2:
                sys.exit(f"error: {stage} {config} failed ({error})")
            print(
                f"  {stage} {config} at batch {batch} failed ({error.splitlines()[0] if error else ''}); "
                f"retrying at batch {batch // 2}",
                flush=True,
            )
            results.setdefault("_failures", []).append({"config": config, "batch_size": batch, "error": error})
            batch //= 2
        m = result["mean"]
        print(
            f"  {stage:<15} {config:<9} batch {result['batch_size']:>3}: {m['step_seconds']:.3f} s/step, "
            f"{result['samples_per_second']:.0f} samples/s, peak RSS {result['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
        results[config] = result
    return results


def speedups(pair: dict) -> dict | None:
    if "ours" not in pair or "reference" not in pair:
        return None
    ours, ref = pair["ours"], pair["reference"]
    return {
        "step_time_ratio": ref["mean"]["step_seconds"] / ours["mean"]["step_seconds"],
        "per_sample_ratio": ours["samples_per_second"] / ref["samples_per_second"],
        "reference_batch_size": ref["batch_size"],
        "our_batch_size": ours["batch_size"],
    }


def print_table(pairs: dict[str, dict], steps: int) -> None:
    print(
        f"\nmean over {steps} timed step(s) after 1 warm-up, each (stage, configuration) in a fresh process; ms per "
        f"step; data = batch tensors, forward = to the loss (R-GCN = inside entity_graph), backward = + clip + Adam"
    )
    header = (
        f"{'stage':<15}  {'config':<9}  {'batch':>5}  {'samples/s':>9}  {'step ms':>8}  {'data':>7}  "
        f"{'forward':>8}  {'(R-GCN)':>8}  {'backward':>8}  {'ctx w':>5}  {'sent w':>6}  {'R-GCN rows':>10}  "
        f"{'peak MiB':>8}"
    )
    print(header)
    print("-" * len(header))
    for stage, pair in pairs.items():
        for config in CONFIGS:
            if config not in pair:
                continue
            r = pair[config]
            m = {k: v * 1000 if k.endswith("_seconds") else v for k, v in r["mean"].items()}
            print(
                f"{stage:<15}  {config:<9}  {r['batch_size']:>5}  {r['samples_per_second']:>9.1f}  "
                f"{m['step_seconds']:>8.0f}  {m['data_seconds']:>7.0f}  {m['forward_seconds']:>8.0f}  "
                f"{m['rgcn_seconds']:>8.0f}  {m['backward_seconds']:>8.0f}  {m['context_width']:>5.0f}  "
                f"{m['sentence_width']:>6.0f}  {m['rgcn_rows']:>10,.0f}  {r['peak_rss_mib']:>8.0f}"
            )
    ratios = {stage: speedups(pair) for stage, pair in pairs.items()}
    if any(ratios.values()):
        print("\nspeed-up of ours over reference-style (reference / ours):")
        for stage, s in ratios.items():
            if s:
                print(
                    f"  {stage:<15}  step time x{s['step_time_ratio']:.1f} (batch {s['reference_batch_size']} vs "
                    f"{s['our_batch_size']}),  per sample x{s['per_sample_ratio']:.1f}"
                )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement, after 1 warm-up (default 5)")
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=TRAIN_STAGES,
        default=list(TRAIN_STAGES),
        metavar="STAGE",
        help=f"stages to measure: {' '.join(TRAIN_STAGES)} (default all)",
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=CONFIGS,
        default=list(CONFIGS),
        metavar="CONFIG",
        help="ours and/or reference (default both)",
    )
    parser.add_argument(
        "--reference-batch",
        type=int,
        default=256,
        help="pre-training batch of the reference configuration (default 256; halved on failure)",
    )
    parser.add_argument("--batch", type=int, help="every batch size = this, in both configurations (smoke tests)")
    parser.add_argument("--child", nargs=2, metavar=("STAGE", "CONFIG"), help=argparse.SUPPRESS)
    return parser


def main() -> int:
    args = build_parser().parse_args()
    if args.steps < 1:
        sys.exit("error: --steps must be at least 1")

    if args.child:
        stage, config = args.child
        print(json.dumps(measure(stage, config, args.steps, args.reference_batch, args.batch)))
        return 0

    missing = [path for path in TRAINING_INPUTS if not (ROOT / path).is_file()]
    if missing:
        sys.exit(f"error: missing {', '.join(missing)}; run the data stages first (python -m pipeline run triples)")
    busy_before = busy_pipeline_runs()
    if busy_before:
        print(
            "warning: other training is using the CPU, every step is slower than on an idle machine:\n  "
            + "\n  ".join(busy_before),
            flush=True,
        )
    if os.getloadavg()[0] > 0.5:
        print(
            f"warning: 1-minute load average {os.getloadavg()[0]:.2f}: something else is using the CPU "
            "(torch's threads slow down badly when a core is taken)",
            flush=True,
        )
    stages = [s for s in TRAIN_STAGES if s in args.stages]
    configs = [c for c in CONFIGS if c in args.configs]
    args.configs = configs
    print(
        f"{' '.join(stages)}: {' and '.join(configs)}, {args.steps} timed step(s) after 1 warm-up, each in a fresh "
        f"interpreter",
        flush=True,
    )
    start = time.perf_counter()
    load_before = os.getloadavg()
    pairs = {stage: measure_pair(stage, args) for stage in stages}
    failures = {stage: pair.pop("_failures") for stage, pair in pairs.items() if "_failures" in pair}
    busy_after = busy_pipeline_runs()
    print_table(pairs, args.steps)

    write_results(
        "train",
        {
            "data_dir": os.environ.get(DATA_DIR_ENV),
            "inputs": list(TRAINING_INPUTS),
            "steps": args.steps,
            "warmup_steps": 1,
            "batch_override": args.batch,
            "reference": {
                "params": str(REFERENCE_PARAMS.relative_to(ROOT)) + " (every key but device)",
                "context_tokens": REFERENCE_CONTEXT_TOKENS,
                "sentence_tokens": REFERENCE_SENTENCE_TOKENS,
                "pretraining_batch_asked": args.reference_batch,
                "rgcn": "whole graph every step (entity_graph with nodes=None), featureless: W_r built for the "
                "(source, relation) pairs with an edge (PyG builds every entity's: a lower bound of its cost)",
                "transformer": "every padded column (TokenEncoder's trailing-padding trim disabled in that process)",
            },
            "reference_failures": failures,
            "concurrent_pipeline_runs": {"before": busy_before, "after": busy_after},
            "load_average_before": load_before,
            "wall_seconds": time.perf_counter() - start,
            "results": pairs,
            "speedup": {stage: speedups(pair) for stage, pair in pairs.items()},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
