"""Hyper-parameters of one Evolution Strategies training run.

`ESConfig` is plain, picklable data: it travels inside the training state's metadata, so every
worker (and every checkpoint) knows exactly which run it belongs to.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["ESConfig"]

_OPTIMIZERS = ("adam", "sgd")
_SHAPINGS = ("centered_rank", "zscore", "raw")


@dataclass(frozen=True)
class ESConfig:
    """Settings of an OpenAI-style ES run (antithetic Gaussian perturbations, shaped fitness).

    Attributes:
        population_size: members per epoch (must equal the server's population size).
            Must be even when ``antithetic`` is on: member ``2k`` and ``2k+1`` form a pair.
        sigma: standard deviation of the parameter perturbations.
        learning_rate: optimizer step size (the update *ascends* the fitness).
        optimizer: ``"adam"`` or ``"sgd"`` (SGD with ``momentum``, PyTorch convention:
            ``v = momentum * v + g; theta += lr * v``).
        momentum: SGD momentum in ``[0, 1)``; 0 gives plain SGD.
        betas: Adam's ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: Adam's denominator epsilon (> 0).
        weight_decay: *decoupled* weight decay (AdamW style, also for SGD):
            ``theta <- theta * (1 - lr * weight_decay) + lr * step``. Decoupled rather than L2
            so that its strength does not depend on Adam's per-coordinate scaling.
        antithetic: mirrored sampling; member ``2k`` gets ``+eps_k`` and ``2k+1`` gets ``-eps_k``.
        fitness_shaping: ``"centered_rank"`` (default, ranks mapped to ``[-0.5, 0.5]``),
            ``"zscore"`` or ``"raw"``.
        seed: seeds the noise table and the per-epoch noise offsets.
        device: device on which perturbed parameters are built and policies evaluated
            (e.g. ``"cpu"``, ``"cuda:0"``). Parameters and optimizer state always stay on CPU.
        noise_table_size: number of float32 values in the shared noise table; ``None`` picks
            one from the parameter count (see :func:`evochi_torch.noise.default_table_size`).
        nan_penalty: ``None`` raises on NaN/inf rewards; a finite number replaces them.
    """

    population_size: int
    sigma: float = 0.02
    learning_rate: float = 0.01
    optimizer: Literal["adam", "sgd"] = "adam"
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    antithetic: bool = True
    fitness_shaping: Literal["centered_rank", "zscore", "raw"] = "centered_rank"
    seed: int = 0
    device: str = "cpu"
    noise_table_size: int | None = None
    nan_penalty: float | None = None

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
        _check_float("learning_rate", self.learning_rate, positive=True)
        if self.optimizer not in _OPTIMIZERS:
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
        if self.learning_rate * self.weight_decay >= 1.0:
            raise ValueError(
                "ESConfig.learning_rate * weight_decay must be < 1 (decoupled decay multiplies "
                f"the parameters by 1 - lr * wd), got {self.learning_rate * self.weight_decay}"
            )
        if not isinstance(self.antithetic, bool):
            raise ValueError(f"ESConfig.antithetic must be a bool, got {self.antithetic!r}")
        if self.fitness_shaping not in _SHAPINGS:
            raise ValueError(
                f"ESConfig.fitness_shaping must be one of {_SHAPINGS}, got {self.fitness_shaping!r}"
            )
        _check_int("seed", self.seed, minimum=0)
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"ESConfig.device must be a device string, got {self.device!r}")
        if self.noise_table_size is not None:
            _check_int("noise_table_size", self.noise_table_size, minimum=2)
        if self.nan_penalty is not None:
            _check_float("nan_penalty", self.nan_penalty)

    def replace(self, **changes: Any) -> ESConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data view (JSON-friendly except that ``betas`` is a tuple)."""
        return dataclasses.asdict(self)


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
