"""PGPE (Sehnke et al. 2010) with symmetric sampling and ClipUp, as in pgpelib/EvoTorch.

Member pairs ``(2k, 2k+1)`` are ``center +/- sigma * eps_k`` with a per-parameter ``sigma``.
With shaped fitness ``w`` (centered ranks by default), ``n`` pairs and ``N = 2n`` members::

    grad_mu    = sum_k (w_2k - w_2k+1) / 2 * sigma * eps_k / n
    grad_sigma = sum_k (w_2k + w_2k+1) / 2 * (sigma**2 * eps_k**2 - sigma**2) / sigma / N
    center    <- optimizer(center, grad_mu)                  (ClipUp by default)
    sigma     <- clip(sigma + stdev_learning_rate * grad_sigma,
                      sigma * (1 - stdev_max_change), sigma * (1 + stdev_max_change))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .base import Strategy, f32, f64, noise_sums, require


@dataclass(frozen=True)
class PGPEOptions:
    #: Step size of the per-parameter sigma (pgpelib/EvoTorch: 0.1).
    stdev_learning_rate: float = field(
        default=0.1, metadata={"help": "step size of the per-parameter sigma"}
    )
    #: Bound on sigma's relative change per update (pgpelib/EvoTorch: 0.2).
    stdev_max_change: float = field(
        default=0.2, metadata={"help": "bound on sigma's relative change per update"}
    )

    def __post_init__(self) -> None:
        if not (math.isfinite(self.stdev_learning_rate) and self.stdev_learning_rate >= 0):
            raise ValueError(f"stdev_learning_rate must be >= 0, got {self.stdev_learning_rate}")
        if not 0 < self.stdev_max_change < 1:
            raise ValueError(f"stdev_max_change must be in (0, 1), got {self.stdev_max_change}")


class PGPE(Strategy):
    name = "pgpe"
    Options = PGPEOptions
    default_learning_rate = 0.15
    default_shaping = "centered_rank"
    default_optimizer = "clipup"
    needs_antithetic = True

    def init(self, config, params):
        state = self.make_optimizer(config).init(params.numel())
        state["sigma"] = f32(np.full(params.numel(), config.sigma))
        return state

    def scale(self, config, state):
        return state["sigma"]

    def update(self, params, state, rewards, epoch, table, config):
        opts = self.options(config)
        p = params.numel()
        npop = config.population_size
        w = self.shaped(rewards, config)
        sigma_t = require(state, "sigma", (p,), state["sigma"].dtype)
        sigma = f64(sigma_t)
        offsets, signs = self.offsets(config, epoch, p, table)
        # lin: sum_k (w+ - w-)/2 * eps_k / n = sum_i w_i s_i eps_i / N; sq: sum_i w_i eps_i^2.
        s_lin, s_sq = noise_sums(table, offsets, signs, p, w / npop, w)
        grad_mu = f32(sigma * f64(s_lin))
        sum_w = math.fsum(w.tolist())
        grad_sigma = sigma * (f64(s_sq) - sum_w) / (2.0 * npop)
        opt_state = {k: v for k, v in state.items() if k != "sigma"}
        new_params, new_state = self.make_optimizer(config).step(params, grad_mu, opt_state)
        new_sigma = sigma + opts.stdev_learning_rate * grad_sigma
        low = sigma * (1.0 - opts.stdev_max_change)
        high = sigma * (1.0 + opts.stdev_max_change)
        new_state["sigma"] = f32(np.minimum(np.maximum(new_sigma, low), high))
        return new_params, new_state
