"""Reading pickles from public repositories without running their code.

pickle.load executes whatever a pickle names; these files come from strangers. The unpickler here admits only
builtin containers and scalars and collections.defaultdict, which is all the KGSF and RevCore files hold.
"""

import pickle
from pathlib import Path

ALLOWED = {
    ("builtins", name) for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bytes",
                                    "bool", "complex", "bytearray")
} | {("collections", "defaultdict"), ("collections", "OrderedDict")}


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
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, path).load()
        except PickleSafetyError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
            raise PickleSafetyError(f"{path}: not a readable pickle: {exc}") from None
