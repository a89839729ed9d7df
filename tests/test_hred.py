"""ReDial's generator (models/hred.py, stages/training/hred_train.py): utterances from a context, the hierarchical
encoder, and decoding that agrees with teacher forcing."""

import pytest
import torch

from models.decoding import beam_search, greedy_search
from models.hred import HRED, HREDConfig, HREDStepper
from stages.training.hred_train import context_utterances

PAD, START, END, SPLIT = 0, 1, 2, 4


def _model(seed: int = 0) -> HRED:
    torch.manual_seed(seed)
    return HRED(
        HREDConfig(
            vocab_size=12,
            dim=8,
            context_dim=16,
            dropout=0.0,
            pad_id=0,
            start_id=1,
            end_id=2,
            split_id=SPLIT,
            max_utterance_tokens=3,
        )
    ).eval()


def test_a_context_splits_into_its_utterances_each_cut_to_its_last_tokens():
    assert context_utterances([5, 6, SPLIT, 7, 8, 9, 10, SPLIT, 11], SPLIT, 3) == [[5, 6], [8, 9, 10], [11]]
    assert context_utterances([SPLIT, 5, SPLIT, SPLIT], SPLIT, 3) == [[5]]
    assert context_utterances([], SPLIT, 3) == [[SPLIT]]  # an empty context is one (split) utterance


def test_padding_utterances_and_padding_tokens_do_not_change_the_state():
    model = _model()
    one = torch.tensor([[[5, 6, PAD], [7, PAD, PAD]]])
    padded = torch.tensor([[[5, 6, PAD, PAD], [7, PAD, PAD, PAD], [PAD, PAD, PAD, PAD]]])
    assert torch.allclose(model.encode(one), model.encode(padded), atol=1e-6)
    both = torch.tensor([[[5, 6, PAD], [7, PAD, PAD]], [[9, PAD, PAD], [PAD, PAD, PAD]]])
    alone = model.encode(torch.tensor([[[9]]]))
    assert torch.allclose(model.encode(both)[:, 1], alone[:, 0], atol=1e-6)
    with pytest.raises(ValueError, match="at least one utterance"):
        model.encode(torch.tensor([[[PAD, PAD]]]))


def test_step_by_step_decoding_gives_the_teacher_forced_log_probs():
    model = _model()
    state = model.encode(torch.tensor([[[5, 6], [7, PAD]], [[8, PAD], [PAD, PAD]]]))
    inputs = torch.tensor([[START, 5, 6], [START, 9, PAD]])
    targets = torch.tensor([[5, 6, END], [9, END, PAD]])
    outputs, _ = model.decode(inputs, state)
    forced = model.target_log_probs(outputs, targets)
    step = HREDStepper(model, state)
    for t in range(2):
        log_probs = step(inputs[:, : t + 1])
        for b in range(2):
            if targets[b, t] != PAD:
                assert float(log_probs[b, targets[b, t]]) == pytest.approx(float(forced[b, t]), abs=1e-5)
    assert (forced[targets.eq(PAD)] == 0).all()


def test_a_beam_of_one_is_greedy_and_both_stop_at_max_tokens():
    model = _model(1)
    state = model.encode(torch.tensor([[[5, 6]], [[7, 8]], [[9, PAD]]]))
    greedy = greedy_search(HREDStepper(model, state), 3, model.cfg, max_tokens=5)
    beam = beam_search(HREDStepper(model, state), 3, model.cfg, max_tokens=5, beam_size=1)
    assert greedy == beam and all(len(r) <= 5 for r in greedy)
    wide = beam_search(HREDStepper(model, state.repeat_interleave(3, dim=1)), 3, model.cfg, max_tokens=5, beam_size=3)
    assert len(wide) == 3 and all(len(r) <= 5 for r in wide)
