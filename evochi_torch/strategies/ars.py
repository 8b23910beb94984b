"""ARS, augmented random search (Mania et al. 2018), versions V1-t / V2-t.

Pairs ``(2k, 2k+1)`` are ``center +/- nu * eps_k`` (``nu = sigma``). The ``b`` directions with
the largest ``max(r_2k, r_2k+1)`` are kept and, with ``sigma_R`` the std of their ``2b``
rewards::

    center <- center + alpha / (b * sigma_R) * sum_{k in top b} (r_2k - r_2k+1) * eps_k

``alpha = learning_rate`` (default 0.02). V2's observation normalisation is the harness's job
(the policy/evaluation side); the update is the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .base import Strategy


@dataclass(frozen=True)
class ARSOptions:
    #: Directions used per update (b); None: all population_size / 2 of them.
    top_directions: int | None = field(
        default=None,
        metadata={"help": "directions b used per update; None: all population_size / 2"},
    )
    #: Divide by the std of the used rewards (ARS's sigma_R); False is ARS "V1" without it.
    reward_std_scaling: bool = field(
        default=True, metadata={"help": "divide the step by the std of the used rewards (sigma_R)"}
    )

    def __post_init__(self) -> None:
        b = self.top_directions
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"top_directions must be an int >= 1, got {b!r}")
        if not isinstance(self.reward_std_scaling, bool):
            raise ValueError(f"reward_std_scaling must be a bool, got {self.reward_std_scaling!r}")


class ARS(Strategy):
    name = "ars"
    Options = ARSOptions
    default_learning_rate = 0.02
    default_shaping = "raw"
    default_optimizer = None  # ARS's plain step; ESConfig.optimizer may pick another
    needs_antithetic = True
    perturbations = ("full", "lowrank")

    def check_config(self, config):
        super().check_config(config)
        b = self.options(config).top_directions
        if b is not None and b > config.population_size // 2:
            raise ValueError(
                f"ars: top_directions={b} exceeds the {config.population_size // 2} directions"
            )

    def init(self, config, params):
        return self.make_optimizer(config).init(params.numel())

    def tell(self, config, params, state, rewards, epoch, table):
        opts = self.options(config)
        p = params.numel()
        r = self.shaped(rewards, config)
        n = config.population_size // 2
        b = n if opts.top_directions is None else opts.top_directions
        plus, minus = r[0::2], r[1::2]
        # Best directions first; ties by direction index (deterministic).
        order = np.lexsort((np.arange(n), -np.maximum(plus, minus)))[:b]
        used = np.concatenate([plus[order], minus[order]])
        std = 1.0
        if opts.reward_std_scaling:
            mean = math.fsum(used.tolist()) / used.size
            dev = used - mean
            std = math.sqrt(math.fsum((dev * dev).tolist()) / used.size)
        coef = np.zeros(config.population_size)
        if std > 0.0:
            coef[2 * order] = plus[order] / (b * std)
            coef[2 * order + 1] = minus[order] / (b * std)
        offsets, signs = self.offsets(config, epoch, p, table)
        grad = table.weighted_sum(offsets, signs, coef, p)
        return self.make_optimizer(config).step(params, grad, state)
