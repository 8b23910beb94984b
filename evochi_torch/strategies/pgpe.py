"""PGPE (Sehnke et al. 2010) with symmetric sampling and ClipUp, as in pgpelib/EvoTorch.

Member pairs ``(2k, 2k+1)`` are ``center +/- sigma * eps_k`` with a per-parameter ``sigma``.
With shaped fitness ``w`` (centered ranks by default) and ``n`` pairs::

    grad_mu    = sum_k (w_2k - w_2k+1) / 2 * sigma * eps_k / n
    grad_sigma = sum_k (w_2k + w_2k+1) / 2 * (sigma**2 * eps_k**2 - sigma**2) / sigma / n
    center    <- optimizer(center, grad_mu)                  (ClipUp by default)
    sigma     <- clip(sigma + stdev_learning_rate * grad_sigma,
                      sigma * (1 - stdev_max_change), sigma * (1 + stdev_max_change))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..portable import round32
from .base import Strategy, f32, noise_sums, require


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

    def tell(self, config, params, state, rewards, epoch, table):
        opts = self.options(config)
        p = params.numel()
        npop = config.population_size
        w = self.shaped(rewards, config)
        sigma = require(state, "sigma", (p,), torch.float32)
        offsets, signs = self.offsets(config, epoch, p, table)
        # lin: sum_k (w+ - w-)/2 * eps_k / n = sum_i w_i s_i eps_i / N; sq: sum_i w_i eps_i^2.
        s_lin, s_sq = noise_sums(table, offsets, signs, p, w / npop, w)
        # The rest is elementwise float32 torch (the same bits for any thread count) rather
        # than float64 numpy: on 1M parameters the float64 round trips cost as much as a
        # third of the noise sums.
        grad_mu = s_lin.mul_(sigma)
        opt_state = {k: v for k, v in state.items() if k != "sigma"}
        new_params, new_state = self.make_optimizer(config).step(params, grad_mu, opt_state)
        # sigma + lr * sigma * (s_sq - sum w) / N, kept within sigma * (1 -/+ max change):
        # s_sq counts each pair's eps_k**2 twice, so / N = 2n is the per-direction average
        # (grad_sigma / n) of pgpelib's compute_reinforce_update and EvoTorch.
        step = s_sq.sub_(round32(math.fsum(w.tolist()))).mul_(sigma)
        new_sigma = step.mul_(round32(opts.stdev_learning_rate / npop)).add_(sigma)
        low = torch.mul(sigma, round32(1.0 - opts.stdev_max_change))
        high = torch.mul(sigma, round32(1.0 + opts.stdev_max_change))
        new_state["sigma"] = torch.minimum(torch.maximum(new_sigma, low), high)
        return new_params, new_state
