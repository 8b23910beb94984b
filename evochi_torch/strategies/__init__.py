"""ES strategies behind one seam (see :mod:`evochi_torch.strategies.base`).

``STRATEGIES`` maps ``ESConfig.strategy`` names to strategy objects; adding a strategy is one
file and one entry here. Functional use, without any networking::

    s = get_strategy("pgpe")
    state = s.init(config, center)
    sigma = s.scale(config, state)                       # member i: center + sigma * s_i * eps_i
    center, state = s.update(center, state, rewards, epoch, table, config)

:func:`ask` and :func:`tell` wrap these for small problems (dense population matrix).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..noise import NoiseTable, perturbed_params
from .ars import ARS, ARSOptions
from .base import Strategy, StrategyState, noise_sums
from .cem import CEM, CEMOptions
from .openai_es import OpenAIES
from .pgpe import PGPE, PGPEOptions
from .sep_cma import SepCMA, SepCMAOptions
from .snes import SNES, SNESOptions

__all__ = [
    "ARS",
    "CEM",
    "PGPE",
    "SNES",
    "STRATEGIES",
    "ARSOptions",
    "CEMOptions",
    "OpenAIES",
    "PGPEOptions",
    "SNESOptions",
    "SepCMA",
    "SepCMAOptions",
    "Strategy",
    "StrategyState",
    "ask",
    "get_strategy",
    "noise_sums",
    "register_strategy",
    "tell",
]

STRATEGIES: dict[str, Strategy] = {
    s.name: s for s in (OpenAIES(), PGPE(), SNES(), SepCMA(), ARS(), CEM())
}


def get_strategy(name: str | Strategy) -> Strategy:
    """The registered strategy called ``name`` (a ``ValueError`` lists the known ones)."""
    if isinstance(name, Strategy):
        return name
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown ES strategy {name!r}; known strategies: {sorted(STRATEGIES)}"
        ) from None


def register_strategy(strategy: Strategy) -> Strategy:
    """Add a strategy to the registry (its ``name`` becomes a valid ``ESConfig.strategy``).

    Every worker process of a training must register it (e.g. at import of the module that
    defines the worker class)."""
    if not strategy.name:
        raise ValueError("a strategy needs a non-empty name")
    STRATEGIES[strategy.name] = strategy
    return strategy


def ask(config, params: torch.Tensor, state: StrategyState, epoch: int, table: NoiseTable):
    """The whole population's parameters ``[npop, P]`` (dense: for small problems/tests)."""
    s = get_strategy(config.strategy)
    offsets, signs = s.offsets(config, epoch, params.numel(), table)
    return perturbed_params(
        params, table, offsets, signs, s.scale(config, state), range(config.population_size)
    )


def tell(
    config,
    params: torch.Tensor,
    state: StrategyState,
    rewards: np.ndarray | Sequence[float],
    epoch: int,
    table: NoiseTable,
) -> tuple[torch.Tensor, StrategyState]:
    """``get_strategy(config.strategy).update(...)``: the next ``(center, state)``."""
    return get_strategy(config.strategy).update(params, state, rewards, epoch, table, config)
