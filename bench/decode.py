"""Benchmark: response decoding speed with and without the key/value cache, and finetune_conv's training speed.

Why: evaluate answers about 7,000 test contexts with each of four generators, and a user talking to the model waits
for one response at a time; training is finetune_conv's whole cost (its target: 30 minutes on 2 cores).

How: the generator is built as finetune_conv builds it (stages/training/runs.py: data/models/c2crs_conv.pt when it
exists,
otherwise the same architecture from params.yaml with fresh weights, which does the same work) and reads test
contexts of the data the pipeline built (data/triples, data/kg, data/reviews). Decoding runs exactly --tokens
steps for every response (the end token is banned, so cached and uncached decoding do the same number of steps)
at batch 1 (the first --responses contexts one by one) and batch 64 (one batch), greedy and beam 4:
    cached    models.generator greedy_decode / beam_decode as evaluate runs them (frozen encoders' outputs kept
              across batches: conv_train.FrozenStates): memories projected once, self-attention keys and values
              grown by one row a step
    uncached  the same with use_cache=False: the decoder reruns the whole prefix every step
ms per response = wall time / responses (memories' encoding included), tokens/s = responses x tokens / wall time.
Training: --steps timed steps (after one warm-up) of finetune_conv's step (stages.conv_train.target_log_probs with
the stage's caches of frozen encoder outputs, conv_train.FrozenStates, generation_loss with Eq. 12's weights when the
generator uses them, backward, clip, Adam) on epoch 0's length-bucketed batches, for params.yaml's freezing and with
nothing frozen; samples/s = responses per batch / mean step time. The caches are filled for the timed batches before
the clock starts, as from the second epoch on, when every context and sentence has been seen once.

--variant NAME times a conversation baseline instead (params.conv_baselines.variants: its overrides, its model file
data/models/conv_baselines/NAME.pt when it exists, else fresh weights, which for kgsf/kbrd need their recommender's
file): transformer, kbrd, kgsf and wo_iw train with this same step; redial (HRED), kecrs (extra losses) and revcore
(review-enriched contexts) do not and are refused.

    .venv/bin/python bench/decode.py [--tokens 30] [--responses 16] [--steps 5] [--variant kgsf]

Prints a table and writes bench/results/decode.json (decode_NAME.json for a variant). Other processes using the CPU
slow every number.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, proc_status_mib, write_results  # noqa: E402

SAME_STEP_VARIANTS = ("transformer", "kbrd", "kgsf", "wo_iw")  # trained by finetune_conv's plain step


def _generator(params, workspace: Path, freeze: list[str], variant: str | None):
    """(model, run, test table, test responses, vocabulary, train responses, weights) as the stages build them;
    params: the variant's when there is one."""
    import polars as pl
    import torch

    from stages.io.stage_log import NO_LOG
    from stages.training import c2crs_data, conv_runs, conv_train, runs

    run, _, inputs = runs.training_run(params, workspace)
    trained = conv_runs.conv_model_path(workspace, variant)
    params = params.model_copy(
        update={"finetune_conv": params.finetune_conv.model_copy(update={"freeze": freeze, "epochs": 0})}
    )
    if trained.is_file():
        model, _ = conv_runs.load_conversation_model(trained)
        for name in ("history", "kg", "review") + (("word",) if model.kgsf is not None else ()):
            model._encoder(name).requires_grad_(name not in freeze)
        model.frozen = tuple(freeze)
    else:
        model, _, _ = conv_runs.train_conversation(
            params, workspace, NO_LOG, ROOT / "bench" / "results" / "decode_model.pt"
        )
    samples = pl.read_parquet(inputs["samples"])
    test = c2crs_data.sample_table(samples, pl.read_parquet(inputs["triples"]), "test")
    vocabulary = conv_train.conv_vocabulary(pl.read_parquet(inputs["vocab"]))
    train = conv_train.responses(samples, run.train, "train", vocabulary)
    weights = (
        conv_train.loss_weights(
            train, vocabulary, params.finetune_conv.weight_threshold, params.finetune_conv.weight_floor
        )
        if params.finetune_conv.instance_weighting
        else None
    )
    torch.manual_seed(0)
    return (
        model.to(run.device),
        run,
        test,
        conv_train.responses(samples, test, "test", vocabulary),
        vocabulary,
        train,
        weights,
    )


