"""Reading pickles from public repositories without running their code or letting them allocate at will.

pickle.load executes whatever a pickle names; these files come from strangers. The unpickler here admits only the
container types that such files are built with: list, tuple, dict, set and frozenset (older protocols build sets by
calling set on a list; a complex number likewise), collections.defaultdict (KGSF's subkg.pkl: a defaultdict(list)) and
collections.OrderedDict. Scalars need no admitting: pickle writes them as opcodes. No type that takes a size is
admitted (bytes, bytearray: `bytearray(8000000000)` would allocate 8 GB), and a file over MAX_BYTES is refused before
reading.
"""

import pickle
from pathlib import Path

_CONTAINERS = ("list", "tuple", "dict", "set", "frozenset")
# Protocols 0-2 name the builtins module __builtin__ (Python 2's name); complex(real, imag) is how they write a
# complex number (two floats, no size).
ALLOWED = {(module, name) for module in ("builtins", "__builtin__") for name in (*_CONTAINERS, "complex")} | {
    ("collections", "defaultdict"),
    ("collections", "OrderedDict"),
}
MAX_BYTES = 256 * 2**20  # the largest file read this way (entity2entityId.pkl) is 3.8 MB


class PickleSafetyError(ValueError):
    """A pickle names something other than the admitted containers, or cannot be read; names the file."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise PickleSafetyError(
                f"{self.path}: pickle holds {module}.{name}; only builtin containers "
                f"({', '.join(_CONTAINERS)}), complex, collections.defaultdict and OrderedDict "
                "are allowed"
            )
        return super().find_class(module, name)


def load_pickle_restricted(path: Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise PickleSafetyError(f"{path}: {size} bytes, more than the {MAX_BYTES} a pickle read here may have")
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, path).load()
        except PickleSafetyError:
            raise
        except Exception as exc:  # a truncated or corrupt pickle raises many kinds of errors
            raise PickleSafetyError(f"{path}: not a readable pickle: {type(exc).__name__}: {exc}") from None
