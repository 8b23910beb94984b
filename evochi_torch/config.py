"""Hyper-parameters of one Evolution Strategies training run.

`ESConfig` is plain, picklable data: it travels inside the training state's metadata, so every
worker (and every checkpoint) knows exactly which run it belongs to.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from . import registry

__all__ = ["ESConfig"]

_OPTIMIZERS = ("adam", "sgd", "clipup")
_SHAPINGS = ("centered_rank", "zscore", "raw", "nes")
_PERTURBATIONS = ("full", "lowrank")


@dataclass(frozen=True)
class ESConfig:
    """Settings of one ES run: the strategy, its population and its hyper-parameters.

    Fields left at ``None`` take the strategy's default (see ``docs/strategies.md``), so
    ``ESConfig(strategy="pgpe", population_size=200)`` is PGPE with ClipUp as in pgpelib, and
    ``ESConfig(population_size=200)`` is OpenAI-ES with Adam.

    Attributes:
        population_size: members per epoch (must equal the server's population size).
            Must be even when ``antithetic`` is on: member ``2k`` and ``2k+1`` form a pair.
        strategy: a name registered in :data:`evochi_torch.registry.STRATEGIES` (the
            built-in ones are in ``docs/strategies.md``; a user's own: ``register_strategy``).
        strategy_options: the strategy's own options (plain data, e.g.
            ``{"elite_fraction": 0.2}`` for CEM); unknown keys are refused with the list of
            valid ones.
        sigma: (initial) standard deviation of the parameter perturbations.
        learning_rate: the center's step size; ``None``: the strategy's
            ``default_learning_rate``.
        optimizer: center optimizer of the gradient strategies (openai_es, pgpe, ars):
            ``"adam"``, ``"sgd"`` (SGD with ``momentum``, PyTorch convention:
            ``v = momentum * v + g; theta += lr * v``) or ``"clipup"``; ``None``: the
            strategy's ``default_optimizer`` (``None`` there: its plain gradient step).
        momentum: SGD / ClipUp momentum in ``[0, 1)``; 0 gives plain SGD.
        max_speed: ClipUp's velocity bound; ``None`` is ``2 * learning_rate``.
        betas: Adam's ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: Adam's denominator epsilon (> 0).
        weight_decay: *decoupled* weight decay (AdamW style, also for SGD):
            ``theta <- theta * (1 - lr * weight_decay) + lr * step``. Decoupled rather than L2
            so that its strength does not depend on Adam's per-coordinate scaling.
        antithetic: mirrored sampling; member ``2k`` gets ``+eps_k`` and ``2k+1`` gets ``-eps_k``.
        fitness_shaping: ``"centered_rank"`` (ranks mapped to ``[-0.5, 0.5]``),
            ``"zscore"``, ``"raw"`` or ``"nes"`` (NES utilities); ``None``: the strategy's
            ``default_shaping``. Each strategy's defaults: the table in ``docs/strategies.md``.
        seed: seeds the noise table and the per-epoch noise offsets.
        noise_table_size: number of float32 values in the shared noise table; ``None`` picks
            one from the parameter count (see :func:`evochi_torch.noise.default_table_size`).
        nan_penalty: ``None`` raises on NaN/inf rewards; a finite number replaces them.
        perturbation: ``"full"`` (every parameter gets its own noise) or ``"lowrank"``
            (each weight matrix moves by ``sigma * A @ B.T / sqrt(rank)``, EGGROLL style, see
            :mod:`evochi_torch.lowrank`; for large models). Supported by the strategies whose
            update is a weighted sum of directions (``openai_es``, ``ars``).
        rank: the rank ``r`` of the low-rank perturbations (ignored with ``"full"``).
    """

    population_size: int
    strategy: str = "openai_es"
    strategy_options: Mapping[str, Any] = field(default_factory=dict)
    sigma: float = 0.02
    learning_rate: float | None = None
    optimizer: Literal["adam", "sgd", "clipup"] | None = None
    momentum: float = 0.9
    max_speed: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    antithetic: bool = True
    fitness_shaping: Literal["centered_rank", "zscore", "raw", "nes"] | None = None
    seed: int = 0
    noise_table_size: int | None = None
    nan_penalty: float | None = None
    perturbation: Literal["full", "lowrank"] = "full"
    rank: int = 1

    def __post_init__(self) -> None:
        # Normalise sequences so that a config read back from JSON/YAML (lists) compares equal.
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        _check_int("population_size", self.population_size, minimum=1)
        if self.antithetic and self.population_size % 2:
            raise ValueError(
                f"ESConfig.population_size must be even with antithetic sampling "
                f"(members come in +/- pairs), got {self.population_size}; use an even "
                f"population or antithetic=False"
            )
        if self.antithetic and self.population_size < 2:
            raise ValueError("ESConfig.population_size must be >= 2 with antithetic sampling")
        _check_float("sigma", self.sigma, positive=True)
        if self.learning_rate is not None:
            _check_float("learning_rate", self.learning_rate, positive=True)
        if self.max_speed is not None:
            _check_float("max_speed", self.max_speed, positive=True)
        if self.optimizer is not None and self.optimizer not in _OPTIMIZERS:
            raise ValueError(
                f"ESConfig.optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}"
            )
        _check_float("momentum", self.momentum)
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"ESConfig.momentum must be in [0, 1), got {self.momentum}")
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2):
            raise ValueError(f"ESConfig.betas must be a pair (beta1, beta2), got {self.betas!r}")
        for i, b in enumerate(self.betas):
            _check_float(f"betas[{i}]", b)
            if not 0.0 <= b < 1.0:
                raise ValueError(f"ESConfig.betas[{i}] must be in [0, 1), got {b}")
        _check_float("eps", self.eps, positive=True)
        _check_float("weight_decay", self.weight_decay)
        if self.weight_decay < 0:
            raise ValueError(f"ESConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if not isinstance(self.strategy_options, Mapping):
            raise ValueError(
                f"ESConfig.strategy_options must be a mapping, got {self.strategy_options!r}"
            )
        # A plain dict: it is pickled into the training state's metadata (allow-listed).
        object.__setattr__(self, "strategy_options", dict(self.strategy_options))
        if self.perturbation not in _PERTURBATIONS:
            raise ValueError(
                f"ESConfig.perturbation must be one of {_PERTURBATIONS}, got {self.perturbation!r}"
            )
        _check_int("rank", self.rank, minimum=1)
        strategy = registry.lookup(self.strategy)  # ValueError naming the known strategies
        strategy.check_config(self)
        lr = self.lr
        if lr * self.weight_decay >= 1.0:
            raise ValueError(
                "ESConfig.learning_rate * weight_decay must be < 1 (decoupled decay multiplies "
                f"the parameters by 1 - lr * wd), got {lr * self.weight_decay}"
            )
        if not isinstance(self.antithetic, bool):
            raise ValueError(f"ESConfig.antithetic must be a bool, got {self.antithetic!r}")
        if self.fitness_shaping is not None and self.fitness_shaping not in _SHAPINGS:
            raise ValueError(
                f"ESConfig.fitness_shaping must be one of {_SHAPINGS}, got {self.fitness_shaping!r}"
            )
        _check_int("seed", self.seed, minimum=0)
        if self.noise_table_size is not None:
            _check_int("noise_table_size", self.noise_table_size, minimum=2)
        if self.nan_penalty is not None:
            _check_float("nan_penalty", self.nan_penalty)

    # Effective values: the field, or the strategy's default where it is None.
    @property
    def lr(self) -> float:
        """The effective center learning rate."""
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return registry.lookup(self.strategy).default_learning_rate

    @property
    def shaping(self) -> str:
        """The effective fitness shaping name."""
        if self.fitness_shaping is not None:
            return self.fitness_shaping
        return registry.lookup(self.strategy).default_shaping

    def __hash__(self) -> int:  # strategy_options is a dict: hash its sorted items
        values = tuple(
            tuple(sorted(v.items())) if isinstance(v, dict) else v
            for v in (getattr(self, f.name) for f in dataclasses.fields(self))
        )
        return hash(values)

    def replace(self, **changes: Any) -> ESConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view (JSON-friendly except that ``betas`` is a tuple)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_legacy(cls, obj: object) -> ESConfig:
        """Rebuild (and re-validate) a config unpickled from any release's state.

        Fields added since are given their defaults (which reproduce the old behaviour);
        fields removed since (``device``, now a worker setting) are dropped.
        """
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in vars(obj):
                values[f.name] = vars(obj)[f.name]
        return cls(**values)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"ESConfig.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"ESConfig.{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value: object, *, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"ESConfig.{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"ESConfig.{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"ESConfig.{name} must be > 0, got {value}")