def _decode_timings(model, run, table, rows, vocabulary, tokens: int, method: str, batch: int, use_cache: bool) -> dict:
    import torch

    from models.decoding import Rules, beam_decode, greedy_decode
    from stages.training import conv_train

    rules = Rules(banned_ids=tuple(vocabulary.banned_ids) + (vocabulary.token_id["__end__"],))
    model.eval()
    start = time.perf_counter()
    frozen = conv_train.FrozenStates(model, run, contexts=False)  # as evaluate's pass over the test split
    for first in range(0, len(rows), batch):
        with torch.no_grad():
            memories, source = conv_train._batch(model, run, table, rows[first : first + batch], frozen)
            if method == "beam":
                out = beam_decode(model.generator, memories, source, tokens, 4, rules=rules, use_cache=use_cache)
            else:
                out = greedy_decode(model.generator, memories, source, tokens, rules=rules, use_cache=use_cache)
        assert all(len(r) == tokens for r in out)
    seconds = time.perf_counter() - start
    return {
        "ms_per_response": 1000 * seconds / len(rows),
        "tokens_per_s": len(rows) * tokens / seconds,
        "responses": len(rows),
    }


def _train_timings(model, run, train, weights, params, steps: int) -> dict:
    import numpy as np
    import torch

    from models.generator import generation_loss
    from stages.training import conv_train
    from stages.training.loop import adam, epoch_generator

    cfg = params.finetune_conv
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = adam(trainable, cfg.learning_rate)
    batches = conv_train.length_batches(run.train, train, cfg.batch_size, epoch_generator(params.seed, 0))
    frozen = conv_train.FrozenStates(model, run)
    with torch.no_grad():  # the frozen encoders' outputs for these batches, as the second epoch finds them
        for picked in batches[: steps + 1]:
            conv_train.target_log_probs(model, run, run.train, train, picked, frozen)
    model.train()
    times, sizes = [], []
    for i, picked in enumerate(batches[: steps + 1]):
        start = time.perf_counter()
        log_probs, targets, _ = conv_train.target_log_probs(model, run, run.train, train, picked, frozen)
        loss = generation_loss(log_probs, targets, 0, weights)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - start)
            sizes.append(len(picked))
    mean = statistics.mean(times)
    return {
        "step_ms": 1000 * mean,
        "samples_per_s": float(np.mean(sizes)) / mean,
        "steps": len(times),
        "batch_size": cfg.batch_size,
        "steps_per_epoch": len(batches),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=30, help="tokens per response (default 30, evaluate's maximum)")
    parser.add_argument("--responses", type=int, default=16, help="responses timed one by one at batch 1")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per configuration")
    parser.add_argument(
        "--variant",
        choices=SAME_STEP_VARIANTS,
        help="a conversation baseline (params.conv_baselines.variants) instead of finetune_conv's",
    )
    args = parser.parse_args()

    import numpy as np

    from pipeline.config import load_params
    from stages.training import conv_runs

    params = load_params(ROOT / "params.yaml")
    if args.variant:
        params = params.variant(args.variant, kind="conv_baselines")
    model, run, test, responses, vocabulary, train, weights = _generator(
        params, ROOT, params.finetune_conv.freeze, args.variant
    )
    rows = responses.rows[np.argsort(test.context_lengths[responses.rows])][:: max(1, len(responses) // 64)][:64]
    decoding = {}
    for method in ("greedy", "beam"):
        for batch, chosen in ((1, rows[: args.responses]), (64, rows)):
            for use_cache in (True, False):
                name = f"{method} batch {batch} {'cached' if use_cache else 'uncached'}"
                decoding[name] = _decode_timings(
                    model, run, test, chosen, vocabulary, args.tokens, method, batch, use_cache
                )
                print(
                    f"{name:28s} {decoding[name]['ms_per_response']:8.1f} ms/response "
                    f"{decoding[name]['tokens_per_s']:8.0f} tokens/s",
                    flush=True,
                )
    training = {}
    for label, freeze in (
        (f"freeze {params.finetune_conv.freeze}", params.finetune_conv.freeze),
        ("nothing frozen", []),
    ):
        model, run, _, _, _, train, weights = _generator(params, ROOT, list(freeze), args.variant)
        training[label] = _train_timings(model, run, train, weights, params, args.steps)
        print(
            f"training, {label:20s} {training[label]['step_ms']:8.0f} ms/step "
            f"{training[label]['samples_per_s']:6.1f} samples/s",
            flush=True,
        )
    write_results(
        f"decode_{args.variant}" if args.variant else "decode",
        {
            "variant": args.variant,
            "tokens": args.tokens,
            "trained_model": conv_runs.conv_model_path(ROOT, args.variant).is_file(),
            "decoding": decoding,
            "training": training,
            "peak_rss_mib": proc_status_mib("VmHWM"),
        },
    )


if __name__ == "__main__":
    main()
