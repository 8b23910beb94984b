"""Small TorchESWorker subclasses for the end-to-end tests (importable by spawned workers)."""

from __future__ import annotations

import os

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
    from evochi_torch import load_flat

    module = load_flat(ToyRegression.make_policy(None), params)  # type: ignore[arg-type]
    with torch.no_grad():
        return float(((module(_X) - _Y) ** 2).mean())
