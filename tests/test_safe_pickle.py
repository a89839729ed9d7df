"""stages/sources/safe_pickle.py on crafted pickles: no code runs, nothing allocates at the pickle's say, and what the
public files hold still loads."""

import collections
import pickle

import pytest

from stages.sources import safe_pickle
from stages.sources.safe_pickle import PickleSafetyError, load_pickle_restricted


@pytest.mark.parametrize(
    "payload, named",
    [
        (b"cbuiltins\nbytearray\n(I8000000000\ntR.", "builtins.bytearray"),  # an 8 GB allocation if called
        (b"c__builtin__\nbytearray\n(I8000000000\ntR.", "__builtin__.bytearray"),
        (b"cbuiltins\nbytes\n(I8000000000\ntR.", "builtins.bytes"),
        (b"cos\nsystem\n(S'echo owned'\ntR.", "os.system"),
        (b"cbuiltins\neval\n(S'1+1'\ntR.", "builtins.eval"),
        (b"cbuiltins\nint\n(S'12'\ntR.", "builtins.int"),  # scalars are opcodes: no reason to call a type
    ],
)
def test_a_pickle_naming_anything_but_containers_is_refused_before_it_runs(tmp_path, payload, named):
    path = tmp_path / "crafted.pkl"
    path.write_bytes(payload)
    with pytest.raises(PickleSafetyError, match=f"crafted.pkl: pickle holds {named}; only builtin containers"):
        load_pickle_restricted(path)


def test_the_containers_of_the_public_files_load_in_every_protocol(tmp_path):
    value = {
        "subkg": collections.defaultdict(list, {1: [(2, 3)]}),
        "ids": {"a": 1},
        "s": {1, 2},
        "f": frozenset({3}),
        "t": (1, "x", 2.5, None, True),
        "o": collections.OrderedDict(a=1),
    }
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(value, protocol=protocol))
        assert load_pickle_restricted(path) == value


def test_an_oversized_or_corrupt_pickle_is_named(tmp_path, monkeypatch):
    path = tmp_path / "big.pkl"
    path.write_bytes(pickle.dumps(list(range(1000))))
    monkeypatch.setattr(safe_pickle, "MAX_BYTES", 100)
    with pytest.raises(PickleSafetyError, match=r"big.pkl: \d+ bytes, more than the 100"):
        load_pickle_restricted(path)
    monkeypatch.undo()
    path.write_bytes(pickle.dumps(list(range(1000)))[:50])
    with pytest.raises(PickleSafetyError, match="big.pkl: not a readable pickle"):
        load_pickle_restricted(path)
