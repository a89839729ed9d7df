"""Reading pickles from public repositories without running their code.

pickle.load executes whatever a pickle names; these files come from strangers. The unpickler here admits only
builtin containers and scalars and collections.defaultdict, which is all the KGSF and RevCore files hold.
"""

import pickle
from pathlib import Path

_SCALARS_AND_CONTAINERS = ("dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bytes", "bytearray",
                           "bool", "complex")
# Protocols 0-2 name the builtins module __builtin__ (Python 2's name), with unicode and long.
ALLOWED = ({("builtins", name) for name in _SCALARS_AND_CONTAINERS}
           | {("__builtin__", name) for name in (*_SCALARS_AND_CONTAINERS, "unicode", "long")}
           | {("collections", "defaultdict"), ("collections", "OrderedDict")})


class PickleSafetyError(ValueError):
    """A pickle names something other than builtin containers and scalars."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED:
            raise PickleSafetyError(f"{self.path}: pickle holds {module}.{name}; only builtin containers, scalars "
                                    "and collections.defaultdict are allowed")
        return super().find_class(module, name)


def load_pickle_restricted(path: Path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, path).load()
        except PickleSafetyError:
            raise
        except Exception as exc:  # a truncated or corrupt pickle raises many kinds of errors
            raise PickleSafetyError(f"{path}: not a readable pickle: {type(exc).__name__}: {exc}") from None
