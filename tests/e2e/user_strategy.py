"""A user's own module: a strategy registered next to the worker that trains with it
(``evochi-torch train user_strategy:Worker --strategy mine``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from evochi_torch import ESConfig, TorchESWorker
from evochi_torch.strategies import register_strategy
from evochi_torch.strategies.openai_es import OpenAIES

_X = torch.linspace(-1, 1, 24).reshape(8, 3)
_Y = torch.sin(2 * _X.sum(-1, keepdim=True))


@dataclass(frozen=True)
class MineOptions:
    gradient_scale: float = field(default=1.0, metadata={"help": "multiplies the gradient"})


class Mine(OpenAIES):
    """OpenAI-ES under another name, with an option of its own."""

    name = "mine"
    Options = MineOptions

    def gradient(self, config, rewards, epoch, table, num_params):
        scale = self.options(config).gradient_scale
        return super().gradient(config, rewards, epoch, table, num_params) * scale


# At import, so that the launcher (which imports this module before parsing its flags) and
# every spawned worker process know the name.
register_strategy(Mine())


class Worker(TorchESWorker):
    default_config = ESConfig(population_size=8, sigma=0.05, learning_rate=0.05, seed=5)

    def make_policy(self) -> nn.Module:
        return nn.Linear(3, 1)

    def score(self, policy, epoch, members):
        x = _X.to(self.device).expand(len(members), -1, -1)
        return -((policy(x) - _Y.to(self.device)) ** 2).mean(dim=(1, 2))
