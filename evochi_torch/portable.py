"""Floating-point math whose bits are the same on every CPU.

Every worker applies the ES update to its own copy of the center, so the update must give the
same bits on every machine of a fleet: Intel and AMD, AVX2 and AVX-512, any BLAS, any thread
count. IEEE 754 guarantees that only for the basic operations (``+ - * /`` and ``sqrt``, each
correctly rounded) when they are not fused. Everything else a library offers may take a code
path chosen by the CPU:

* ``torch.sqrt`` on the CPU goes through MKL's vector math, which is not correctly rounded
  (1 ulp off for about a sixth of float32 inputs) and picks its kernel per CPU;
* NumPy's float64 ``exp``, ``log`` and ``power`` dispatch to AVX-512 kernels where the CPU has
  them, with other rounding than their AVX2 kernels;
* libm's ``pow`` and ``exp`` pick FMA variants at load time; summation order follows SIMD width.

So the update uses only the functions below, and so do the evaluation episodes of the default
gymnasium policies (``linear``, ``tanh``, ``sequential``): compositions of correctly rounded
basic operations in a fixed order (NumPy ufuncs apply one operation per call and never fuse), and
``math.fsum`` (exactly rounded). Transcendental functions are evaluated by range
reduction and a polynomial, accurate to a few float64 ulp, which is far below the float32
rounding of the state they feed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch.nn.modules import module as _hooks

__all__ = [
    "column_sums",
    "exp",
    "linear",
    "log",
    "norm",
    "powi",
    "round32",
    "sequential",
    "sqrt32",
    "tanh",
]

# ln 2 split so that k * _LN2_HI is exact for |k| < 2**11 (Cody and Waite).
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
# Taylor coefficients 1/k! for exp on |r| <= ln(2)/2: the k = 14 term is below 2**-60.
_EXP_COEFS = tuple(1.0 / math.factorial(k) for k in range(14, -1, -1))
# log(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716: odd terms up to s**29.
_LOG_COEFS = tuple(2.0 / (2 * k + 1) for k in range(14, -1, -1))
_SQRT_HALF = 0.70710678118654757


# Elements per block of exp and log: a block's temporaries stay in the CPU's cache, which
# makes the dozens of passes of the polynomial about twice as fast on a million elements.
_BLOCK = 1 << 14


def _blockwise(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray | float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.size <= _BLOCK:
        return fn(x)
    flat = x.reshape(-1)
    out = np.empty_like(flat)
    for i in range(0, flat.size, _BLOCK):
        out[i : i + _BLOCK] = fn(flat[i : i + _BLOCK])
    return out.reshape(x.shape)


def exp(x: np.ndarray | float) -> np.ndarray:
    """``e**x`` in float64 (a few ulp), the same bits on every CPU.

    Saturates like libm: ``0`` below -745, ``inf`` above 709.78; NaN stays NaN.
    """
    return _blockwise(_exp, x)


def log(x: np.ndarray | float) -> np.ndarray:
    """Natural logarithm in float64 (a few ulp), the same bits on every CPU.

    ``log(0) = -inf``; negative inputs give NaN; ``inf`` stays ``inf``.
    """
    return _blockwise(_log, x)


def _exp(x: np.ndarray) -> np.ndarray:
    xc = np.clip(np.where(np.isnan(x), 0.0, x), -746.0, 710.0)
    k = np.rint(np.multiply(xc, _INV_LN2))
    r = np.subtract(xc, np.multiply(k, _LN2_HI))
    r = np.subtract(r, np.multiply(k, _LN2_LO))
    p = np.full_like(r, _EXP_COEFS[0])
    for c in _EXP_COEFS[1:]:  # Horner, in place: one multiply and one add per step
        np.multiply(p, r, out=p)
        np.add(p, c, out=p)
    # Two ldexp steps keep 2**k representable when k is near the ends of the range.
    half = np.trunc(np.multiply(k, 0.5))
    with np.errstate(over="ignore"):
        out = np.ldexp(np.ldexp(p, half.astype(np.int64)), (k - half).astype(np.int64))
    out = np.where(x > 709.782712893384, np.inf, out)
    out = np.where(x < -745.2, 0.0, out)
    return np.where(np.isnan(x), x, out)


def _log(x: np.ndarray) -> np.ndarray:
    finite_pos = np.isfinite(x) & (x > 0.0)
    safe = np.where(finite_pos, x, 1.0)
    m, e = np.frexp(safe)  # exact: safe = m * 2**e, m in [0.5, 1)
    low = m < _SQRT_HALF
    m = np.where(low, np.multiply(m, 2.0), m)  # exact
    e = np.where(low, e - 1, e).astype(np.float64)
    s = np.divide(np.subtract(m, 1.0), np.add(m, 1.0))
    s2 = np.multiply(s, s)
    p = np.full_like(s, _LOG_COEFS[0])
    for c in _LOG_COEFS[1:]:
        np.multiply(p, s2, out=p)
        np.add(p, c, out=p)
    log_m = np.multiply(p, s)
    out = np.add(np.multiply(e, _LN2_HI), np.add(log_m, np.multiply(e, _LN2_LO)))
    out = np.where(x == 0.0, -np.inf, out)
    out = np.where(x == np.inf, np.inf, out)
    return np.where((x < 0.0) | np.isnan(x), np.nan, out)


def tanh(x: np.ndarray | float) -> np.ndarray:
    """Hyperbolic tangent in float64, the same bits on every CPU.

    ``1 - 2 / (e**(2|x|) + 1)`` with the sign of ``x``, and ``x - x**3 / 3`` below ``2**-13``
    where that form would cancel: relative error about ``2**-39`` at most, far below the
    float32 rounding of the activations it feeds.
    """
    x = np.asarray(x, dtype=np.float64)
    a = np.abs(x)
    with np.errstate(over="ignore", invalid="ignore"):  # inf: only the first form is kept
        big = np.subtract(1.0, np.divide(2.0, np.add(exp(np.multiply(a, 2.0)), 1.0)))
        small = np.subtract(a, np.divide(np.multiply(np.multiply(a, a), a), 3.0))
    return np.copysign(np.where(a < 2.0**-13, small, big), x)


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """``x @ weight.T + bias`` of float32 arrays, as float32, the same bits on every CPU.

    A BLAS orders a dot product's additions by the CPU's SIMD width. Here each product of two
    float32 values is exact in float64 and the products of a row are added in
    :func:`column_sums`'s fixed order, so a row's result depends neither on the CPU nor on the
    other rows of the batch.
    """
    w = np.asarray(weight, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    n, (out_dim, in_dim) = math.prod(x.shape[:-1]), w.shape
    products = np.multiply(x.reshape(n, 1, in_dim), w[None])  # [rows, out, in], exact
    # No inputs: column_sums of no rows is zeros, the bias alone remains.
    out = column_sums(products.reshape(n * out_dim, in_dim).T).reshape(n, out_dim)
    if bias is not None:
        out = np.add(out, np.asarray(bias, dtype=np.float64))
    return out.astype(np.float32).reshape(*x.shape[:-1], out_dim)


def sequential(module: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray] | None:
    """``module``'s forward pass on float32 arrays in the functions above (the same outputs on
    every CPU) when it is a plain ``nn.Sequential`` of plain float32 ``Linear``, ``Tanh``,
    ``ReLU`` and ``Identity`` layers, like the policies of
    :class:`~evochi_torch.gym.GymWorker`; else None: subclasses (they may override
    ``forward``), forward hooks and other dtypes run only as torch runs them. The parameters
    are copied: later changes to ``module`` do not reach the function."""
    if type(module) is not torch.nn.Sequential or _hooked(module):
        return None
    steps: list[Callable[[np.ndarray], np.ndarray]] = []
    for layer in module:
        kind = type(layer)
        if _hooked(layer):
            return None
        if kind is torch.nn.Linear:
            if any(p.dtype != torch.float32 for p in layer.parameters()):
                return None
            w = layer.weight.detach().cpu().numpy().copy()
            b = None if layer.bias is None else layer.bias.detach().cpu().numpy().copy()
            steps.append(lambda h, w=w, b=b: linear(h, w, b))
        elif kind is torch.nn.Tanh:
            steps.append(lambda h: tanh(h).astype(np.float32))
        elif kind is torch.nn.ReLU:
            steps.append(lambda h: np.maximum(h, np.float32(0.0)))
        elif kind is not torch.nn.Identity:
            return None

    def forward(x: np.ndarray) -> np.ndarray:
        h = np.asarray(x, dtype=np.float32)
        for step in steps:
            h = step(h)
        return h

    return forward


def _hooked(module: torch.nn.Module) -> bool:
    own = module._forward_hooks or module._forward_pre_hooks
    return bool(own or _hooks._global_forward_hooks or _hooks._global_forward_pre_hooks)


def powi(base: float, n: int) -> float:
    """``base**n`` for an integer ``n >= 0`` by squaring: only correctly rounded products."""
    if n < 0:
        raise ValueError(f"powi needs n >= 0, got {n}")
    result = 1.0
    while n:
        if n & 1:
            result *= base
        base *= base
        n >>= 1
    return result


def round32(x: float) -> float:
    """The float32 value nearest ``x``: the exact scalar torch uses when it multiplies a
    float32 tensor by the Python float ``x``, so float64 reasoning about an update can
    reproduce its bits."""
    return float(np.float32(x))


def sqrt32(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded square root of a float32 CPU tensor (a new tensor).

    NumPy's float32 ``sqrt`` is the CPU's IEEE square root instruction on every SIMD width.
    """
    a = x.detach().cpu().numpy()
    if a.dtype != np.float32:
        raise ValueError(f"sqrt32 takes float32, got {a.dtype}")
    return torch.from_numpy(np.sqrt(a))


