"""Seeded Gaussian perturbations from a shared noise table (OpenAI ES style).

Design (measured, see ``benchmarks/es_update.py``): one block of float32 standard-normal noise
of ``T`` values is generated once per process from the run's seed. In epoch ``e`` member pair
``k`` uses the window ``table[o_k : o_k + P]`` where the offset ``o_k`` is a pure function of
``(seed, e, k)``; with antithetic sampling member ``2k`` gets ``+window`` and ``2k + 1`` gets
``-window``. Nothing about the noise ever crosses the wire.

Why a table instead of seeding a generator per member: regenerating ``npop/2 * P`` normals every
epoch costs about as much as the dense baseline's sampling (4 s at npop=1000, P=1M on the
2-core dev box), while reading windows from a table is memory-bandwidth bound (0.1 s).

Determinism: the table comes from numpy's ``PCG64`` + float32 ``standard_normal`` in independent
blocks (``SeedSequence(seed, spawn_key=(block,))``), so it does not depend on the thread count;
offsets use a self-contained splitmix64 hash (integer arithmetic only). The table's sha256 is
part of :attr:`NoiseTable.fingerprint`, so a process whose numpy (or libm) would produce
different noise is detected instead of silently diverging.

:func:`noise_weighted_sum` (the ES gradient's hot loop) accumulates ``acc += c_k * window_k``
with a *separate* float32 multiply and add per element, pairs in a fixed order: every element
sees the same IEEE operations whatever the thread count or tensor split (fused multiply-add
kernels such as ``add_(x, alpha=c)`` round differently in vector body and scalar tail).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np
import torch

__all__ = [
    "NoiseTable",
    "member_offsets",
    "noise_weighted_sum",
    "perturbed_params",
]

#: Version tag of the noise scheme (table generation + offset hash). Part of the fingerprint.
NOISE_FORMAT = "evochi-noise/1"

_BLOCK = 1 << 20  # values per independently seeded generator block
_MIN_TABLE = 1 << 22  # 16 MiB: small policies still get plenty of distinct windows
_MAX_TABLE = 1 << 27  # 512 MiB: cap the per-process memory for big models
_TABLE_PER_PARAM = 32

_U64 = np.uint64
_MASK = (1 << 64) - 1

Members = Sequence[int] | range | torch.Tensor | np.ndarray


class NoiseSettings(Protocol):
    """What the noise needs of a run's settings (an ``ESConfig`` has both)."""

    @property
    def seed(self) -> int: ...

    @property
    def noise_table_size(self) -> int | None: ...


def default_table_size(num_params: int) -> int:
    """Automatic table size (float32 values) for a model with ``num_params`` parameters.

    ``clamp(32 * P, 2**22, 2**27)``, and at least ``2 * P`` so there are always ``P + 1`` or more
    distinct windows. Windows at different offsets are uncorrelated (the table is i.i.d.), so a
    table a few dozen times larger than ``P`` is plenty.
    """
    if num_params < 1:
        raise ValueError(f"num_params must be >= 1, got {num_params}")
    size = min(max(_TABLE_PER_PARAM * num_params, _MIN_TABLE), _MAX_TABLE)
    return max(size, 2 * num_params)


