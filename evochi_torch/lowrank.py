"""Low-rank perturbations: each weight matrix moves by a rank-r product, not by full noise.

With ``ESConfig(perturbation="lowrank", rank=r)`` member ``i`` perturbs a 2-D parameter
``W`` (``m x n``, e.g. an ``nn.Linear`` weight) by ``sigma * s_i * A_i @ B_i.T / sqrt(r)``
with ``A_i`` ``[m, r]`` and ``B_i`` ``[n, r]`` read from the shared noise table, as EGGROLL
(arXiv:2511.16652) does. Vectors (biases, norms), tensors of 3 or more dimensions (conv
kernels) and matrices too small to gain (``r * (m + n) >= m * n``) keep plain per-member
noise. A member's noise window is therefore ``r * (m + n)`` values per matrix instead of
``m * n``: the population costs ``members x r x (m + n)``, never ``members x parameters``.

The window of one member is laid out as ``[dense values | A_1, B_1 | A_2, B_2 | ...]``
(:class:`LowRankLayout`); it starts at the member's offset in the noise table, exactly like a
full-rank window, so the strategies' ``ask`` is unchanged.

The factors are the table's values rounded to a grid of 1/32 (``FACTOR_GRID``). That changes
the distribution negligibly (variance ``1 + 1/12288``) and makes the update exact: every
product in ``sum_k c_k * A_k @ B_k.T`` is then a small integer times a power of two, so the
float64 matrix product that computes it has no rounding at all, and its result does not
depend on the BLAS library, the CPU's vector units or the thread count. One matrix product
per layer gives the same bits on every worker (see :meth:`LowRankNoise.weighted_sum`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .noise import NoiseTable, accumulate_windows, merged_coefficients

__all__ = [
    "FACTOR_GRID",
    "LowRankLayout",
    "LowRankNoise",
    "Segment",
    "noise_for",
]

#: Factor values are multiples of ``1 / FACTOR_GRID`` (a power of two: scaling is exact).
FACTOR_GRID = 32.0

# The coefficients of one update are integers below 2**24 on a shared power-of-two grid; where a
# product with them could reach 2**53 they are split into two halves of 12 bits.
_COEF_BITS = 24
_HALF = 1 << 12
_EXACT = float(1 << 53)


@dataclass(frozen=True)
class Segment:
    """One parameter's place in the flat vector (``offset``) and in a member's window
    (``window``). ``rows``/``cols`` are set for low-rank matrices, else 0."""

    index: int
    shape: tuple[int, ...]
    offset: int
    numel: int
    window: int
    rows: int = 0
    cols: int = 0

    @property
    def lowrank(self) -> bool:
        return self.rows > 0


class LowRankLayout:
    """Which parameters are low-rank and where each one's noise lies in a member's window.

    Args:
        shapes: the parameter shapes in flat order (``module.named_parameters()``).
        rank: ``r``, the rank of each matrix's perturbation.
    """

    def __init__(self, shapes: Sequence[Sequence[int]], rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be an int >= 1, got {rank!r}")
        self.rank = rank
        self.shapes = tuple(tuple(int(d) for d in s) for s in shapes)
        offsets = np.cumsum([0] + [math.prod(s) for s in self.shapes]).tolist()
        self.num_params = int(offsets[-1])
        dense: list[Segment] = []
        factored: list[tuple[int, tuple[int, ...], int, int]] = []
        cursor = 0
        for i, shape in enumerate(self.shapes):
            numel = math.prod(shape)
            if len(shape) == 2 and rank * (shape[0] + shape[1]) < numel:
                factored.append((i, shape, int(offsets[i]), numel))
            else:
                dense.append(Segment(i, shape, int(offsets[i]), numel, cursor))
                cursor += numel
        self.dense_size = cursor
        lowrank = []
        for i, shape, offset, numel in factored:
            lowrank.append(Segment(i, shape, offset, numel, cursor, shape[0], shape[1]))
            cursor += rank * (shape[0] + shape[1])
        self.dim = cursor
        self.dense = tuple(dense)
        self.lowrank = tuple(lowrank)
        self.segments = tuple(sorted(dense + lowrank, key=lambda s: s.index))

    @classmethod
    def for_module(cls, module: torch.nn.Module, rank: int) -> LowRankLayout:
        return cls([tuple(p.shape) for p in module.parameters()], rank)

    def digest(self) -> str:
        """A short hash of the shapes and the rank (part of the noise fingerprint)."""
        text = f"r={self.rank};" + ";".join("x".join(map(str, s)) for s in self.shapes)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def factors(self, windows: torch.Tensor, seg: Segment) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``A [B, m, r]`` and ``B [B, n, r]`` of a low-rank segment in ``windows``
        (``[B, dim]``, factors already on the grid)."""
        r = self.rank
        a0 = seg.window
        b0 = a0 + seg.rows * r
        count = windows.shape[0]
        a = windows[:, a0:b0].view(count, seg.rows, r)
        b = windows[:, b0 : b0 + seg.cols * r].view(count, seg.cols, r)
        return a, b

    def __repr__(self) -> str:
        return (
            f"LowRankLayout(rank={self.rank}, params={self.num_params}, window={self.dim}, "
            f"matrices={len(self.lowrank)})"
        )


