"""ES strategies behind one seam (see :mod:`evochi_torch.strategies.base`).

Each strategy is one file here and one line in the registration below; the registry itself
(:mod:`evochi_torch.registry`) sits below :mod:`evochi_torch.config`, which reads a strategy's
defaults from it. Functional use, without any networking::

    s = get_strategy("pgpe")
    state = s.init(config, center)
    offsets, signs, scale = s.ask(config, state, epoch, center.numel(), table)
    center, state = s.tell(config, center, state, rewards, epoch, table)

:func:`ask` and :func:`tell` dispatch on ``config.strategy``; ``ask`` builds the dense
population matrix (for small problems).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .. import registry
from ..config import ESConfig
from ..noise import NoiseTable, perturbed_params
from .ars import ARS, ARSOptions
from .base import Strategy, StrategyState
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
    "register_strategy",
    "tell",
]

#: The registry (:data:`evochi_torch.registry.STRATEGIES`): name -> strategy.
STRATEGIES: dict[str, Strategy] = registry.STRATEGIES

for _strategy in (OpenAIES(), PGPE(), SNES(), SepCMA(), ARS(), CEM()):
    registry.register(_strategy)


def get_strategy(name: str | Strategy) -> Strategy:
    """The registered strategy called ``name`` (a ``ValueError`` lists the known ones)."""
    if isinstance(name, Strategy):
        return name
    return registry.lookup(name)  # type: ignore[return-value]


def register_strategy(strategy: Strategy) -> Strategy:
    """Add a strategy to the registry (its ``name`` becomes a valid ``ESConfig.strategy``).

    Every worker process of a training must register it (e.g. at import of the module that
    defines the worker class)."""
    registry.register(strategy)
    return strategy


def ask(
    config: ESConfig, params: torch.Tensor, state: StrategyState, epoch: int, table: NoiseTable
) -> torch.Tensor:
    """The whole population's parameters ``[npop, P]`` (dense: for small problems/tests)."""
    offsets, signs, scale = get_strategy(config.strategy).ask(
        config, state, epoch, params.numel(), table
    )
    return perturbed_params(params, table, offsets, signs, scale, range(config.population_size))


def tell(
    config: ESConfig,
    params: torch.Tensor,
    state: StrategyState,
    rewards: np.ndarray | Sequence[float],
    epoch: int,
    table: NoiseTable,
) -> tuple[torch.Tensor, StrategyState]:
    """:meth:`Strategy.tell` of ``config.strategy``: the next ``(center, state)``."""
    return get_strategy(config.strategy).tell(config, params, state, rewards, epoch, table)
