"""Training state <-> bytes, and checkpoints on disk in the same format.

One blob is a valid safetensors file:

* tensors: ``params`` (float32 ``[P]``), ``opt.<key>`` (optimizer state), ``extra.<key>``
  (user tensors);
* header ``__metadata__`` (str -> str): ``evochi.format`` (:data:`STATE_FORMAT`),
  ``evochi.meta`` (base64 of a pickle of plain data: epoch, :class:`ESConfig`, noise
  fingerprint, library versions, user metadata) and ``evochi.checksum`` (sha256 over the
  metadata and every tensor's name, dtype, shape and bytes).

Decoding verifies the checksum before unpickling, and unpickles with an allow-list (builtin
containers and scalars plus :class:`ESConfig`), so a crafted payload cannot run code: it gets a
:class:`evochi.v1.StateDecodeError`, the one class every codec raises for undecodable bytes
(re-exported here). ``safetensors.torch.load_file(path)`` reads a checkpoint directly.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import io
import json
import os
import pickle
import struct
import tempfile
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from evochi.v1.errors import StateDecodeError

from .config import ESConfig
from .population import load_flat
from .state import (
    NoiseMismatchError,
    TorchESState,
    check_noise,
    initial_state,
    library_versions,
)

__all__ = [
    "STATE_FORMAT",
    "NoiseMismatchError",
    "StateDecodeError",
    "TorchESState",
    "check_noise",
    "decode_state",
    "encode_state",
    "initial_state",
    "library_versions",
    "load_checkpoint",
    "load_policy",
    "save_checkpoint",
    "save_state_dict",
    "state_digest",
]

#: Value of the ``evochi.format`` header entry; bump on incompatible layout changes.
STATE_FORMAT = "evochi-torch-state/1"

_PARAMS = "params"
_OPT = "opt."
_EXTRA = "extra."
_CHECKSUM_KEY = "evochi.checksum"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


# --- pickle allow-list -------------------------------------------------------------------------

_ALLOWED_GLOBALS = frozenset(
    {
        ("builtins", "complex"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
        ("builtins", "range"),
        ("builtins", "slice"),
        ("collections", "OrderedDict"),
        ("evochi_torch.config", "ESConfig"),
    }
)


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise StateDecodeError(
            f"refusing to unpickle global {module}.{name}: state metadata may only hold plain "
            "data (builtin containers and scalars) and ESConfig"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise StateDecodeError("refusing persistent ids in state metadata")


def _safe_loads(data: bytes) -> Any:
    try:
        return _SafeUnpickler(io.BytesIO(data)).load()
    except StateDecodeError:
        raise
    except Exception as exc:
        raise StateDecodeError(f"corrupt state metadata: {type(exc).__name__}: {exc}") from None


# --- encoding ------------------------------------------------------------------------------------


def _checksum(header: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    # Covers every header entry but the checksum itself (so even the conventional "format"
    # entry cannot be flipped unnoticed) and each tensor's name, dtype, shape and bytes.
    h = hashlib.sha256()
    h.update(STATE_FORMAT.encode() + b"\0")
    entries = {k: v for k, v in header.items() if k != _CHECKSUM_KEY}
    _hash_json(h, entries)
    _hash_tensors(h, tensors)
    return "sha256:" + h.hexdigest()


def _hash_json(h: Any, obj: Any) -> None:
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=repr).encode()
    h.update(struct.pack("<Q", len(canon)) + canon)


def _hash_tensors(h: Any, tensors: dict[str, torch.Tensor]) -> None:
    for name in sorted(tensors):
        t = tensors[name]
        desc = f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode()
        h.update(struct.pack("<Q", len(desc)) + desc)
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(struct.pack("<Q", raw.nbytes))
        h.update(memoryview(raw))


#: Prefix of :func:`state_digest`'s hash input; bump when what it covers changes.
DIGEST_FORMAT = "evochi-torch-center/1"


def state_digest(state: TorchESState) -> bytes:
    """The sha256 (32 bytes) of everything that decides what a worker evaluates next.

    Covers the epoch, the config, the noise fingerprint, every tensor (center, strategy
    state, user tensors such as observation statistics) and the user's plain data; not the
    library versions, which legitimately differ between the workers of one training. Two
    workers with equal digests perturb the same center in the same way.
    """
    h = hashlib.sha256()
    h.update(DIGEST_FORMAT.encode() + b"\0")
    _hash_json(
        h,
        {
            "epoch": int(state.epoch),
            "config": _digest_config(state.config),
            "noise": str(state.noise_fingerprint),
            "extra": state.extra,
        },
    )
    _hash_tensors(h, _cpu_tensors(state))
    return h.digest()


def _digest_config(config: ESConfig) -> dict[str, Any]:
    values = config.to_dict()
    if values["perturbation"] == "full":
        # Full-rank runs hash the fields they always had, so that workers of releases before
        # the low-rank fields agree on a full-rank state's digest.
        del values["perturbation"], values["rank"]
    return values


def _cpu_tensors(state: TorchESState) -> dict[str, torch.Tensor]:
    named: dict[str, torch.Tensor] = {_PARAMS: state.params}
    for prefix, group in ((_OPT, state.opt_state), (_EXTRA, state.extra_tensors)):
        for key, t in group.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"tensor keys must be non-empty strings, got {key!r}")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{prefix}{key} must be a torch.Tensor, got {type(t).__name__}")
            named[prefix + key] = t
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in named.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        # safetensors refuses tensors sharing storage (views of one buffer): copy those.
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def encode_state(state: TorchESState) -> bytes:
    """Serialize ``state`` to one safetensors blob (see the module docstring for the layout)."""
    if not isinstance(state.config, ESConfig):
        raise TypeError(f"state.config must be an ESConfig, got {type(state.config).__name__}")
    params = state.params
    if params.dim() != 1 or params.dtype != torch.float32:
        raise ValueError(
            f"state.params must be a flat float32 tensor, got {params.dtype} {tuple(params.shape)}"
        )
    meta_obj = {
        "epoch": int(state.epoch),
        "config": state.config,
        "noise_fingerprint": str(state.noise_fingerprint),
        "versions": dict(state.versions),
        "extra": state.extra,
    }
    meta = pickle.dumps(meta_obj, protocol=pickle.HIGHEST_PROTOCOL)
    # Fail at save time, not at the next worker's load, if `extra` holds non-plain objects.
    try:
        _safe_loads(meta)
    except StateDecodeError as exc:
        raise ValueError(f"state.extra must be plain data: {exc}") from None
    tensors = _cpu_tensors(state)
    header = {
        "format": "pt",
        "evochi.format": STATE_FORMAT,
        "evochi.meta": base64.b64encode(meta).decode("ascii"),
    }
    header[_CHECKSUM_KEY] = _checksum(header, tensors)
    return _canonical(safetensors.torch.save(tensors, metadata=header))


def _canonical(blob: bytes) -> bytes:
    """The blob with its JSON header's keys sorted. safetensors writes the metadata in its
    hash map's order, which changes from process to process, so the same state got other
    bytes in another worker or run; now one state has one encoding (byte-identical
    checkpoints and share-state payloads). The tensor data is not touched: its offsets are
    relative to the end of the header."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes with spaces
    return struct.pack("<Q", len(text)) + text + blob[8 + n :]


