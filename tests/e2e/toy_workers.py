"""Small TorchESWorker subclasses for the end-to-end tests (importable by spawned workers)."""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn

from evochi_torch import ESConfig, TorchESWorker

_X = torch.linspace(-1, 1, 48).reshape(16, 3)
_Y = torch.stack([torch.sin(2 * _X.sum(-1)), _X[:, 0] * _X[:, 1]], dim=-1)


class ToyRegression(TorchESWorker):
    """Fit a tiny MLP to a fixed function: cheap, deterministic, improves in a few epochs."""

    default_config = ESConfig(population_size=24, sigma=0.05, learning_rate=0.05, seed=3)

    def make_policy(self) -> nn.Module:
        return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))

    def score(self, policy, epoch, members):
        x = _X.to(self.device).expand(len(members), -1, -1)
        return -((policy(x) - _Y.to(self.device)) ** 2).mean(dim=(1, 2))


class NaNAtMember3(ToyRegression):
    def score(self, policy, epoch, members):
        rewards = super().score(policy, epoch, members).numpy().copy()
        rewards[members.numpy() == 3] = np.nan
        return rewards


class CrashOnFirstTask(ToyRegression):
    """Dies hard (as a segfault or OOM kill would) when asked to evaluate."""

    def score(self, policy, epoch, members):
        os._exit(3)


def mse(params: torch.Tensor) -> float:
    from evochi_torch.functional import load_flat

    module = load_flat(ToyRegression.make_policy(None), params)  # type: ignore[arg-type]
    with torch.no_grad():
        return float(((module(_X) - _Y) ** 2).mean())


class DiesAt(ToyRegression):
    """Kills its own process with SIGKILL at one point of the protocol, like a preempted
    machine: `die_at` is "initialize", "evaluate:E", "optimize:E" or "share:E" (E = the
    number of updates in the state when it happens)."""

    def __init__(self, *args, die_at: str = "", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.die_at = die_at
        codec = self.codec
        worker = self

        class DyingCodec:
            def encode(self, state):
                # Share-state encodes a state that already includes the epoch's update.
                if worker.die_at == f"share:{state.epoch}":
                    _die()
                return codec.encode(state)

            def decode(self, data):
                return codec.decode(data)

        self._codec = DyingCodec()

    def initialize(self):
        if self.die_at == "initialize":
            _die()
        return super().initialize()

    def evaluate(self, epoch, slices):
        if self.die_at == f"evaluate:{self.state.epoch}":
            _die()
        time.sleep(0.05)  # epochs slow enough for workers still starting to take part
        return super().evaluate(epoch, slices)

    def optimize(self, epoch, rewards):
        if self.die_at == f"optimize:{self.state.epoch}":
            _die()
        return super().optimize(epoch, rewards)


def _die() -> None:
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


class OtherNoise(ToyRegression):
    """Stands for a process whose numpy would generate different noise."""

    def noise_table(self):
        from evochi_torch.functional import NoiseTable

        return NoiseTable.for_params(self.config.seed + 1, self.params.numel())
