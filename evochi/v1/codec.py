"""State codecs: how a worker's state becomes the bytes the server relays.

The published client encodes a state as ``zstd(pickle(state))``; `PickleZstdCodec` keeps
that format so fleets can mix clients. Unlike the published client it does not unpickle
whatever arrives: a state received from the network may come from any peer that reached
the server, and an unrestricted `pickle.loads` lets such a peer run code on every worker.
Decoding therefore resolves only allow-listed globals.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable
from typing import Any, Generic, Protocol, TypeVar

import zstandard

from evochi.v1.errors import StateDecodeError

S = TypeVar("S")

# Plain data a state may contain without naming it: containers, scalars and the
# reconstructors pickle emits for them. Each entry is (module, qualified name).
SAFE_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    [
        *(
            ("builtins", name)
            for name in (
                "dict",
                "list",
                "tuple",
                "set",
                "frozenset",
                "str",
                "bytes",
                "bytearray",
                "int",
                "float",
                "complex",
                "bool",
                "slice",
                "range",
                "object",
            )
        ),
        ("copyreg", "_reconstructor"),
        ("collections", "OrderedDict"),
        ("collections", "defaultdict"),
        ("collections", "deque"),
        ("collections", "Counter"),
        ("datetime", "datetime"),
        ("datetime", "date"),
        ("datetime", "timedelta"),
        ("datetime", "timezone"),
        # numpy arrays and scalars (module path changed in numpy 2).
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "float32"),
        ("numpy", "float64"),
        ("numpy", "int32"),
        ("numpy", "int64"),
        ("numpy", "bool_"),
        ("numpy.random._pickle", "__randomstate_ctor"),
        ("numpy.random._pickle", "__generator_ctor"),
        ("numpy.random._pickle", "__bit_generator_ctor"),
    ]
)


class StateCodec(Protocol[S]):
    """Turns a state into bytes and back. Implementations must be deterministic enough
    that every worker decodes the same state from the same bytes."""

    def encode(self, state: S) -> bytes: ...

    def decode(self, data: bytes) -> S: ...


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, allowed: frozenset[tuple[str, str]], types: frozenset[type]):
        super().__init__(io.BytesIO(data))
        self._allowed = allowed
        self._types = types

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return super().find_class(module, name)
        if any(t.__module__ == module and t.__qualname__ == name for t in self._types):
            return super().find_class(module, name)
        raise StateDecodeError(
            f"refusing to unpickle {module}.{name}: not on the state allow-list. "
            "If this type is part of your state, allow it with "
            "PickleZstdCodec(allowed_types=[...]) (only for peers you trust)."
        )


def restricted_loads(
    data: bytes,
    allowed_types: Iterable[type] = (),
    allowed_globals: Iterable[tuple[str, str]] = (),
) -> Any:
    """`pickle.loads` that resolves only SAFE_GLOBALS, `allowed_types` and `allowed_globals`.

    Raises StateDecodeError for anything else, before any code from the payload runs.
    """
    allowed = SAFE_GLOBALS | frozenset(allowed_globals)
    try:
        return _AllowListUnpickler(data, allowed, frozenset(allowed_types)).load()
    except StateDecodeError:
        raise
    except Exception as exc:  # truncated data raises many types; report one
        raise StateDecodeError(f"state is not a valid pickle: {exc}") from exc


class PickleZstdCodec(Generic[S]):
    """``zstd(pickle(state))``, wire-compatible with the published evochi client.

    `allowed_types` are the classes the state is built from (dataclasses, enums...).
    `trusted=True` restores unrestricted unpickling: only for closed networks where every
    peer is trusted.
    """

    def __init__(
        self,
        allowed_types: Iterable[type] = (),
        *,
        trusted: bool = False,
        level: int = 3,
    ) -> None:
        self.allowed_types: frozenset[type] = frozenset(allowed_types)
        self.trusted = trusted
        self._compressor = zstandard.ZstdCompressor(level=level)
        self._decompressor = zstandard.ZstdDecompressor()

    def allow(self, *types: type) -> None:
        """Adds types the state may contain."""
        self.allowed_types = self.allowed_types | frozenset(types)

    def encode(self, state: S) -> bytes:
        return self._compressor.compress(pickle.dumps(state))

    def decode(self, data: bytes) -> S:
        try:
            # decompressobj also accepts frames that do not record their content size,
            # which some zstd writers omit.
            stream = self._decompressor.decompressobj()
            raw = stream.decompress(data)
        except zstandard.ZstdError as exc:
            raise StateDecodeError(f"state is not a valid zstd frame: {exc}") from exc
        if not stream.eof:
            raise StateDecodeError("state is truncated: the zstd frame does not end")
        if self.trusted:
            try:
                return pickle.loads(raw)
            except Exception as exc:
                raise StateDecodeError(f"state is not a valid pickle: {exc}") from exc
        return restricted_loads(raw, self.allowed_types)
