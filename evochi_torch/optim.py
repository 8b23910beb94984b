"""Functional optimizers for ES over one flat float32 CPU parameter tensor.

State is a ``dict[str, Tensor]`` of CPU tensors (``"step"`` is a 0-dim int64 tensor), so it can
go straight into safetensors. Functions never mutate their inputs; they return new tensors.

Bit-identity: every elementwise update is written as separate IEEE float32 operations
(mul, add, div, sqrt: each correctly rounded), never fused kernels (``addcdiv``, ``lerp``,
``add(alpha=)``) whose vectorised body may use FMA while the scalar tail does not; the square
root is NumPy's (the CPU's IEEE instruction), not torch's (MKL's vector math, chosen per CPU).
Scalars are computed in Python float64 with correctly rounded operations only (bias
corrections use exponentiation by squaring instead of libm's ``pow``). So every worker gets
the same bits whatever its thread count, CPU or number of peers (:mod:`.portable`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .portable import norm, powi, round32, sqrt32

__all__ = [
    "OPTIMIZERS",
    "SGD",
    "Adam",
    "ClipUp",
    "Optimizer",
    "adam_step",
    "clipup_step",
    "sgd_step",
]

OptState = dict[str, torch.Tensor]


def adam_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    state: OptState,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> tuple[torch.Tensor, OptState]:
    """Functional Adam that *ascends* ``grad`` (bias-corrected, decoupled weight decay)::

        m = b1 * m + (1 - b1) * g;   v = b2 * v + (1 - b2) * g * g
        theta = theta * (1 - lr * wd) + (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    State keys: ``step``, ``exp_avg``, ``exp_avg_sq``. Inputs are not modified.
    """
    params, grad = _check_pair(params, grad)
    step = int(state["step"]) + 1
    b1, b2 = betas
    m = _require(state, "exp_avg", params)
    v = _require(state, "exp_avg_sq", params)
    m = torch.mul(m, round32(b1)).add_(torch.mul(grad, round32(1.0 - b1)))
    v = torch.mul(v, round32(b2)).add_(torch.mul(grad, grad).mul_(round32(1.0 - b2)))
    bias1 = 1.0 - powi(b1, step)
    bias2 = 1.0 - powi(b2, step)
    denom = sqrt32(v).div_(round32(math.sqrt(bias2))).add_(round32(eps))
    update = torch.div(m, denom).mul_(round32(lr / bias1))
    new_state = {"step": torch.tensor(step, dtype=torch.int64), "exp_avg": m, "exp_avg_sq": v}
    return _decayed(params, update, lr, weight_decay), new_state


def sgd_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    state: OptState,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> tuple[torch.Tensor, OptState]:
    """Functional SGD with momentum that *ascends* ``grad`` (PyTorch convention)::

        buf = momentum * buf + g;    theta = theta * (1 - lr * wd) + lr * buf

    State keys: ``step``, ``momentum_buffer``. Inputs are not modified.
    """
    params, grad = _check_pair(params, grad)
    step = int(state["step"]) + 1
    buf = _require(state, "momentum_buffer", params)
    buf = torch.mul(buf, round32(momentum)).add_(grad)
    update = torch.mul(buf, round32(lr))
    new_state = {"step": torch.tensor(step, dtype=torch.int64), "momentum_buffer": buf}
    return _decayed(params, update, lr, weight_decay), new_state


def clipup_step(
    params: torch.Tensor,
    grad: torch.Tensor,
    state: OptState,
    *,
    lr: float,
    max_speed: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
) -> tuple[torch.Tensor, OptState]:
    """Functional ClipUp (Toklu et al. 2020) that *ascends* ``grad``::

        v = momentum * v + lr * g / ||g||;   v = v * min(1, max_speed / ||v||)
        theta = theta * (1 - lr * wd) + v

    ``max_speed=None`` uses ``2 * lr`` (the paper's and EvoTorch's rule of thumb). Norms are
    exactly rounded float64 sums (:func:`evochi_torch.portable.norm`). State keys: ``step``,
    ``velocity``.
    """
    params, grad = _check_pair(params, grad)
    step = int(state["step"]) + 1
    max_speed = 2.0 * lr if max_speed is None else max_speed
    vel = _require(state, "velocity", params)
    gnorm = norm64(grad)
    vel = torch.mul(vel, round32(momentum))
    if gnorm > 0.0:
        vel.add_(torch.mul(grad, round32(lr / gnorm)))
    vnorm = norm64(vel)
    if vnorm > max_speed:
        vel.mul_(round32(max_speed / vnorm))
    new_state = {"step": torch.tensor(step, dtype=torch.int64), "velocity": vel}
    return _decayed(params, vel, lr, weight_decay), new_state


def norm64(x: torch.Tensor) -> float:
    """Euclidean norm in float64, the same bits on every CPU (:func:`portable.norm`)."""
    return norm(x)


def _check_pair(params: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if params.shape != grad.shape or params.dim() != 1:
        raise ValueError(
            f"params and grad must be flat tensors of equal shape, got {tuple(params.shape)} "
            f"and {tuple(grad.shape)}"
        )
    if params.dtype != torch.float32 or grad.dtype != torch.float32:
        raise ValueError("params and grad must be float32")
    return params.cpu(), grad.cpu()


def _decayed(params: torch.Tensor, update: torch.Tensor, lr: float, wd: float) -> torch.Tensor:
    if wd:
        return torch.mul(params, round32(1.0 - lr * wd)).add_(update)
    return torch.add(params, update)


class Optimizer:
    """A center optimizer, torch.optim style but functional: hyper-parameters live in the
    object, the state is passed in and returned (``dict[str, Tensor]``, safetensors-ready).

    ``init(num_params)`` gives a fresh state; ``step(params, grad, state)`` ascends ``grad``
    and returns ``(new_params, new_state)`` without modifying its inputs.
    """

    name: ClassVar[str] = ""
    state_keys: ClassVar[tuple[str, ...]] = ()

    def init(self, num_params: int) -> OptState:
        state: OptState = {"step": torch.zeros((), dtype=torch.int64)}
        for key in self.state_keys:
            state[key] = torch.zeros(num_params, dtype=torch.float32)
        return state

    def step(
        self, params: torch.Tensor, grad: torch.Tensor, state: OptState
    ) -> tuple[torch.Tensor, OptState]:
        raise NotImplementedError


@dataclass(frozen=True)
class Adam(Optimizer):
    """Adam (ascending); functional twin :func:`adam_step`."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    name: ClassVar[str] = "adam"
    state_keys: ClassVar[tuple[str, ...]] = ("exp_avg", "exp_avg_sq")

    def step(self, params, grad, state):
        return adam_step(
            params, grad, state, lr=self.lr, betas=self.betas, eps=self.eps,
            weight_decay=self.weight_decay,
        )  # fmt: skip


@dataclass(frozen=True)
class SGD(Optimizer):
    """SGD with momentum (ascending); functional twin :func:`sgd_step`."""

    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    name: ClassVar[str] = "sgd"
    state_keys: ClassVar[tuple[str, ...]] = ("momentum_buffer",)

    def step(self, params, grad, state):
        return sgd_step(
            params, grad, state, lr=self.lr, momentum=self.momentum,
            weight_decay=self.weight_decay,
        )  # fmt: skip


@dataclass(frozen=True)
class ClipUp(Optimizer):
    """ClipUp (ascending); functional twin :func:`clipup_step`."""

    lr: float
    max_speed: float | None = None
    momentum: float = 0.9
    weight_decay: float = 0.0
    name: ClassVar[str] = "clipup"
    state_keys: ClassVar[tuple[str, ...]] = ("velocity",)

    def step(self, params, grad, state):
        return clipup_step(
            params, grad, state, lr=self.lr, max_speed=self.max_speed, momentum=self.momentum,
            weight_decay=self.weight_decay,
        )  # fmt: skip


OPTIMIZERS: dict[str, type[Optimizer]] = {"adam": Adam, "sgd": SGD, "clipup": ClipUp}


def _require(state: OptState, key: str, params: torch.Tensor) -> torch.Tensor:
    try:
        t = state[key]
    except KeyError:
        raise ValueError(
            f"optimizer state has no {key!r} (keys: {sorted(state)}); was it created for "
            "another optimizer?"
        ) from None
    if t.shape != params.shape:
        raise ValueError(
            f"optimizer state {key!r} has shape {tuple(t.shape)}, params {tuple(params.shape)}"
        )
    return t.to(device="cpu", dtype=torch.float32)
