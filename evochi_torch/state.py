"""The training state and its one step: what every worker holds and advances in lockstep.

:class:`TorchESState` is the center, the strategy state, the epoch and the run's config;
:meth:`TorchESState.advance` applies the run's strategy (:meth:`Strategy.tell`) to one epoch's
rewards. Turning a state into bytes and back is :mod:`evochi_torch.codec`'s job.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import platform
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import safetensors
import torch
from torch import nn

from evochi.v1.errors import EvochiError

from .config import ESConfig
from .noise import NoiseTable
from .optim import OptState
from .population import flatten_params
from .strategies import get_strategy

__all__ = [
    "NoiseMismatchError",
    "TorchESState",
    "check_noise",
    "initial_state",
    "library_versions",
]


class NoiseMismatchError(EvochiError, RuntimeError):
    """This process's noise table differs from the one the training was started with."""


def library_versions() -> dict[str, str]:
    """Versions of the libraries that determine numerics, recorded in every state."""
    return dict(_library_versions())


@functools.cache
def _library_versions() -> dict[str, str]:
    # importlib.metadata scans the installed distributions: do it once per process.
    try:
        evochi = importlib.metadata.version("evochi")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        evochi = "unknown"
    return {
        "evochi": evochi,
        "torch": str(torch.__version__),
        "numpy": str(np.__version__),
        "safetensors": str(safetensors.__version__),
        "python": platform.python_version(),
    }


@dataclass
class TorchESState:
    """Everything a worker needs to continue a training.

    Attributes:
        params: center parameters, float32 CPU ``[P]``.
        opt_state: the strategy state (``config.strategy``'s tensors: the center optimizer's
            moments, per-parameter sigma, evolution paths...; see
            :mod:`evochi_torch.strategies`), stored as the ``opt.*`` tensors.
        epoch: the epoch whose perturbations are evaluated around ``params`` (0 at the start;
            :meth:`advance` with that epoch's rewards yields ``epoch + 1``).
        config: the run's :class:`ESConfig`.
        noise_fingerprint: :attr:`NoiseTable.fingerprint` of the run's noise table.
        extra_tensors: user tensors saved alongside (e.g. observation normalisation stats).
        extra: user plain data (str/int/float/bool/None, lists, tuples, dicts, sets).
        versions: library versions of the process that wrote the state (informational).
    """

    params: torch.Tensor
    opt_state: OptState
    epoch: int
    config: ESConfig
    noise_fingerprint: str
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)

    @property
    def strategy_state(self) -> OptState:
        """Alias of :attr:`opt_state`."""
        return self.opt_state

    def advance(self, rewards: np.ndarray | Any, table: NoiseTable) -> TorchESState:
        """The state after one ES step with this epoch's ``rewards`` (``[npop]``, member order).

        Checks that ``table`` is the run's noise table; returns a new state with ``epoch + 1``
        (``extra`` and ``extra_tensors`` are carried over unchanged).
        """
        check_noise(self, table)
        params, opt_state = get_strategy(self.config.strategy).tell(
            self.config, self.params, self.opt_state, rewards, self.epoch, table
        )
        return dataclasses.replace(
            self,
            params=params,
            opt_state=opt_state,
            epoch=self.epoch + 1,
            versions=library_versions(),
        )


def initial_state(
    params: torch.Tensor | nn.Module,
    config: ESConfig,
    table: NoiseTable,
    *,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    extra: dict[str, Any] | None = None,
) -> TorchESState:
    """Epoch-0 state from initial parameters (a flat ``[P]`` tensor or a module)."""
    if isinstance(params, nn.Module):
        params = flatten_params(params)
    params = params.detach().to(device="cpu", dtype=torch.float32).reshape(-1).clone()
    return TorchESState(
        params=params,
        opt_state=get_strategy(config.strategy).init(config, params),
        epoch=0,
        config=config,
        noise_fingerprint=table.fingerprint,
        extra_tensors=dict(extra_tensors or {}),
        extra=dict(extra or {}),
    )


def check_noise(state: TorchESState, table: NoiseTable) -> None:
    """Raise :class:`NoiseMismatchError` unless ``table`` is the noise the training uses."""
    if table.fingerprint == state.noise_fingerprint:
        return
    here = library_versions()
    raise NoiseMismatchError(
        "this process's noise table differs from the training's, so its perturbations and "
        "updates would silently diverge; refusing to continue.\n"
        f"  training: {state.noise_fingerprint} (written with numpy "
        f"{state.versions.get('numpy', '?')}, torch {state.versions.get('torch', '?')})\n"
        f"  here:     {table.fingerprint} (numpy {here['numpy']}, torch {here['torch']})\n"
        "Use the same seed/noise_table_size and the numpy version the training was started with."
    )