def to_grid_(values: torch.Tensor) -> torch.Tensor:
    """Round to multiples of ``1 / FACTOR_GRID`` in place (half to even: the same everywhere)."""
    return values.mul_(FACTOR_GRID).round_().div_(FACTOR_GRID)


class LowRankNoise:
    """The run's noise table read through a :class:`LowRankLayout`.

    Strategies that support ``perturbation="lowrank"`` receive this instead of the
    :class:`~evochi_torch.noise.NoiseTable`: the windows are :attr:`LowRankLayout.dim` long
    (:meth:`window_size`) and :meth:`weighted_sum` expands them to full parameter space.
    """

    def __init__(self, table: NoiseTable, layout: LowRankLayout) -> None:
        if layout.dim > table.size:
            raise ValueError(
                f"the noise table ({table.size} values) is smaller than a low-rank window "
                f"({layout.dim})"
            )
        self.table = table
        self.layout = layout
        self._grids: dict[torch.device, torch.Tensor] = {}

    @property
    def size(self) -> int:
        return self.table.size

    @property
    def seed(self) -> int:
        return self.table.seed

    @property
    def data(self) -> torch.Tensor:
        return self.table.data

    @property
    def fingerprint(self) -> str:
        """The table's fingerprint plus the rank and the parameter shapes: workers whose
        models differ in structure cannot share a training by accident."""
        return f"{self.table.fingerprint};lowrank={self.layout.digest()}"

    def to(self, device: torch.device | str) -> torch.Tensor:
        return self.table.to(device)

    def window_size(self, num_params: int) -> int:
        if num_params != self.layout.num_params:
            raise ValueError(
                f"the low-rank layout has {self.layout.num_params} parameters, got {num_params}"
            )
        return self.layout.dim

    def __repr__(self) -> str:
        return f"LowRankNoise({self.table!r}, {self.layout!r})"

    # ---------------------------------------------------------------- members
    def windows(
        self, offsets: torch.Tensor, members: torch.Tensor, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """The windows ``[len(members), dim]`` of some members on ``device``, with the factor
        part on the grid (signs not applied)."""
        dense, factors = self.member_windows(offsets, members, device)
        return torch.cat([dense, factors], dim=1)

    def member_windows(
        self, offsets: torch.Tensor, members: torch.Tensor, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`windows` in two new tensors: the dense part ``[B, dense_size]`` and the
        factor part ``[B, dim - dense_size]`` (what :class:`LowRankPolicy` scales in place)."""
        lay = self.layout
        data = self.table.to(device)
        grid = self._grid(data)
        index = offsets[members].to(data.device)
        count = self.table.size - lay.dim + 1
        dense = data.as_strided((count, lay.dense_size), (1, 1)).index_select(0, index)
        factors = grid.as_strided(
            (count, lay.dim - lay.dense_size), (1, 1), lay.dense_size
        ).index_select(0, index)
        return dense, factors

    def _grid(self, data: torch.Tensor) -> torch.Tensor:
        # The table on the factor grid, made once per device: rounding a window is then a copy.
        grid = self._grids.get(data.device)
        if grid is None:
            grid = self._grids[data.device] = to_grid_(data.clone())
        return grid

    def materialize(
        self,
        center: torch.Tensor,
        offsets: torch.Tensor,
        signs: torch.Tensor,
        sigma: float,
        members: torch.Tensor,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Explicit perturbed parameters ``[len(members), P]`` (``members x P`` memory: for
        tests and small models; :class:`~evochi_torch.lowrank_policy.LowRankPolicy` never
        builds them)."""
        lay = self.layout
        win = self.windows(offsets, members, device)
        scale = (signs[members].to(torch.float32) * float(sigma)).to(win.device)
        out = center.to(device=win.device, dtype=torch.float32).repeat(len(members), 1)
        for seg in lay.dense:
            noise = win[:, seg.window : seg.window + seg.numel] * scale[:, None]
            out[:, seg.offset : seg.offset + seg.numel] += noise
        root = math.sqrt(lay.rank)
        for seg in lay.lowrank:
            a, b = lay.factors(win, seg)
            delta = torch.bmm(a, b.transpose(1, 2)) * (scale / root)[:, None, None]
            out[:, seg.offset : seg.offset + seg.numel] += delta.reshape(len(members), -1)
        return out

    # ---------------------------------------------------------------- the update
    def weighted_sum(
        self,
        offsets: torch.Tensor,
        signs: torch.Tensor,
        weights: np.ndarray | torch.Tensor | Sequence[float],
        num_params: int,
        *,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """``scale * sum_i weights[i] * signs[i] * E_i`` as float32 ``[P]``, where ``E_i`` is
        member ``i``'s perturbation direction (``A_i @ B_i.T / sqrt(r)`` for matrices).

        Members sharing a window (antithetic pairs) are merged first and each coefficient is
        rounded to float32 once (:func:`~evochi_torch.noise.merged_coefficients`); the dense
        part accumulates as :func:`~evochi_torch.noise.noise_weighted_sum` does. Per matrix
        the sum is one float64 matrix product over integer-valued operands, exact whatever the
        BLAS does, rounded once to float32.
        """
        lay = self.layout
        self.window_size(num_params)
        merged = merged_coefficients(offsets, signs, weights, lay.dim, self.table.size, scale=scale)
        out = torch.zeros(num_params, dtype=torch.float32)
        if lay.dense_size:
            dense = accumulate_windows(self.table.data, merged, lay.dense_size)
            for seg in lay.dense:
                out[seg.offset : seg.offset + seg.numel] = dense[
                    seg.window : seg.window + seg.numel
                ]
        if not lay.lowrank:
            return out
        coefs = np.array(list(merged.values()), dtype=np.float64)
        keys = torch.tensor(list(merged), dtype=torch.int64)
        biggest = float(np.max(np.abs(coefs))) if coefs.size else 0.0
        if biggest == 0.0:
            return out
        # Every coefficient as an integer on one power-of-two grid (exact scalings; the
        # rounding of the smallest ones is 2**-24 of the largest).
        unit = math.ldexp(1.0, math.frexp(biggest)[1] - _COEF_BITS)
        ints = np.rint(coefs / unit)
        high = np.floor(ints / _HALF)
        low = ints - high * _HALF
        whole = float(np.max(np.abs(ints)))
        windows = self.windows(offsets=keys, members=torch.arange(len(keys)))
        grid = FACTOR_GRID * FACTOR_GRID
        final = unit / grid / math.sqrt(lay.rank)
        r = lay.rank
        for seg in lay.lowrank:
            a, b = lay.factors(windows, seg)  # [K, m, r], [K, n, r], multiples of 1/32
            a_int = (a.to(torch.float64) * FACTOR_GRID).permute(1, 0, 2).reshape(seg.rows, -1)
            b_int = (b.to(torch.float64) * FACTOR_GRID).permute(0, 2, 1).reshape(-1, seg.cols)
            # The largest partial sum the product can reach: below 2**53 it is exact. Whole
            # coefficients need one product; else two 12-bit halves, recombined exactly.
            terms = len(keys) * r * a_int.abs().max().item() * b_int.abs().max().item()
            if terms * whole < _EXACT:
                parts = ((ints, 1.0),)
            elif terms * _HALF < _EXACT:
                parts = ((high, float(_HALF)), (low, 1.0))
            else:
                raise ValueError(
                    f"low-rank update too large to be exact ({len(keys)} windows x rank {r}); "
                    "use a smaller population or rank"
                )
            total = None
            for part, weight in parts:
                col = torch.from_numpy(np.repeat(part, r))  # one per column of a_int
                prod = torch.matmul(a_int * col[None, :], b_int)
                total = prod * weight if total is None else total + prod * weight
            assert total is not None
            out[seg.offset : seg.offset + seg.numel] = (total * final).reshape(-1).to(torch.float32)
        return out


def noise_for(settings: Any, shapes: Sequence[Sequence[int]]) -> NoiseTable | LowRankNoise:
    """The run's noise for a model with parameter ``shapes`` (flat order): the plain table, or
    the table read through a low-rank layout when ``settings.perturbation == "lowrank"``.

    ``settings`` is an ``ESConfig`` (``seed``, ``noise_table_size``, ``perturbation``,
    ``rank``)."""
    if getattr(settings, "perturbation", "full") == "lowrank":
        layout = LowRankLayout(shapes, settings.rank)
        table = NoiseTable.for_params(settings.seed, layout.dim, settings.noise_table_size)
        return LowRankNoise(table, layout)
    num_params = sum(math.prod(s) for s in shapes)
    return NoiseTable.for_params(settings.seed, num_params, settings.noise_table_size)
