"""TorchESWorker: ES (any strategy of `evochi_torch.strategies`) for a PyTorch policy, as an
Evochi worker.

A subclass names the policy (`make_policy`) and how to score a batch of population
members (`score`); this class does the rest:

* the center parameters are one flat float32 CPU tensor, updated by the pure functions of
  the config's strategy (`evochi_torch.strategies`) so that every worker computes the same bits;
* member i's perturbation comes from the shared noise table at an offset that is a pure
  function of (seed, epoch, i): nothing but rewards crosses the wire;
* the members of a task are built on the evaluation device in one go and run as one batch
  through `PopulationPolicy` (bmm fast path for MLPs, vmap otherwise);
* the state travels as safetensors + allow-listed metadata (`evochi_torch.codec`).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from evochi.v1 import Eval, Worker

from .codec import decode_state, encode_state, state_digest
from .config import ESConfig
from .lowrank import LowRankNoise, noise_for
from .lowrank_policy import LowRankPolicy
from .noise import NoiseTable, perturbed_params
from .population import PopulationPolicy, flatten_params, load_flat
from .shaping import check_rewards
from .state import TorchESState, check_noise, initial_state
from .strategies import get_strategy

log = logging.getLogger("evochi_torch.worker")


class TorchStateCodec:
    """The worker's state codec: safetensors + allow-listed metadata (`evochi_torch.codec`)."""

    def encode(self, state: TorchESState) -> bytes:
        return encode_state(state)

    def decode(self, data: bytes) -> TorchESState:
        return decode_state(data)


