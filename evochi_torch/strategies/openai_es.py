"""OpenAI-ES (Salimans et al. 2017): fixed sigma, shaped fitness, any center optimizer.

``g = 1 / (npop * sigma) * sum_i w_i * s_i * eps_i`` then an optimizer step (Adam by default).
The strategy state is the center optimizer's state alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..config import ESConfig
from ..noise import NoiseTable
from .base import Strategy


class OpenAIES(Strategy):
    name = "openai_es"
    default_learning_rate = 0.01
    default_shaping = "centered_rank"
    default_optimizer = "adam"
    perturbations = ("full", "lowrank")

    def init(self, config, params):
        return self.make_optimizer(config).init(params.numel())

    def gradient(
        self,
        config: ESConfig,
        rewards: np.ndarray | Sequence[float],
        epoch: int,
        table: NoiseTable,
        num_params: int,
    ) -> torch.Tensor:
        """``g = 1 / (npop * sigma) * sum_i w_i * s_i * eps_i`` (float32 ``[P]``) with
        ``w`` the shaped ``rewards`` of ``epoch`` (member order)."""
        weights = self.shaped(rewards, config)
        offsets, signs = self.offsets(config, epoch, num_params, table)
        scale = 1.0 / (config.population_size * config.sigma)
        return table.weighted_sum(offsets, signs, weights, num_params, scale=scale)

    def tell(self, config, params, state, rewards, epoch, table):
        grad = self.gradient(config, rewards, epoch, table, params.numel())
        return self.make_optimizer(config).step(params, grad, state)


def es_gradient(
    rewards: np.ndarray | Sequence[float],
    epoch: int,
    table: NoiseTable,
    config: ESConfig,
    num_params: int,
) -> torch.Tensor:
    """OpenAI-ES's ascent direction for ``config`` (:meth:`OpenAIES.gradient`)."""
    return OpenAIES().gradient(config, rewards, epoch, table, num_params)