class NoiseTable:
    """A block of i.i.d. float32 N(0, 1) noise, identical in every process for a given seed.

    Build with :meth:`from_seed` (cached per ``(seed, size)`` in the process). ``data`` is a
    1-D float32 CPU tensor of length ``size``; it is shared, so treat it as read-only.
    """

    def __init__(self, data: torch.Tensor, seed: int, fingerprint: str) -> None:
        if data.dtype != torch.float32 or data.dim() != 1 or data.device.type != "cpu":
            raise ValueError("NoiseTable data must be a 1-D float32 CPU tensor")
        self.data = data
        self.seed = seed
        self.fingerprint = fingerprint
        self._device_copies: dict[torch.device, torch.Tensor] = {}
        self._squared: torch.Tensor | None = None
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.data.numel()

    @property
    def squared(self) -> torch.Tensor:
        """``data * data`` (float32, the same bits as squaring a window), made on first use.

        The strategies that adapt a per-parameter sigma need ``sum_i c_i * eps_i**2`` every
        epoch; reading squares from here makes that two passes over each window instead of
        three (measured 10-20% of such an update at 1M parameters), for the memory of a
        second table.
        """
        with self._lock:
            if self._squared is None:
                self._squared = torch.mul(self.data, self.data)
            return self._squared

    def __repr__(self) -> str:
        return f"NoiseTable(seed={self.seed}, size={self.size}, fingerprint={self.fingerprint!r})"

    @classmethod
    def from_seed(cls, seed: int, size: int, *, cache: bool = True) -> NoiseTable:
        """The table for ``(seed, size)``; generated once and kept in a small per-process cache."""
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if size < 2:
            raise ValueError(f"noise table size must be >= 2, got {size}")
        if not cache:
            return cls._generate(seed, size)
        key = (int(seed), int(size))
        with _CACHE_LOCK:
            table = _CACHE.get(key)
            if table is not None:
                _CACHE.move_to_end(key)
                return table
        table = cls._generate(seed, size)
        with _CACHE_LOCK:
            table = _CACHE.setdefault(key, table)
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        return table

    @classmethod
    def for_params(cls, seed: int, num_params: int, size: int | None = None) -> NoiseTable:
        """Table for a model of ``num_params`` parameters (``size=None``: automatic)."""
        if size is None:
            size = default_table_size(num_params)
        if size <= num_params:
            raise ValueError(
                f"noise table size {size} must exceed the parameter count {num_params}"
            )
        return cls.from_seed(seed, size)

    @classmethod
    def for_config(cls, config: NoiseSettings, num_params: int) -> NoiseTable:
        """The run's table: ``config.seed`` and ``config.noise_table_size`` (or automatic)."""
        return cls.for_params(config.seed, num_params, config.noise_table_size)

    @classmethod
    def _generate(cls, seed: int, size: int) -> NoiseTable:
        data = torch.empty(size, dtype=torch.float32)
        out = data.numpy()  # shares memory with ``data``
        nblocks = -(-size // _BLOCK)

        def fill(block: int) -> None:
            start = block * _BLOCK
            stop = min(size, start + _BLOCK)
            ss = np.random.SeedSequence(entropy=int(seed), spawn_key=(block,))
            gen = np.random.Generator(np.random.PCG64(ss))
            gen.standard_normal(out=out[start:stop], dtype=np.float32)

        workers = max(1, min(nblocks, torch.get_num_threads(), os.cpu_count() or 1))
        if workers == 1:
            for block in range(nblocks):
                fill(block)
        else:
            # Blocks are seeded independently, so the split over threads cannot change them;
            # numpy releases the GIL while filling.
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(fill, range(nblocks)))
        return cls(data, seed, _fingerprint(seed, out))

    def to(self, device: torch.device | str) -> torch.Tensor:
        """The table's data on ``device`` (copied once per device, then cached)."""
        device = torch.device(device)
        if device.type == "cpu":
            return self.data
        with self._lock:
            copy = self._device_copies.get(device)
            if copy is None:
                copy = self.data.to(device)
                self._device_copies[device] = copy
        return copy

    def window_size(self, num_params: int) -> int:
        """Length of one member's window: the parameter count (every parameter gets its own
        noise; :class:`evochi_torch.lowrank.LowRankNoise` has shorter windows)."""
        return num_params

    def weighted_sum(
        self,
        offsets: torch.Tensor,
        signs: torch.Tensor,
        weights: np.ndarray | torch.Tensor | Sequence[float],
        num_params: int,
        *,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """:func:`noise_weighted_sum` over this table."""
        return noise_weighted_sum(self, offsets, signs, weights, num_params, scale=scale)

    def window(self, offset: int, num_params: int) -> torch.Tensor:
        """The unsigned noise ``eps`` starting at ``offset`` (a view, float32 CPU, shape [P])."""
        if not 0 <= offset <= self.size - num_params:
            raise ValueError(
                f"window [{offset}, {offset + num_params}) is outside the table ({self.size})"
            )
        return self.data[offset : offset + num_params]


_CACHE: OrderedDict[tuple[int, int], NoiseTable] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 2


def _fingerprint(seed: int, table: np.ndarray) -> str:
    h = hashlib.sha256()
    header = (
        f"{NOISE_FORMAT}|PCG64|standard_normal|float32|block={_BLOCK}|seed={seed}|size={table.size}"
    )
    h.update(header.encode())
    h.update(memoryview(np.ascontiguousarray(table)).cast("B"))
    return f"{NOISE_FORMAT};seed={seed};size={table.size};sha256={h.hexdigest()}"


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # uint64 arithmetic wraps modulo 2**64, exactly like the reference C implementation.
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def member_offsets(
    seed: int,
    epoch: int,
    population_size: int,
    num_params: int,
    table_size: int,
    antithetic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise window offsets and signs of every member of one epoch.

    Returns ``(offsets, signs)``: int64 ``[npop]`` and float32 ``[npop]``. Member ``i`` is
    perturbed by ``signs[i] * table[offsets[i] : offsets[i] + num_params]``. With ``antithetic``
    members ``2k`` and ``2k + 1`` share an offset with signs ``+1`` / ``-1``; otherwise every
    member has its own offset and sign ``+1``. A pure function of its arguments.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if population_size < 1:
        raise ValueError(f"population_size must be >= 1, got {population_size}")
    if antithetic and population_size % 2:
        raise ValueError(
            f"antithetic sampling needs an even population size, got {population_size}"
        )
    span = table_size - num_params + 1
    if span < 1:
        raise ValueError(f"noise table size {table_size} is smaller than num_params {num_params}")
    n_draws = population_size // 2 if antithetic else population_size
    with np.errstate(over="ignore"):
        base = _splitmix64(np.array([seed & _MASK], dtype=_U64))
        base = _splitmix64(base ^ _U64(epoch & _MASK))
        draws = _splitmix64(base ^ np.arange(n_draws, dtype=_U64))
    # Modulo bias is < span / 2**64 (< 1e-10): irrelevant.
    draw_offsets = (draws % _U64(span)).astype(np.int64)
    if antithetic:
        offsets = np.repeat(draw_offsets, 2)
        signs = np.tile(np.array([1.0, -1.0], dtype=np.float32), n_draws)
    else:
        offsets = draw_offsets
        signs = np.ones(population_size, dtype=np.float32)
    return torch.from_numpy(offsets), torch.from_numpy(signs)


def _as_index(members: Members, population_size: int) -> torch.Tensor:
    if isinstance(members, torch.Tensor):
        idx = members.to(device="cpu", dtype=torch.int64).reshape(-1)
    else:
        idx = torch.from_numpy(np.asarray(members, dtype=np.int64).reshape(-1))
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= population_size):
        raise IndexError(f"member indices must be in [0, {population_size}), got {members!r}")
    return idx


def perturbed_params(
    center: torch.Tensor,
    table: NoiseTable,
    offsets: torch.Tensor,
    signs: torch.Tensor,
    sigma: float | torch.Tensor,
    members: Members,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Parameters of the requested members, built on ``device``: ``[len(members), P]`` float32.

    Row ``b`` is ``center + sigma * signs[m] * table[offsets[m] : offsets[m] + P]`` with
    ``m = members[b]``; ``sigma`` is a float or a per-parameter float32 ``[P]`` tensor.
    ``members`` may be any list/range/tensor of member indices (e.g. a slice
    of the population that splits an antithetic pair). Only these rows are materialised; the
    table is copied to ``device`` once and cached. ``device=None`` uses ``center``'s device.
    """
    if center.dim() != 1:
        raise ValueError(f"center must be a flat [P] tensor, got shape {tuple(center.shape)}")
    device = center.device if device is None else torch.device(device)
    num_params = center.numel()
    idx = _as_index(members, offsets.numel())
    if num_params > table.size:
        raise ValueError(f"num_params {num_params} exceeds the noise table size {table.size}")
    data = table.to(device)
    # All windows of length P as one overlapping view: gathering rows is a single kernel.
    windows = data.as_strided((table.size - num_params + 1, num_params), (1, 1))
    # index_select, not windows[idx]: advanced indexing of the overlapping view costs O(T).
    rows = windows.index_select(0, offsets[idx].to(device))
    if isinstance(sigma, torch.Tensor):
        if sigma.shape != (num_params,):
            raise ValueError(f"sigma must be a float or a [P] tensor, got {tuple(sigma.shape)}")
        # Signs are +/-1, so sign * (sigma * eps) is exact in any order.
        rows.mul_(sigma.to(device=device, dtype=torch.float32)[None, :])
        rows.mul_(signs[idx].to(device=device, dtype=torch.float32)[:, None])
    else:
        scale = (signs[idx].to(torch.float32) * sigma).to(device)
        rows.mul_(scale[:, None])
    rows.add_(center.to(device=device, dtype=torch.float32)[None, :])
    return rows


def noise_weighted_sum(
    table: NoiseTable,
    offsets: torch.Tensor,
    signs: torch.Tensor,
    weights: np.ndarray | torch.Tensor | Sequence[float],
    num_params: int,
    *,
    scale: float = 1.0,
) -> torch.Tensor:
    """``scale * sum_i weights[i] * signs[i] * eps_i`` as a float32 CPU tensor ``[P]``, streamed.

    Members sharing an offset (antithetic pairs) are merged first in float64
    (``w_2k - w_2k+1``), so the table is read once per pair; each coefficient is rounded to
    float32 once, then accumulated in member order with separate multiply and add. Peak extra
    memory is two ``[P]`` buffers; the result is bit-identical for any ``torch`` thread count.
    """
    coefs = merged_coefficients(offsets, signs, weights, num_params, table.size, scale=scale)
    return accumulate_windows(table.data, coefs, num_params)


def merged_coefficients(
    offsets: torch.Tensor,
    signs: torch.Tensor,
    weights: np.ndarray | torch.Tensor | Sequence[float],
    window: int,
    table_size: int,
    *,
    scale: float = 1.0,
) -> dict[int, float]:
    """``{offset: float32(scale * sum of weights[i] * signs[i] over the members at offset)}``
    in first-occurrence order: members sharing a window (antithetic pairs) merged in float64,
    each coefficient rounded to float32 once. Checks lengths, finiteness and that every
    ``window``-long window lies in the table."""
    w = np.asarray(
        weights.detach().cpu().numpy() if isinstance(weights, torch.Tensor) else weights,
        dtype=np.float64,
    ).reshape(-1)
    offs = offsets.cpu().numpy().astype(np.int64, copy=False).reshape(-1)
    sgn = signs.cpu().numpy().astype(np.float64).reshape(-1)
    if not (w.shape == offs.shape == sgn.shape):
        raise ValueError(
            f"weights, offsets and signs must have the same length, got {w.shape[0]}, "
            f"{offs.shape[0]} and {sgn.shape[0]}"
        )
    if not np.all(np.isfinite(w)):
        raise ValueError("noise_weighted_sum: weights must be finite")
    if offs.size and (offs.min() < 0 or offs.max() > table_size - window):
        raise ValueError("noise_weighted_sum: an offset's window falls outside the noise table")
    merged: dict[int, float] = {}
    for o, wi, si in zip(offs.tolist(), w.tolist(), sgn.tolist(), strict=True):
        merged[o] = merged.get(o, 0.0) + wi * si
    return {o: float(np.float32(c * scale)) for o, c in merged.items()}


def accumulate_windows(data: torch.Tensor, coefs: dict[int, float], length: int) -> torch.Tensor:
    """``sum_o coefs[o] * data[o : o + length]`` (float32 ``[length]``) with a separate multiply
    and add per window, in ``coefs``' order: the same bits whatever the thread count."""
    acc = torch.zeros(length, dtype=torch.float32)
    tmp = torch.empty(length, dtype=torch.float32)
    for o, c in coefs.items():
        if c == 0.0:
            continue
        torch.mul(data[o : o + length], c, out=tmp)
        acc.add_(tmp)
    return acc
