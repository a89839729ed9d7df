"""Decoding rules on hand-built steppers (the ban on the previous token, the repetition penalty as its formula says),
choose_decoding's rule on a hand-made table of settings, its reading by evaluate and the chat, and the config."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import yaml

from models.decoding import Rules, beam_search, greedy_search
from pipeline.config import ConfigError, load_params
from stages.evaluation import decoding_choice
from tests.conftest import PROJECT

IDS = SimpleNamespace(pad_id=0, start_id=1, end_id=2)


class TableStepper:
    """Next-token log-probabilities from a fixed table by the last token: rows = [batch * beams, vocab]; after the
    end token or padding (a finished beam), anything (the search overrides it)."""

    def __init__(self, table: dict[int, list[float]]):
        self.table = table

    def __call__(self, prefix: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.table.get(int(last), [0.2] * 5) for last in prefix[:, -1]]).log()

    def reorder(self, rows: torch.Tensor) -> None:
        pass


# vocab: pad, start, end, "so" (3), "good" (4). After "so", "so" again is most likely.
SO_SO = TableStepper(
    {
        1: [0.0, 0.0, 0.05, 0.9, 0.05],
        3: [0.0, 0.0, 0.1, 0.6, 0.3],
        4: [0.0, 0.0, 0.9, 0.05, 0.05],
    }
)


def test_without_rules_the_stepper_repeats_a_word_and_the_ban_stops_it():
    assert greedy_search(SO_SO, 1, IDS, max_tokens=4, rules=Rules(banned_ids=(0, 1))) == [[3, 3, 3, 3]]
    banned = Rules(block_repeat_word=True, banned_ids=(0, 1))
    assert greedy_search(SO_SO, 1, IDS, max_tokens=4, rules=banned) == [[3, 4]]
    assert beam_search(SO_SO, 1, IDS, max_tokens=4, beam_size=2, rules=banned) == [[3, 4]]
    # 3-gram blocking cannot stop a word said twice in a row: "so so" is a bigram
    trigram = Rules(block_ngram=3, banned_ids=(0, 1))
    assert greedy_search(SO_SO, 1, IDS, max_tokens=3, rules=trigram)[0][:2] == [3, 3]


def test_the_penalty_divides_an_already_said_tokens_probability():
    """After "so": P(so) = 0.6, P(good) = 0.3. Penalty 1.5: 0.6 / 1.5 = 0.4 > 0.3, "so" again; penalty 2.5:
    0.6 / 2.5 = 0.24 < 0.3, "good"."""
    mild = Rules(repetition_penalty=1.5, banned_ids=(0, 1))
    assert greedy_search(SO_SO, 1, IDS, max_tokens=2, rules=mild) == [[3, 3]]
    strong = Rules(repetition_penalty=2.5, banned_ids=(0, 1))
    assert greedy_search(SO_SO, 1, IDS, max_tokens=2, rules=strong) == [[3, 4]]


def test_the_penalty_is_a_log_probability_subtraction_once_per_token():
    from models.decoding import _mask_tokens

    log_probs = torch.tensor([[0.5, 0.25, 0.25]]).log()
    got = _mask_tokens(log_probs.clone(), [[0, 0, 1]], Rules(repetition_penalty=2.0))
    expected = log_probs - torch.tensor([[math.log(2.0), math.log(2.0), 0.0]])
    assert torch.allclose(got, expected)


def test_rules_refuse_a_penalty_below_one():
    with pytest.raises(ValueError, match="repetition_penalty >= 1"):
        Rules(repetition_penalty=0.9)


def _row(method="greedy", block=0, penalty=1.0, ban=False, bleu=0.1, in_a_row=0.0, bigram=0.0):
    setting = {"method": method, "block_ngram": block, "repetition_penalty": penalty, "block_repeat_word": ban}
    return {"setting": setting, "metrics": {"bleu@2": bleu, "repeat_in_a_row": in_a_row, "repeat@2": bigram}}


GOLD = {"repeat_in_a_row": 0.03, "repeat@2": 0.07}


def test_the_rule_takes_the_best_bleu_among_settings_that_repeat_no_more_than_people():
    rows = [
        _row(bleu=0.20, in_a_row=0.10),  # best BLEU, but repeats words more than people
        _row(block=3, bleu=0.15, in_a_row=0.02, bigram=0.08),  # bigrams more than people
        _row(ban=True, bleu=0.12, in_a_row=0.0, bigram=0.05),
        _row(method="beam", ban=True, bleu=0.13, in_a_row=0.0, bigram=0.07),  # at the gold share: qualifies
    ]
    assert decoding_choice.pick(rows, GOLD) is rows[3]


def test_a_tie_at_four_decimals_goes_to_the_simpler_setting():
    rows = [
        _row(method="beam", bleu=0.12341),
        _row(block=3, penalty=1.2, bleu=0.12344),
        _row(block=3, bleu=0.12339),
    ]
    assert decoding_choice.pick(rows, GOLD) is rows[2]  # greedy, one rule on


def test_without_a_qualifying_setting_the_least_repetition_wins():
    rows = [_row(bleu=0.3, in_a_row=0.2), _row(ban=True, bleu=0.1, in_a_row=0.05, bigram=0.3)]
    assert decoding_choice.pick(rows, GOLD) is rows[1]


def test_the_grid_is_every_combination_and_the_reference_simplest_first():
    grid = {"method": ["greedy"], "block_ngram": [0], "repetition_penalty": [1.0, 1.2], "block_repeat_word": [False]}
    default = {"method": "beam", "block_ngram": 3, "repetition_penalty": 1.0, "block_repeat_word": False}
    settings = decoding_choice.grid_settings(grid, {**default, "beam_size": 4})
    assert settings == [
        {"method": "greedy", "block_ngram": 0, "repetition_penalty": 1.0, "block_repeat_word": False},
        {"method": "greedy", "block_ngram": 0, "repetition_penalty": 1.2, "block_repeat_word": False},
        default,
    ]


def test_evaluate_requires_the_choice_and_the_chat_falls_back_to_evaluate_decoding(tmp_path):
    default = load_params(PROJECT / "params.yaml").evaluate.decoding
    with pytest.raises(decoding_choice.DecodingChoiceError, match="decoding.json: not found; run"):
        decoding_choice.chosen_decoding(tmp_path, default, "c2crs")
    assert decoding_choice.chosen_decoding(tmp_path, default, "c2crs", required=False) is default
    chosen = {"method": "beam", "block_ngram": 0, "repetition_penalty": 1.2, "block_repeat_word": True}
    (tmp_path / "reports").mkdir()
    (tmp_path / decoding_choice.DECODING_JSON).write_text(json.dumps({"generators": {"c2crs": {"chosen": chosen}}}))
    got = decoding_choice.chosen_decoding(tmp_path, default, "c2crs")
    assert {key: getattr(got, key) for key in chosen} == chosen and got.max_tokens == default.max_tokens
    with pytest.raises(decoding_choice.DecodingChoiceError, match="no chosen setting for generator 'kgsf'"):
        decoding_choice.chosen_decoding(tmp_path, default, "kgsf")
    assert decoding_choice.chosen_decoding(tmp_path, default, "kgsf", required=False) is default
    bad = {**chosen, "repetition_penalty": 0.5}
    (tmp_path / decoding_choice.DECODING_JSON).write_text(json.dumps({"generators": {"c2crs": {"chosen": bad}}}))
    with pytest.raises(decoding_choice.DecodingChoiceError, match="c2crs's choice is not a decoding setting"):
        decoding_choice.chosen_decoding(tmp_path, default, "c2crs")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("evaluate.decoding.repetition_penalty", 0.8, "evaluate.decoding.repetition_penalty: Input should be greater"),
        ("evaluate.decoding.block_repeat_word", "yes", "evaluate.decoding.block_repeat_word: Input should be a valid"),
        ("choose_decoding.valid_turns", 0, "choose_decoding.valid_turns: Input should be greater"),
        ("choose_decoding.grid.method", ["greedy", "sample"], "choose_decoding.grid.method.1: Input should be"),
        ("choose_decoding.grid.block_ngram", [3, 3], "choose_decoding.grid.block_ngram: Value error, [3, 3]: a value"),
        ("choose_decoding.grid.repetition_penalty", [], "choose_decoding.grid.repetition_penalty: List should have"),
        ("choose_decoding.grid.repetition_penalty", [0.5], "choose_decoding.grid.repetition_penalty.0: Input should"),
    ],
)
def test_the_config_refuses_bad_decoding_values_naming_the_key(tmp_path, key, value, message):
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    *parents, last = key.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[last] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError) as error:
        load_params(tmp_path / "params.yaml")
    assert message in str(error.value)
