"""The strategy seam: what every ES strategy provides, and the streamed noise sums they share.

A strategy is a stateless object of pure functions over a *strategy state*, a flat
``dict[str, Tensor]`` of CPU tensors (it goes straight into the training state's safetensors,
see :mod:`evochi_torch.codec`):

* :meth:`Strategy.init` -> the epoch-0 state for a center;
* :meth:`Strategy.ask` -> how the members of an epoch are perturbed, ``(offsets, signs,
  scale)``: member ``i`` is ``center + scale * signs[i] * eps_i`` with ``eps_i`` the window of
  the shared noise table at ``offsets[i]``; ``scale`` is a float or a per-parameter ``[P]``
  tensor (:meth:`Strategy.offsets` and :meth:`Strategy.scale` are its two halves);
* :meth:`Strategy.tell` -> the next ``(center, state)`` from one epoch's rewards.

Every method takes ``config`` first. The worker perturbs members with ``ask`` and every
update reads the same :meth:`Strategy.offsets`, so a strategy that overrides it changes both.

Updates stream over noise windows (two ``[P]`` accumulators at most), never materialising a
population x parameters matrix. Bit-identity: the accumulation is the same separate
multiply/add sequence as :func:`evochi_torch.noise.noise_weighted_sum`, and every other
elementwise operation runs in numpy float64 (one thread, fixed order) before rounding to
float32, so every worker computes the same bits whatever its torch thread count.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from .. import registry
from ..noise import NoiseTable, member_offsets
from ..optim import SGD, Adam, ClipUp, Optimizer, OptState
from ..shaping import shape_fitness

if TYPE_CHECKING:
    from ..config import ESConfig

__all__ = [
    "Strategy",
    "StrategyState",
    "noise_sums",
    "ranked",
]

StrategyState = OptState


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A strategy without options of its own."""


