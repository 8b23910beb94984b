"""Functional optimizers for ES over one flat float32 CPU parameter tensor.

State is a ``dict[str, Tensor]`` of CPU tensors (``"step"`` is a 0-dim int64 tensor), so it can
go straight into safetensors. Functions never mutate their inputs; they return new tensors.

Bit-identity: every elementwise update is written as separate IEEE float32 operations
(mul, add, div, sqrt: each correctly rounded), never fused kernels (``addcdiv``, ``lerp``,
``add(alpha=)``) whose vectorised body may use FMA while the scalar tail does not. Scalars are
computed in Python float64 with correctly rounded operations only (bias corrections use
exponentiation by squaring instead of libm's ``pow``). So every worker gets the same bits
whatever its thread count, CPU or number of peers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .config import ESConfig
from .noise import NoiseTable, epoch_offsets, noise_weighted_sum
from .shaping import shape_fitness

__all__ = [
    "OptState",
    "apply_update",
    "es_gradient",
    "es_step",
    "init_optimizer_state",
]

OptState = dict[str, torch.Tensor]


def init_optimizer_state(config: ESConfig, num_params: int) -> OptState:
    """Fresh optimizer state for ``num_params`` parameters.

    Adam: ``{"step", "exp_avg", "exp_avg_sq"}``; SGD: ``{"step", "momentum_buffer"}``
    (``[P]`` float32 zeros, ``step`` a 0-dim int64 tensor).
    """
    step = torch.zeros((), dtype=torch.int64)
    if config.optimizer == "adam":
        return {
            "step": step,
            "exp_avg": torch.zeros(num_params, dtype=torch.float32),
            "exp_avg_sq": torch.zeros(num_params, dtype=torch.float32),
        }
    return {"step": step, "momentum_buffer": torch.zeros(num_params, dtype=torch.float32)}


def es_gradient(
    rewards: np.ndarray | Sequence[float],
    epoch: int,
    table: NoiseTable,
    config: ESConfig,
    num_params: int,
) -> torch.Tensor:
    """ES ascent direction ``g = 1 / (npop * sigma) * sum_i w_i * s_i * eps_i`` (float32 ``[P]``).

    ``rewards``: float ``[npop]`` in member order for ``epoch`` (the epoch whose noise was
    evaluated); ``w = shape_fitness(rewards, config.fitness_shaping)``.
    """
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    if r.size != config.population_size:
        raise ValueError(
            f"got {r.size} rewards for a population of {config.population_size} members"
        )
    weights = shape_fitness(r, config.fitness_shaping)
    offsets, signs = epoch_offsets(config, epoch, num_params, table)
    scale = 1.0 / (config.population_size * config.sigma)
    return noise_weighted_sum(table, offsets, signs, weights, num_params, scale=scale)


def _powi(base: float, n: int) -> float:
    # Exponentiation by squaring: only correctly rounded multiplications, unlike libm pow().
    result = 1.0
    while n:
        if n & 1:
            result *= base
        base *= base
        n >>= 1
    return result


def _f32(x: float) -> float:
    # The exact float32 value torch will use for this Python scalar.
    return float(np.float32(x))


def apply_update(
    params: torch.Tensor, grad: torch.Tensor, opt_state: OptState, config: ESConfig
) -> tuple[torch.Tensor, OptState]:
    """One optimizer step that *ascends* along ``grad``. Returns ``(new_params, new_state)``.

    Adam (bias-corrected, as ``torch.optim.Adam`` but ascending)::

        m = b1 * m + (1 - b1) * g;   v = b2 * v + (1 - b2) * g * g
        theta = theta * (1 - lr * wd) + (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    SGD with momentum (PyTorch convention, no dampening)::

        buf = momentum * buf + g;    theta = theta * (1 - lr * wd) + lr * buf

    ``params``, ``grad``: float32 CPU ``[P]``; inputs are not modified.
    """
    if params.shape != grad.shape or params.dim() != 1:
        raise ValueError(
            f"params and grad must be flat tensors of equal shape, got {tuple(params.shape)} "
            f"and {tuple(grad.shape)}"
        )
    if params.dtype != torch.float32 or grad.dtype != torch.float32:
        raise ValueError("params and grad must be float32")
    params = params.cpu()
    grad = grad.cpu()
    step = int(opt_state["step"]) + 1
    lr = config.learning_rate
    new_state: OptState = {"step": torch.tensor(step, dtype=torch.int64)}

    if config.optimizer == "adam":
        b1, b2 = config.betas
        m = _require(opt_state, "exp_avg", params)
        v = _require(opt_state, "exp_avg_sq", params)
        m = torch.mul(m, _f32(b1)).add_(torch.mul(grad, _f32(1.0 - b1)))
        v = torch.mul(v, _f32(b2)).add_(torch.mul(grad, grad).mul_(_f32(1.0 - b2)))
        bias1 = 1.0 - _powi(b1, step)
        bias2 = 1.0 - _powi(b2, step)
        denom = torch.sqrt(v).div_(_f32(math.sqrt(bias2))).add_(_f32(config.eps))
        update = torch.div(m, denom).mul_(_f32(lr / bias1))
        new_state["exp_avg"] = m
        new_state["exp_avg_sq"] = v
    elif config.optimizer == "sgd":
        buf = _require(opt_state, "momentum_buffer", params)
        buf = torch.mul(buf, _f32(config.momentum)).add_(grad)
        update = torch.mul(buf, _f32(lr))
        new_state["momentum_buffer"] = buf
    else:  # pragma: no cover - ESConfig validates
        raise ValueError(f"unknown optimizer {config.optimizer!r}")

    if config.weight_decay:
        new_params = torch.mul(params, _f32(1.0 - lr * config.weight_decay)).add_(update)
    else:
        new_params = torch.add(params, update)
    return new_params, new_state


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


def es_step(
    params: torch.Tensor,
    opt_state: OptState,
    rewards: np.ndarray | Sequence[float],
    epoch: int,
    table: NoiseTable,
    config: ESConfig,
) -> tuple[torch.Tensor, OptState]:
    """One full ES update: shape ``rewards`` -> streamed weighted noise sum -> optimizer step.

    ``params``: the center (float32 CPU ``[P]``) whose perturbations were evaluated in
    ``epoch``; ``rewards``: ``[npop]`` finite rewards in member order. Returns the next center
    and optimizer state; bit-identical in every process given the same inputs.
    """
    grad = es_gradient(rewards, epoch, table, config, params.numel())
    return apply_update(params, grad, opt_state, config)
