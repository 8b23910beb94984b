"""SNES, separable natural evolution strategies (Schaul et al. 2011).

Member ``i`` is ``mu + sigma * s_i * eps_i`` with per-parameter ``sigma``; with utilities ``u``
(NES utilities by default, ``sum u = 0``)::

    mu    <- mu + eta_mu * sigma * sum_i u_i * s_i * eps_i
    sigma <- sigma * exp(eta_sigma / 2 * sum_i u_i * (eps_i**2 - 1))

``eta_mu = learning_rate`` (default 1), ``eta_sigma`` defaults to ``(3 + ln d) / (5 sqrt d)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import portable
from .base import Strategy, f32, f64, noise_sums, require


@dataclass(frozen=True)
class SNESOptions:
    #: Step size of log(sigma); None: (3 + ln d) / (5 sqrt d) (Schaul et al. 2011).
    sigma_learning_rate: float | None = field(
        default=None, metadata={"help": "step size of log(sigma); None: (3 + ln d) / (5 sqrt d)"}
    )

    def __post_init__(self) -> None:
        lr = self.sigma_learning_rate
        if lr is not None and not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"sigma_learning_rate must be > 0, got {lr}")


class SNES(Strategy):
    name = "snes"
    Options = SNESOptions
    default_learning_rate = 1.0
    default_shaping = "nes"

    def init(self, config, params):
        return {"sigma": f32(np.full(params.numel(), config.sigma))}

    def scale(self, config, state):
        return state["sigma"]

    def tell(self, config, params, state, rewards, epoch, table):
        opts = self.options(config)
        p = params.numel()
        u = self.shaped(rewards, config)
        sigma = f64(require(state, "sigma", (p,), state["sigma"].dtype))
        eta_sigma = opts.sigma_learning_rate
        if eta_sigma is None:
            eta_sigma = (3.0 + float(portable.log(p))) / (5.0 * math.sqrt(p))
        offsets, signs = self.offsets(config, epoch, p, table)
        s_lin, s_sq = noise_sums(table, offsets, signs, p, u, u)
        sum_u = math.fsum(u.tolist())
        center = f64(params) + config.lr * sigma * f64(s_lin)
        new_sigma = sigma * portable.exp(0.5 * eta_sigma * (f64(s_sq) - sum_u))
        return f32(center), {"sigma": f32(new_sigma)}
