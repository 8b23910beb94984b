"""CEM, the cross-entropy method with a diagonal Gaussian (Rubinstein 1999; de Boer et al.
2005 for the smoothed update).

Member ``i`` is ``m + std * s_i * eps_i`` (per-parameter ``std``). The ``E`` best members
(``E = round(elite_fraction * npop)``) give the elite mean and std, reached with the
smoothing factors ``alpha = learning_rate`` (mean, default 1) and ``std_smoothing``::

    m_E   = m + std * mean_E(z);   s_E = std * sqrt(mean_E(z**2) - mean_E(z)**2)
    m    <- (1 - alpha) m + alpha m_E
    std  <- max(min_std, (1 - beta) std + beta s_E)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .base import Strategy, f32, f64, noise_sums, ranked, require


@dataclass(frozen=True)
class CEMOptions:
    #: Fraction of the population forming the elite (evosax: 0.5).
    elite_fraction: float = field(
        default=0.5, metadata={"help": "fraction of the population forming the elite"}
    )
    #: Weight of the elite std in the new std (1: plain CEM; de Boer et al. use 0.7-0.9).
    std_smoothing: float = field(
        default=0.7, metadata={"help": "weight of the elite std in the new std (1: plain CEM)"}
    )
    #: Floor of the std (keeps the search from collapsing).
    min_std: float = field(default=1e-8, metadata={"help": "floor of the std"})

    def __post_init__(self) -> None:
        if not 0 < self.elite_fraction <= 1:
            raise ValueError(f"elite_fraction must be in (0, 1], got {self.elite_fraction}")
        if not 0 < self.std_smoothing <= 1:
            raise ValueError(f"std_smoothing must be in (0, 1], got {self.std_smoothing}")
        if not (math.isfinite(self.min_std) and self.min_std >= 0):
            raise ValueError(f"min_std must be >= 0, got {self.min_std}")


class CEM(Strategy):
    name = "cem"
    Options = CEMOptions
    default_learning_rate = 1.0
    default_shaping = "raw"

    def check_config(self, config):
        super().check_config(config)
        if config.lr > 1.0:
            raise ValueError(f"cem: learning_rate (mean smoothing) must be <= 1, got {config.lr}")

    def init(self, config, params):
        return {"std": f32(np.full(params.numel(), config.sigma))}

    def scale(self, config, state):
        return state["std"]

    def tell(self, config, params, state, rewards, epoch, table):
        opts = self.options(config)
        p = params.numel()
        npop = config.population_size
        std = f64(require(state, "std", (p,), state["std"].dtype))
        elite = max(1, round(opts.elite_fraction * npop))
        fitness = self.shaped(rewards, config)
        coef = np.zeros(npop)
        coef[ranked(fitness)[:elite]] = 1.0 / elite
        offsets, signs = self.offsets(config, epoch, p, table)
        s_lin, s_sq = noise_sums(table, offsets, signs, p, coef, coef)
        z1, z2 = f64(s_lin), f64(s_sq)
        alpha, beta = config.lr, opts.std_smoothing
        center = f64(params) + alpha * std * z1
        elite_std = std * np.sqrt(np.maximum(z2 - z1 * z1, 0.0))
        new_std = np.maximum((1.0 - beta) * std + beta * elite_std, opts.min_std)
        return f32(center), {"std": f32(new_std)}
