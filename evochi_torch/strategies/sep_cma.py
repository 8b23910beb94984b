"""sep-CMA-ES (Ros and Hansen 2008): CMA-ES with a diagonal covariance, linear in ``d``.

Member ``i`` is ``m + sigma * sqrt(C) * s_i * eps_i`` (``z_i = s_i * eps_i``). With the
``mu`` best members weighted ``w_j = ln(mu + 1/2) - ln(j)`` (normalised, ``mu_eff``)::

    zw  = sum_j w_j z_j;           yw = sqrt(C) * zw
    m  <- m + c_m * sigma * yw
    ps <- (1 - cs) ps + sqrt(cs (2 - cs) mu_eff) zw
    pc <- (1 - cc) pc + h_sigma sqrt(cc (2 - cc) mu_eff) yw
    C  <- (1 - c1 - cmu) C + c1 (pc**2 + (1 - h_sigma) cc (2 - cc) C) + cmu C sum_j w_j z_j**2
    sigma <- sigma exp(cs / ds (|ps| / E|N(0, I)| - 1))

with Hansen's default constants and the sep-CMA learning rates ``c1, cmu`` scaled by
``(d + 2) / 3``. ``c_m = learning_rate`` (default 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import portable
from .base import Strategy, f32, f64, noise_sums, ranked, require, scalar


@dataclass(frozen=True)
class SepCMAOptions:
    #: Parents (selected members); None: population_size // 2.
    mu: int | None = field(
        default=None, metadata={"help": "parents (selected members); None: population_size // 2"}
    )

    def __post_init__(self) -> None:
        if self.mu is not None and (isinstance(self.mu, bool) or not isinstance(self.mu, int)):
            raise ValueError(f"mu must be an int, got {self.mu!r}")
        if self.mu is not None and self.mu < 1:
            raise ValueError(f"mu must be >= 1, got {self.mu}")


def constants(npop: int, d: int, mu: int | None = None) -> dict[str, float | np.ndarray]:
    """sep-CMA-ES's weights and learning rates for population ``npop`` in dimension ``d``."""
    mu = npop // 2 if mu is None else mu
    if not 1 <= mu <= npop:
        raise ValueError(f"sep_cma: mu must be in [1, population_size={npop}], got {mu}")
    raw_w = portable.log(mu + 0.5) - portable.log(np.arange(1, mu + 1, dtype=np.float64))
    w = raw_w / math.fsum(raw_w.tolist())
    mu_eff = 1.0 / math.fsum((w * w).tolist())
    cs = (mu_eff + 2.0) / (d + mu_eff + 5.0)
    ds = 1.0 + 2.0 * max(0.0, math.sqrt((mu_eff - 1.0) / (d + 1.0)) - 1.0) + cs
    cc = (4.0 + mu_eff / d) / (d + 4.0 + 2.0 * mu_eff / d)
    c1 = 2.0 / ((d + 1.3) * (d + 1.3) + mu_eff)
    cmu = min(1.0 - c1, 2.0 * (mu_eff - 2.0 + 1.0 / mu_eff) / ((d + 2.0) * (d + 2.0) + mu_eff))
    sep = (d + 2.0) / 3.0
    c1 = min(1.0, c1 * sep)
    cmu = min(1.0 - c1, cmu * sep)
    chi = math.sqrt(d) * (1.0 - 1.0 / (4.0 * d) + 1.0 / (21.0 * d * d))
    return {"w": w, "mu_eff": mu_eff, "cs": cs, "ds": ds, "cc": cc, "c1": c1, "cmu": cmu,
            "chi": chi}  # fmt: skip


class SepCMA(Strategy):
    name = "sep_cma"
    Options = SepCMAOptions
    default_learning_rate = 1.0
    default_shaping = "raw"

    def check_config(self, config):
        super().check_config(config)
        mu = self.options(config).mu
        if mu is not None and mu > config.population_size:
            raise ValueError(f"sep_cma: mu={mu} exceeds population_size")

    def init(self, config, params):
        p = params.numel()
        return {
            "sigma": scalar(config.sigma),
            "C": f32(np.ones(p)),
            "p_sigma": f32(np.zeros(p)),
            "p_c": f32(np.zeros(p)),
            "generation": scalar(0, torch.int64),
        }

    def scale(self, config, state):
        return f32(float(state["sigma"]) * np.sqrt(f64(state["C"])))

    def tell(self, config, params, state, rewards, epoch, table):
        p = params.numel()
        k = constants(config.population_size, p, self.options(config).mu)
        w, mu_eff = k["w"], k["mu_eff"]
        cs, ds, cc, c1, cmu, chi = k["cs"], k["ds"], k["cc"], k["c1"], k["cmu"], k["chi"]
        sigma = float(require(state, "sigma", (), state["sigma"].dtype))
        C = f64(require(state, "C", (p,), state["C"].dtype))
        ps = f64(require(state, "p_sigma", (p,), state["p_sigma"].dtype))
        pc = f64(require(state, "p_c", (p,), state["p_c"].dtype))
        g = int(require(state, "generation", (), state["generation"].dtype))

        fitness = self.shaped(rewards, config)
        coef = np.zeros(config.population_size)
        coef[ranked(fitness)[: w.size]] = w
        offsets, signs = self.offsets(config, epoch, p, table)
        s_lin, s_sq = noise_sums(table, offsets, signs, p, coef, coef)
        zw, z2 = f64(s_lin), f64(s_sq)
        sqrt_c = np.sqrt(C)
        yw = sqrt_c * zw
        center = f64(params) + config.lr * sigma * yw
        ps = (1.0 - cs) * ps + math.sqrt(cs * (2.0 - cs) * mu_eff) * zw
        ps_norm = portable.norm(ps)
        h_sigma = ps_norm / math.sqrt(1.0 - portable.powi(1.0 - cs, 2 * (g + 1))) / chi < (
            1.4 + 2.0 / (p + 1.0)
        )
        h = 1.0 if h_sigma else 0.0
        pc = (1.0 - cc) * pc + h * math.sqrt(cc * (2.0 - cc) * mu_eff) * yw
        C = (1.0 - c1 - cmu) * C + c1 * (pc * pc + (1.0 - h) * cc * (2.0 - cc) * C) + cmu * C * z2
        sigma *= float(portable.exp(cs / ds * (ps_norm / chi - 1.0)))
        return f32(center), {
            "sigma": scalar(sigma),
            "C": f32(C),
            "p_sigma": f32(ps),
            "p_c": f32(pc),
            "generation": scalar(g + 1, torch.int64),
        }
