"""The strategy registry: names of ``ESConfig.strategy`` -> strategy objects.

It sits below both :mod:`evochi_torch.config` and :mod:`evochi_torch.strategies`: the
strategies register themselves here when their package is imported (which importing
``evochi_torch`` always does), and ``ESConfig`` looks its strategy's defaults up here, so
neither imports the other.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["STRATEGIES", "RegisteredStrategy", "lookup", "names_supporting", "register"]


class RegisteredStrategy(Protocol):
    """What the registry and ``ESConfig`` need of a strategy (see
    :class:`evochi_torch.strategies.Strategy` for the whole interface)."""

    name: str
    default_learning_rate: float
    default_shaping: str

    def check_config(self, config: Any) -> None: ...


#: Every registered strategy by name, in registration order.
STRATEGIES: dict[str, Any] = {}


def register(strategy: RegisteredStrategy) -> RegisteredStrategy:
    """Add ``strategy`` under its ``name`` (which becomes a valid ``ESConfig.strategy``).

    Every worker process of a training must register it (e.g. at import of the module that
    defines the worker class)."""
    if not getattr(strategy, "name", ""):
        raise ValueError("a strategy needs a non-empty name")
    STRATEGIES[strategy.name] = strategy
    return strategy


def lookup(name: str) -> RegisteredStrategy:
    """The strategy registered as ``name`` (a ``ValueError`` lists the known names)."""
    try:
        return STRATEGIES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown ES strategy {name!r}; known strategies: {sorted(STRATEGIES)}"
        ) from None


def names_supporting(perturbation: str) -> list[str]:
    """The registered strategies that support ``ESConfig.perturbation == perturbation``."""
    return sorted(
        name
        for name, s in STRATEGIES.items()
        if perturbation in getattr(s, "perturbations", ("full",))
    )