def column_sums(a: np.ndarray) -> np.ndarray:
    """Sum of each column of a 2-D array (float64 ``[n, d]`` -> ``[d]``) in a fixed order.

    Rows are added pairwise in a tree (row ``i`` of the top half plus row ``i`` of the
    bottom half, repeated): each step is an elementwise IEEE addition, so SIMD width and
    thread count cannot change the order, and the error grows like a pairwise sum's.
    """
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"column_sums takes a 2-D array, got shape {a.shape}")
    if a.shape[0] == 0:
        return np.zeros(a.shape[1], dtype=np.float64)
    while a.shape[0] > 1:
        half = a.shape[0] // 2
        folded = np.add(a[:half], a[half : 2 * half])
        if a.shape[0] % 2:
            folded[0] = np.add(folded[0], a[-1])
        a = folded
    return a[0].copy()


_NORM_WIDTH = 1024


def norm(x: torch.Tensor | np.ndarray) -> float:
    """Euclidean norm in float64, the same bits on every CPU.

    Squares (correctly rounded products, exact for float32 inputs) are folded into 1024
    partial sums by :func:`column_sums`, which ``math.fsum`` adds exactly.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    squares = np.multiply(a, a)
    pad = -squares.size % _NORM_WIDTH
    if pad:
        squares = np.concatenate([squares, np.zeros(pad)])
    partial = column_sums(squares.reshape(-1, _NORM_WIDTH))
    return math.sqrt(math.fsum(partial.tolist()))