class TorchESWorker(Worker[TorchESState]):
    """Base class of ES workers for PyTorch policies.

    Args:
        channel: a `grpc.aio` channel or a "host:port" address.
        cores: members evaluated per task at most (the device batch size).
        config: ES hyper-parameters; defaults to the class's `default_config`. A worker
            that joins a running training adopts the training's config from the state.
        device: where this worker builds perturbed parameters and evaluates policies
            (e.g. "cuda:1"; default "cpu"). A worker setting: it is not part of the config
            that travels in the training state; the center and strategy state stay on CPU.
        **kwargs: passed to `evochi.v1.Worker` (reconnect, join_token, ...).
    """

    #: The ES hyper-parameters used when no `config=` is given.
    default_config: ClassVar[ESConfig | None] = None

    def __init__(
        self,
        channel: Any,
        cores: int,
        *,
        config: ESConfig | None = None,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> None:
        config = config if config is not None else type(self).default_config
        if config is None:
            raise TypeError(
                f"{type(self).__name__} needs an ESConfig: pass config= or set default_config"
            )
        kwargs.setdefault("codec", TorchStateCodec())
        super().__init__(channel, cores, **kwargs)
        self._config = config
        self.device = torch.device("cpu" if device is None else device)
        self._module: nn.Module | None = None
        self._table: NoiseTable | LowRankNoise | None = None
        self._center: tuple[TorchESState, torch.Tensor] | None = None
        self._asked: tuple[TorchESState, tuple[torch.Tensor, torch.Tensor, Any]] | None = None

    # ------------------------------------------------------------------ user hooks
    @abc.abstractmethod
    def make_policy(self) -> nn.Module:
        """A fresh policy module. Its initial parameters (drawn under
        `torch.manual_seed(config.seed)`) become the training's starting point."""

    @abc.abstractmethod
    def score(
        self, policy: PopulationPolicy | LowRankPolicy, epoch: int, members: torch.Tensor
    ) -> Sequence[float] | np.ndarray | torch.Tensor:
        """Scores a batch of population members; returns one float per member.

        `policy(x)` runs the policy with `x` of shape [B, ...], row b with the parameters
        of member `members[b]` (int64 CPU tensor of population indices). Higher is better.
        May return `(rewards, {"env_steps": one value per member, ...})`: the metrics reach
        the server's `EpochSummary.metrics` (see `split_score`).
        """

    # ------------------------------------------------------------------ accessors
    @property
    def config(self) -> ESConfig:
        """The training's ES config (from the state once joined)."""
        return self._config

    @property
    def params(self) -> torch.Tensor:
        """The center parameters: flat float32 CPU tensor."""
        return self.state.params

    @property
    def module(self) -> nn.Module:
        """The policy's structure on the evaluation device (its own values are unused)."""
        if self._module is None:
            self._module = self.make_policy().to(self.device)
        return self._module

    def center_policy(self) -> nn.Module:
        """A plain module holding the current center parameters (on the CPU)."""
        return load_flat(self.make_policy(), self.params)

    def noise_table(self) -> NoiseTable | LowRankNoise:
        """The run's noise: the shared table, read through the low-rank layout of the policy's
        parameters with ``perturbation="lowrank"``."""
        if self._table is None:
            self._table = noise_for(self._config, _shapes(self.module))
        return self._table

    # ------------------------------------------------------------------ protocol hooks
    def on_hello(self) -> None:
        if self.population_size != self._config.population_size:
            raise ValueError(
                f"population size mismatch: the server trains {self.population_size} members "
                f"per epoch but this worker's ESConfig.population_size is "
                f"{self._config.population_size}; start the server with --population-size "
                f"{self._config.population_size} or change the config"
            )

    def initialize(self) -> TorchESState:
        config = self._config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            policy = self.make_policy()
            params = flatten_params(policy)
        table = noise_for(config, _shapes(policy))
        self._table = table
        return initial_state(params, config, table)

    def state_digest(self, state: TorchESState) -> bytes:
        """`evochi_torch.codec.state_digest`: what a worker evaluates around, not the
        library versions it runs."""
        return state_digest(state)

    def on_state_change(self, state: TorchESState) -> None:
        adopted = state.config
        if adopted != self._config:
            differing = [
                f"{k}={getattr(adopted, k)!r}"
                for k in adopted.to_dict()
                if getattr(adopted, k) != getattr(self._config, k)
            ]
            log.warning("adopting the training's config (%s)", ", ".join(differing))
            self._table = None
        self._config = adopted
        check_noise(state, self.noise_table())

    def evaluate(self, epoch: int, slices: list[slice]) -> list[Eval]:
        # The noise is keyed by the state's own epoch counter (updates applied so far), not
        # by the server's epoch number, so it cannot drift from the parameters it perturbs.
        state = self.state
        members = torch.cat([torch.arange(s.start, s.stop) for s in slices])
        offsets, signs, scale = self._ask(state)
        table = self.noise_table()
        policy: PopulationPolicy | LowRankPolicy
        if isinstance(table, LowRankNoise):
            assert not isinstance(scale, torch.Tensor)
            policy = LowRankPolicy(
                self.module, self._device_center(state), table, offsets, signs, scale, members
            )
        else:
            params = perturbed_params(
                self._device_center(state), table, offsets, signs, scale, members
            )
            policy = PopulationPolicy(self.module, params)
        with torch.no_grad():
            raw = self.score(policy, epoch, members)
        raw, metrics = split_score(raw)
        if isinstance(raw, torch.Tensor):
            raw = raw.detach().to("cpu", torch.float64).numpy()
        rewards = check_rewards(raw, members.numpy(), self._config.nan_penalty)
        return Eval.from_flat(slices, rewards.tolist(), metrics)

    def optimize(self, epoch: int, rewards: list[float]) -> TorchESState:
        # advance() returns a new state, never an in-place update: a hook abandoned mid-way
        # (lost connection) must not leave a half-updated state behind.
        return self.state.advance(np.asarray(rewards, dtype=np.float64), self.noise_table())

    def _device_center(self, state: TorchESState) -> torch.Tensor:
        # One copy of the center on the evaluation device per state, not one per task.
        cached = self._center
        if cached is None or cached[0] is not state:
            cached = self._center = (state, state.params.to(self.device))
        return cached[1]

    def _ask(self, state: TorchESState) -> tuple[torch.Tensor, torch.Tensor, Any]:
        # Every task of an epoch perturbs around the same state: ask the strategy once per state.
        cached = self._asked
        if cached is None or cached[0] is not state:
            strategy = get_strategy(self._config.strategy)
            asked = strategy.ask(
                self._config, state.opt_state, state.epoch, state.params.numel(), self.noise_table()
            )
            cached = self._asked = (state, asked)
        return cached[1]


def _shapes(module: nn.Module) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in module.parameters()]


def split_score(raw: Any) -> tuple[Any, dict[str, np.ndarray] | None]:
    """``score``'s result as (rewards, per-member metrics or None).

    ``score`` returns either the rewards or a ``(rewards, metrics)`` tuple whose metrics
    map names to one value per member (sequences, arrays or tensors on any device).
    """
    if not (isinstance(raw, tuple) and len(raw) == 2 and isinstance(raw[1], Mapping)):
        return raw, None
    rewards, metrics = raw
    return rewards, {
        str(name): torch.as_tensor(values).detach().to("cpu", torch.float64).numpy()
        for name, values in metrics.items()
    }