def _read_header(blob: bytes) -> dict[str, Any]:
    if len(blob) < 8:
        raise StateDecodeError(f"state blob truncated: {len(blob)} bytes, need at least 8")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > _MAX_HEADER:
        raise StateDecodeError(f"corrupt state blob: header length {n} is implausible")
    if 8 + n > len(blob):
        raise StateDecodeError(
            f"state blob truncated: header needs {8 + n} bytes, blob has {len(blob)}"
        )
    try:
        header = json.loads(blob[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateDecodeError(f"corrupt state blob: unreadable header ({exc})") from None
    if not isinstance(header, dict):
        raise StateDecodeError("corrupt state blob: header is not a JSON object")
    return header


def decode_state(blob: bytes | bytearray | memoryview) -> TorchESState:
    """Parse and verify a blob from :func:`encode_state`.

    Raises :class:`StateDecodeError` (a ``ValueError``) on truncated, corrupt, foreign or unsafe
    data. Never executes code from the payload.
    """
    blob = bytes(blob)
    header = _read_header(blob)
    meta_header = header.get("__metadata__")
    if not isinstance(meta_header, dict) or meta_header.get("evochi.format") != STATE_FORMAT:
        found = meta_header.get("evochi.format") if isinstance(meta_header, dict) else None
        raise StateDecodeError(
            f"not an evochi-torch state: expected format {STATE_FORMAT!r}, found {found!r}"
        )
    expected = meta_header.get(_CHECKSUM_KEY)
    if not isinstance(expected, str):
        raise StateDecodeError("corrupt state blob: no checksum entry")
    try:
        tensors = safetensors.torch.load(blob)
    except Exception as exc:  # SafetensorError is not exported consistently across versions
        raise StateDecodeError(f"corrupt or truncated state blob: {exc}") from None
    if not hmac.compare_digest(_checksum(meta_header, tensors).encode(), expected.encode()):
        raise StateDecodeError("state blob checksum mismatch: the data is corrupt")
    try:
        meta = base64.b64decode(meta_header["evochi.meta"], validate=True)
    except (KeyError, binascii.Error, TypeError) as exc:
        raise StateDecodeError(f"corrupt state blob: bad metadata entry ({exc})") from None
    obj = _safe_loads(meta)
    return _build_state(obj, tensors)


def _build_state(obj: Any, tensors: dict[str, torch.Tensor]) -> TorchESState:
    if not isinstance(obj, dict):
        raise StateDecodeError("corrupt state metadata: expected a dict")
    try:
        epoch = obj["epoch"]
        config = obj["config"]
        fingerprint = obj["noise_fingerprint"]
        versions = obj["versions"]
        extra = obj["extra"]
    except KeyError as exc:
        raise StateDecodeError(f"state metadata lacks {exc}") from None
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise StateDecodeError(f"state metadata has an invalid epoch {epoch!r}")
    if not isinstance(config, ESConfig):
        raise StateDecodeError(f"state metadata config is {type(config).__name__}, not ESConfig")
    try:
        # Unpickling bypasses __post_init__; rebuilding re-validates every field, fills the
        # fields added since an older release wrote the state and drops removed ones (device).
        config = ESConfig.from_legacy(config)
    except (AttributeError, TypeError, ValueError) as exc:
        raise StateDecodeError(f"state metadata holds an invalid ESConfig: {exc}") from None
    if not isinstance(fingerprint, str) or not isinstance(versions, dict):
        raise StateDecodeError("state metadata has invalid noise_fingerprint/versions")
    if not isinstance(extra, dict):
        raise StateDecodeError("state metadata 'extra' must be a dict")
    params = tensors.pop(_PARAMS, None)
    if params is None or params.dim() != 1 or params.dtype != torch.float32:
        raise StateDecodeError("state has no flat float32 'params' tensor")
    opt_state = {k[len(_OPT) :]: v for k, v in tensors.items() if k.startswith(_OPT)}
    extra_tensors = {k[len(_EXTRA) :]: v for k, v in tensors.items() if k.startswith(_EXTRA)}
    unknown = [k for k in tensors if not k.startswith((_OPT, _EXTRA))]
    if unknown:
        raise StateDecodeError(f"state has unexpected tensors {unknown}")
    return TorchESState(
        params=params,
        opt_state=opt_state,
        epoch=epoch,
        config=config,
        noise_fingerprint=fingerprint,
        extra_tensors=extra_tensors,
        extra=extra,
        versions={str(k): str(v) for k, v in versions.items()},
    )


# --- checkpoints ---------------------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike[str], state: TorchESState) -> Path:
    """Write ``state`` to ``path`` (conventionally ``*.safetensors``) atomically.

    The file is exactly :func:`encode_state`'s blob, i.e. a safetensors file that
    ``safetensors.torch.load_file`` reads (tensors ``params``, ``opt.*``, ``extra.*``).
    """
    path = Path(path)
    blob = encode_state(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> TorchESState:
    """Read a checkpoint written by :func:`save_checkpoint` (verified like :func:`decode_state`)."""
    return decode_state(Path(path).read_bytes())


def load_policy(module: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a checkpoint's center parameters into ``module`` (in place) and return it.

    No server or noise table is needed: ``policy = load_policy(MyPolicy(), "ckpt.safetensors")``.
    """
    state = load_checkpoint(path)
    expected = sum(p.numel() for p in module.parameters())
    if state.params.numel() != expected:
        raise ValueError(
            f"checkpoint {path} holds {state.params.numel()} parameters, but "
            f"{type(module).__name__} has {expected}: is it the same architecture?"
        )
    return load_flat(module, state.params)


def save_state_dict(path: str | os.PathLike[str], module: nn.Module, epoch: int) -> Path:
    """Write ``module.state_dict()`` as a plain safetensors file that ``module.load_state_dict(
    safetensors.torch.load_file(path))`` takes back. Tied weights (a language model's head
    sharing the embedding) are written once per name, as safetensors keeps no shared storage."""
    seen: set[tuple[int, int]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, value in module.state_dict().items():
        value = value.detach()
        key = (value.untyped_storage().data_ptr(), value.storage_offset())
        tensors[name] = value.clone() if key in seen else value.contiguous()
        seen.add(key)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path), metadata={"epoch": str(epoch)})
    return path
