"""Where a generator's immediate word repeats ("do do", "so so") come from, on choose_decoding's validation sample
under evaluate.decoding's setting: at each step whose token repeats the previous one, was that
token the decoder's own first choice, or was its first choice blocked (n-gram blocking or a banned token), and how
much of the repeated token's probability came through the copy path ((1 - p_gen) x copy attention) rather than the
vocabulary softmax.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.repeat_causes [GENERATOR ...]   (default: those with a copy path)

Prints a line per generator and writes bench/results/repeat_causes.json.
"""

import json
import sys
from pathlib import Path

import numpy as np
import polars as pl
import torch

from models.decoding import Rules, _Stepper, greedy_search
from pipeline.config import load_params
from stages.training import conv_runs, conv_train, runs
from stages.training.loop import evaluating

RESULTS = Path(__file__).resolve().parent / "results" / "repeat_causes.json"


class RecordingStepper(_Stepper):
    """The C2-CRS stepper, recording per step the unmasked first choice and the copy path's share of each token's
    probability for the previous token."""

    def __init__(self, *args):
        super().__init__(*args)
        self.first_choice, self.copy_share_of_previous = [], []

    def __call__(self, prefix: torch.Tensor) -> torch.Tensor:
        hidden = self.model.decode(prefix[:, -1:], self.memory_kv, self.caches, offset=prefix.size(1) - 1)[:, -1]
        log_probs = self.model.next_token_log_probs(hidden, self.source, self.user)
        previous = prefix[:, -1]
        rows = torch.arange(prefix.size(0))
        share = torch.zeros(prefix.size(0))
        if self.model.cfg.copy and self.source is not None:
            attention, p_gen = self.model.copy_attention(hidden[:, None], self.source)
            copied = torch.zeros_like(log_probs).scatter_add_(1, self.source.ids, attention[:, 0].float())
            share = (1 - p_gen[:, 0, 0]) * copied[rows, previous] / log_probs[rows, previous].exp().clamp(min=1e-12)
        self.first_choice.append(log_probs.argmax(dim=-1))
        self.copy_share_of_previous.append(share)
        return log_probs


def causes(params, workspace: Path, name: str, path: Path) -> dict:
    run, _, inputs = runs.training_run(params, workspace)
    samples = pl.read_parquet(inputs["samples"])
    vocabulary = conv_train.conv_vocabulary(pl.read_parquet(inputs["vocab"]))
    data = conv_train.responses(samples, run.valid, "valid", vocabulary)
    count = min(params.choose_decoding.valid_turns, len(data))
    rows = data.rows[np.sort(np.random.default_rng(params.seed).choice(len(data), count, replace=False))]
    model, _ = conv_runs.load_conversation_model(path)
    decoding = params.evaluate.decoding
    rules = Rules.of(decoding, vocabulary.banned_ids)
    repeats = own = responses_with = 0
    copy_shares = []
    with evaluating(model), torch.no_grad():
        frozen = conv_train.FrozenStates(model, run, contexts=False)
        for first in range(0, len(rows), decoding.batch_size):
            batch_rows = rows[first : first + decoding.batch_size]
            memories, source = conv_train._batch(model, run, run.valid, batch_rows, frozen)
            step = RecordingStepper(model.generator, memories, source, True)
            batch = next(iter(memories.values())).states.size(0)
            said = greedy_search(step, batch, model.generator.cfg, decoding.max_tokens, rules)
            for row, tokens in enumerate(said):
                at = [t for t in range(1, len(tokens)) if tokens[t] == tokens[t - 1]]
                responses_with += bool(at)
                for t in at:
                    repeats += 1
                    own += int(step.first_choice[t][row]) == tokens[t]
                    copy_shares.append(float(step.copy_share_of_previous[t][row]))
    return {
        "responses": len(rows),
        "responses_with_a_repeat": responses_with,
        "repeats": repeats,
        "decoders_first_choice": own,
        "first_choice_blocked": repeats - own,
        "mean_copy_share_of_the_repeated_token": float(np.mean(copy_shares)) if copy_shares else None,
        "repeats_mostly_copied": sum(s > 0.5 for s in copy_shares),
    }


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    params = load_params("params.yaml")
    workspace = Path(".")
    files = conv_runs.conv_model_files(params, workspace)
    found = {}
    with_copy = [n for n, p in files.items() if conv_runs.load_conversation_model(p)[1].generator.get("copy")]
    for name in names or with_copy:
        found[name] = causes(params, workspace, name, files[name])
        print(name, found[name], flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(found, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
