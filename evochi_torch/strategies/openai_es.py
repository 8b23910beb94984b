"""OpenAI-ES (Salimans et al. 2017): fixed sigma, shaped fitness, any center optimizer.

``g = 1 / (npop * sigma) * sum_i w_i * s_i * eps_i`` then an optimizer step (Adam by default).
Exactly the update evochi_torch shipped before the strategy seam: same state keys (the
optimizer's), same bits.
"""

from __future__ import annotations

import numpy as np

from ..optim import es_gradient
from .base import Strategy


class OpenAIES(Strategy):
    name = "openai_es"
    default_learning_rate = 0.01
    default_shaping = "centered_rank"
    default_optimizer = "adam"

    def init(self, config, params):
        return self.make_optimizer(config).init(params.numel())

    def update(self, params, state, rewards, epoch, table, config):
        grad = es_gradient(np.asarray(rewards), epoch, table, config, params.numel())
        return self.make_optimizer(config).step(params, grad, state)
