"""Decode function-call results without letting sandboxed code run on the caller's machine.

A result pickle is produced inside the sandbox, i.e. by code we do not trust; unpickling it with the
full pickle machinery would let that code execute on the trainer host. By default only plain data and
builtin exceptions are accepted; `trust_results=True` on the sandbox opts into full cloudpickle.
"""

from __future__ import annotations

import builtins
import io
import pickle

import cloudpickle

_SAFE_BUILTINS = {
    "int", "float", "complex", "bool", "str", "bytes", "bytearray", "list", "tuple", "dict", "set",
    "frozenset", "slice", "range", "NoneType", "Ellipsis", "getattr",
}  # fmt: skip
_SAFE_MODULE_NAMES = {
    ("collections", "OrderedDict"), ("collections", "defaultdict"), ("collections", "deque"),
    ("datetime", "datetime"), ("datetime", "date"), ("datetime", "timedelta"), ("decimal", "Decimal"),
    ("fractions", "Fraction"), ("copyreg", "_reconstructor"),
}  # fmt: skip


class UntrustedResult(pickle.UnpicklingError):
    """The result needs classes outside the safe set; pass trust_results=True if you trust the code."""


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # type: ignore[override]
        if module == "builtins":
            obj = getattr(builtins, name, None)
            if name in _SAFE_BUILTINS or (isinstance(obj, type) and issubclass(obj, BaseException)):
                return obj
        if (module, name) in _SAFE_MODULE_NAMES:
            return super().find_class(module, name)
        raise UntrustedResult(
            f"result needs {module}.{name}, which is not in the safe set; "
            "create the sandbox with trust_results=True to allow it"
        )


def decode_result(blob: bytes, trusted: bool) -> object:
    if trusted:
        return cloudpickle.loads(blob)
    return _SafeUnpickler(io.BytesIO(blob)).load()