class Strategy:
    """Base class of strategies (subclass, set the class attributes, implement ``init`` and
    ``tell``, and register an instance with :func:`evochi_torch.strategies.register_strategy`)."""

    #: Registry name (``ESConfig.strategy``).
    name: ClassVar[str] = ""
    #: Dataclass of the strategy's own options (``ESConfig.strategy_options``).
    Options: ClassVar[type] = NoOptions
    #: Defaults of the shared ESConfig fields left at ``None``.
    default_learning_rate: ClassVar[float] = 0.01
    default_shaping: ClassVar[str] = "centered_rank"
    #: Center optimizer when ``ESConfig.optimizer`` is None; None: no optimizer at all.
    default_optimizer: ClassVar[str | None] = None
    #: Whether the strategy needs mirrored (antithetic) pairs.
    needs_antithetic: ClassVar[bool] = False
    #: The ``ESConfig.perturbation`` kinds it supports. ``"lowrank"`` needs a ``tell`` that
    #: only forms weighted sums of the members' directions (``table.weighted_sum``), never
    #: per-parameter statistics of the noise such as ``eps**2``.
    perturbations: ClassVar[tuple[str, ...]] = ("full",)

    # -------------------------------------------------------------- configuration
    def options(self, config: ESConfig) -> Any:
        """``config.strategy_options`` as this strategy's ``Options`` (validated)."""
        names = [f.name for f in dataclasses.fields(self.Options)]
        unknown = sorted(set(config.strategy_options) - set(names))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for strategy {self.name!r}; its options are "
                f"{names or 'none'}"
            )
        return self.Options(**config.strategy_options)

    def check_config(self, config: ESConfig) -> None:
        """Raise ``ValueError`` if ``config`` cannot run this strategy."""
        self.options(config)
        if config.perturbation not in self.perturbations:
            raise ValueError(
                f"strategy {self.name!r} does not support perturbation="
                f"{config.perturbation!r} (it supports {', '.join(self.perturbations)}); "
                "low-rank perturbations work with the strategies whose update is a weighted "
                "sum of the members' directions: "
                + ", ".join(registry.names_supporting(config.perturbation))
            )
        if self.needs_antithetic and not config.antithetic:
            raise ValueError(
                f"strategy {self.name!r} needs antithetic=True (it compares mirrored pairs)"
            )

    def make_optimizer(self, config: ESConfig) -> Optimizer:
        """The center optimizer (``config.optimizer`` or the strategy's default)."""
        name = config.optimizer or self.default_optimizer
        lr, wd = config.lr, config.weight_decay
        if name == "adam":
            return Adam(lr, betas=config.betas, eps=config.eps, weight_decay=wd)
        if name == "clipup":
            return ClipUp(lr, config.max_speed, momentum=config.momentum, weight_decay=wd)
        if name == "sgd":
            return SGD(lr, momentum=config.momentum, weight_decay=wd)
        # No optimizer: a plain gradient step is SGD without momentum.
        return SGD(lr, momentum=0.0, weight_decay=wd)

    # -------------------------------------------------------------- init, ask, tell
    def init(self, config: ESConfig, params: torch.Tensor) -> StrategyState:
        """Epoch-0 strategy state for the center ``params`` (float32 CPU ``[P]``)."""
        raise NotImplementedError

    def ask(
        self, config: ESConfig, state: StrategyState, epoch: int, num_params: int, table: NoiseTable
    ) -> tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]:
        """``(offsets, signs, scale)`` of ``epoch``'s members: int64 ``[npop]``, float32
        ``[npop]`` and the std (:meth:`scale`). Member ``i`` is
        ``center + scale * signs[i] * table[offsets[i] : offsets[i] + num_params]``."""
        offsets, signs = self.offsets(config, epoch, num_params, table)
        return offsets, signs, self.scale(config, state)

    def tell(
        self,
        config: ESConfig,
        params: torch.Tensor,
        state: StrategyState,
        rewards: np.ndarray | Sequence[float],
        epoch: int,
        table: NoiseTable,
    ) -> tuple[torch.Tensor, StrategyState]:
        """The next ``(center, state)`` from ``epoch``'s ``rewards`` (``[npop]``, member
        order). Pure: the inputs are not modified."""
        if type(self).update is not Strategy.update:
            # A subclass written against the deprecated ``update`` still works.
            return self.update(params, state, rewards, epoch, table, config)
        raise NotImplementedError

    def update(
        self,
        params: torch.Tensor,
        state: StrategyState,
        rewards: np.ndarray | Sequence[float],
        epoch: int,
        table: NoiseTable,
        config: ESConfig,
    ) -> tuple[torch.Tensor, StrategyState]:
        """Deprecated: :meth:`tell` with ``config`` last."""
        warnings.warn(
            "Strategy.update(params, state, rewards, epoch, table, config) is deprecated; use "
            "Strategy.tell(config, params, state, rewards, epoch, table)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.tell(config, params, state, rewards, epoch, table)

    def scale(self, config: ESConfig, state: StrategyState) -> float | torch.Tensor:
        """Perturbation std: a float, or a float32 CPU ``[P]`` tensor (per parameter)."""
        return config.sigma

    def offsets(
        self, config: ESConfig, epoch: int, num_params: int, table: NoiseTable
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise offsets and antithetic signs of ``epoch``'s members (:func:`member_offsets`
        of the run's seed)."""
        return member_offsets(
            config.seed,
            epoch,
            config.population_size,
            table.window_size(num_params),
            table.size,
            config.antithetic,
        )

    # -------------------------------------------------------------- helpers
    def shaped(self, rewards: np.ndarray | Sequence[float], config: ESConfig) -> np.ndarray:
        r = np.asarray(rewards, dtype=np.float64).reshape(-1)
        if r.size != config.population_size:
            raise ValueError(
                f"got {r.size} rewards for a population of {config.population_size} members"
            )
        return shape_fitness(r, config.shaping)

    def __repr__(self) -> str:
        return f"<strategy {self.name}>"


def require(state: StrategyState, key: str, shape: tuple[int, ...], dtype: torch.dtype):
    """``state[key]`` as a CPU tensor of ``shape``/``dtype``, or a clear error."""
    try:
        t = state[key]
    except KeyError:
        raise ValueError(
            f"strategy state has no {key!r} (keys: {sorted(state)}); was it written by another "
            "strategy or optimizer?"
        ) from None
    if tuple(t.shape) != shape:
        raise ValueError(f"strategy state {key!r} has shape {tuple(t.shape)}, expected {shape}")
    return t.to(device="cpu", dtype=dtype)


def f64(t: torch.Tensor) -> np.ndarray:
    """A float64 numpy copy of a CPU tensor."""
    return t.detach().cpu().numpy().astype(np.float64)


def f32(a: np.ndarray) -> torch.Tensor:
    """A float32 CPU tensor from a float64 array (rounded once)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def scalar(value: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype)


def ranked(fitness: np.ndarray) -> np.ndarray:
    """Member indices from best (highest fitness) to worst; ties by member index."""
    # lexsort's last key is primary: deterministic, no dependence on sort stability.
    return np.lexsort((np.arange(fitness.size), -fitness))


def noise_sums(
    table: NoiseTable,
    offsets: torch.Tensor,
    signs: torch.Tensor,
    num_params: int,
    lin: np.ndarray | None,
    sq: np.ndarray | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(sum_i lin[i] * s_i * eps_i, sum_i sq[i] * eps_i**2)`` streamed, float32 ``[P]``.

    Members sharing a window (antithetic pairs) are merged first in float64 (their ``eps**2``
    is the same, so ``sq`` coefficients add without signs); each coefficient is rounded to
    float32 once and accumulated in first-occurrence order with separate multiplies and adds.
    Either sum may be skipped (``None``). Peak extra memory: four ``[P]`` buffers, plus the
    table's cached squares (:attr:`NoiseTable.squared`) when ``sq`` is given.
    """
    offs = offsets.cpu().numpy().astype(np.int64, copy=False).reshape(-1)
    sgn = signs.cpu().numpy().astype(np.float64).reshape(-1)
    if offs.size and (offs.min() < 0 or offs.max() > table.size - num_params):
        raise ValueError("noise_sums: an offset's window falls outside the noise table")
    c_lin: dict[int, float] = {}
    c_sq: dict[int, float] = {}
    for i, o in enumerate(offs.tolist()):
        if lin is not None:
            c_lin[o] = c_lin.get(o, 0.0) + float(lin[i]) * sgn[i]
        if sq is not None:
            c_sq[o] = c_sq.get(o, 0.0) + float(sq[i])
    for coef in (c_lin, c_sq):
        if not all(math.isfinite(c) for c in coef.values()):
            raise ValueError("noise_sums: coefficients must be finite")
    data = table.data
    squared = table.squared if sq is not None else None
    acc_lin = torch.zeros(num_params, dtype=torch.float32) if lin is not None else None
    acc_sq = torch.zeros(num_params, dtype=torch.float32) if sq is not None else None
    tmp = torch.empty(num_params, dtype=torch.float32)
    for o in dict.fromkeys(offs.tolist()):
        window = data[o : o + num_params]
        if acc_lin is not None:
            c = float(np.float32(c_lin[o]))
            if c != 0.0:
                torch.mul(window, c, out=tmp)
                acc_lin.add_(tmp)
        if acc_sq is not None:
            c = float(np.float32(c_sq[o]))
            if c != 0.0:
                torch.mul(squared[o : o + num_params], c, out=tmp)
                acc_sq.add_(tmp)
    return acc_lin, acc_sq
