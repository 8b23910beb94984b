"""Fitness shaping and reward checks: numpy float64 in, float64 out, deterministic.

Every worker shapes the same reward vector and must get bit-identical weights, so reductions use
``math.fsum`` (exactly rounded, independent of numpy's SIMD/pairwise summation), logarithms
come from :mod:`.portable` (NumPy's own dispatch per CPU) and ties get their average rank
(symmetric, no dependence on sort stability).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

from . import portable

__all__ = [
    "SHAPINGS",
    "centered_rank",
    "check_rewards",
    "nes_utilities",
    "raw",
    "shape_fitness",
    "zscore",
]

ShapingMethod = Literal["centered_rank", "zscore", "raw", "nes"]


def _as_rewards(rewards: np.ndarray | Sequence[float]) -> np.ndarray:
    r = np.array(rewards, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(r)):
        bad = np.flatnonzero(~np.isfinite(r)).tolist()
        raise ValueError(f"fitness shaping needs finite rewards; non-finite at indices {bad}")
    return r


def centered_rank(rewards: np.ndarray | Sequence[float]) -> np.ndarray:
    """Ranks mapped linearly to ``[-0.5, 0.5]`` (lowest reward -> -0.5, highest -> 0.5).

    Tied rewards share their average rank. A single member (or all tied) gives zeros.
    Output: float64 ``[n]``, summing to 0 (up to rounding).
    """
    r = _as_rewards(rewards)
    n = r.size
    if n <= 1:
        return np.zeros(n, dtype=np.float64)
    _, inverse, counts = np.unique(r, return_inverse=True, return_counts=True)
    # Tie group g occupies sorted ranks [start_g, start_g + count_g - 1]; use their mean.
    starts = np.cumsum(counts) - counts
    avg_rank = starts + (counts - 1) / 2.0
    ranks = avg_rank[inverse.reshape(-1)]
    return ranks / (n - 1) - 0.5


def zscore(rewards: np.ndarray | Sequence[float]) -> np.ndarray:
    """``(r - mean) / std`` (population std). Constant rewards give zeros. float64 ``[n]``."""
    r = _as_rewards(rewards)
    n = r.size
    if n == 0:
        return r
    mean = math.fsum(r.tolist()) / n
    d = r - mean
    std = math.sqrt(math.fsum((d * d).tolist()) / n)
    if std == 0.0 or not math.isfinite(std):
        return np.zeros(n, dtype=np.float64)
    return d / std


def raw(rewards: np.ndarray | Sequence[float]) -> np.ndarray:
    """The rewards unchanged (a float64 copy)."""
    return _as_rewards(rewards)


def nes_utilities(rewards: np.ndarray | Sequence[float]) -> np.ndarray:
    """NES utilities (Wierstra et al. 2014): the member of rank ``k`` (1 = highest reward)
    gets ``max(0, ln(n/2 + 1) - ln k) / sum_j max(0, ln(n/2 + 1) - ln j) - 1/n``.

    Tied rewards share the mean utility of their ranks. float64 ``[n]``, summing to 0.
    """
    r = _as_rewards(rewards)
    n = r.size
    if n <= 1:
        return np.zeros(n, dtype=np.float64)
    ln = portable.log
    raw_u = np.maximum(0.0, ln(n / 2.0 + 1.0) - ln(np.arange(1, n + 1, dtype=np.float64)))
    by_rank = raw_u / math.fsum(raw_u.tolist()) - 1.0 / n
    # by_rank[k] belongs to the k-th highest reward; tie groups share their ranks' mean.
    _, inverse, counts = np.unique(-r, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts
    group_mean = np.array(
        [math.fsum(by_rank[s : s + c].tolist()) / c for s, c in zip(starts, counts, strict=True)]
    )
    return group_mean[inverse.reshape(-1)]


_METHODS = {"centered_rank": centered_rank, "zscore": zscore, "raw": raw, "nes": nes_utilities}
SHAPINGS = tuple(_METHODS)


def shape_fitness(
    rewards: np.ndarray | Sequence[float],
    method: ShapingMethod | Callable[[np.ndarray], np.ndarray] = "centered_rank",
) -> np.ndarray:
    """Dispatch on ``method`` (``"centered_rank"``, ``"zscore"``, ``"raw"``, ``"nes"``), or
    call it when it is a function (float64 rewards in, ``[n]`` weights out)."""
    if callable(method):
        out = np.asarray(method(_as_rewards(rewards)), dtype=np.float64).reshape(-1)
        if out.size != np.size(rewards) or not np.all(np.isfinite(out)):
            raise ValueError("a fitness shaping function must return one finite value per reward")
        return out
    try:
        fn = _METHODS[method]
    except KeyError:
        raise ValueError(
            f"unknown fitness shaping {method!r}; expected one of {sorted(_METHODS)}"
        ) from None
    return fn(rewards)


def check_rewards(
    rewards: np.ndarray | Sequence[float],
    members: Sequence[int] | np.ndarray | range | None = None,
    nan_penalty: float | None = None,
) -> np.ndarray:
    """Validate rewards before they are sent: float64 ``[n]`` copy with no NaN/inf.

    ``members[j]`` is the population index of ``rewards[j]`` (defaults to ``0..n-1``), used in
    the error message. With ``nan_penalty=None`` any NaN/inf raises ``ValueError`` naming the
    members; otherwise they are replaced by ``nan_penalty``.
    """
    r = np.array(rewards, dtype=np.float64).reshape(-1)
    idx = np.arange(r.size) if members is None else np.asarray(members).reshape(-1)
    if idx.size != r.size:
        raise ValueError(f"got {r.size} rewards for {idx.size} members")
    bad = ~np.isfinite(r)
    if bad.any():
        if nan_penalty is None:
            pairs = ", ".join(
                f"member {int(m)}: {v}" for m, v in zip(idx[bad], r[bad], strict=True)
            )
            raise ValueError(
                f"non-finite rewards ({int(bad.sum())} of {r.size}): {pairs}. Fix the "
                "evaluation or set ESConfig.nan_penalty to replace them with a fixed value"
            )
        if not math.isfinite(nan_penalty):
            raise ValueError(f"nan_penalty must be finite, got {nan_penalty}")
        r[bad] = nan_penalty
    return r
