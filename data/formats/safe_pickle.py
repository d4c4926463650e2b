"""Loading the ``refs(*).p`` pickles of the refer toolkit without running arbitrary code.

A pickle can name any importable callable and call it while loading (``os.system`` included).
The refer pickles only hold lists, dicts, strings and numbers, which need no global at all, so
:class:`PlainDataUnpickler` refuses every global except a short list of harmless constructors of
plain containers. Python 2 pickles (the original release) load too: their ``str`` bytes are
decoded as UTF-8 (invalid bytes replaced).
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
from pathlib import Path
from typing import Any

from samtok.data.records import RecordError

# (module, name) pairs a plain-data pickle may reference (Python 3 names; Python 2 names are
# mapped first, as ``fix_imports`` does).
ALLOWED_GLOBALS = frozenset(
    {
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
        ("builtins", "complex"),
        ("collections", "OrderedDict"),
        # protocol <= 2 pickles of ``bytes`` written by Python 3 call _codecs.encode(str, 'latin1')
        ("_codecs", "encode"),
    }
)


def python3_name(module: str, name: str) -> tuple[str, str]:
    """The Python 3 name of a global a Python 2 pickle names (``__builtin__.set`` -> ``builtins.set``)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class UnsafePickleError(RecordError):
    """A pickle references a class or function outside :data:`ALLOWED_GLOBALS`: refused."""


class PlainDataUnpickler(pickle.Unpickler):
    """An unpickler that only builds builtin containers and scalars."""

    def __init__(self, file: io.BufferedIOBase, source: str):
        super().__init__(file, fix_imports=True, encoding="utf-8", errors="replace")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        module, name = python3_name(module, name)
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self._source}: refused to load the global '{module}.{name}': only plain builtin data "
            f"(lists, dicts, strings, numbers, sets) is allowed in a refs pickle"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: refused a persistent reference in a refs pickle")


def load_plain_pickle(path: str | Path) -> Any:
    """Load a pickle made only of plain builtin data; anything else raises :class:`RecordError`."""
    p = Path(path)
    if not p.is_file():
        raise RecordError(f"pickle file not found: {p}")
    with p.open("rb") as f:
        try:
            return PlainDataUnpickler(f, str(p)).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
            raise RecordError(f"{p}: not a readable pickle: {type(exc).__name__}: {exc}") from exc


def dump_plain_pickle(obj: Any, path: str | Path) -> Path:
    """Write plain data as a protocol-2 pickle (the protocol of the original refer release)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    with tmp.open("wb") as f:
        pickle.dump(obj, f, protocol=2)
    tmp.replace(p)
    return p
