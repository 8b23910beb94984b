"""The pure ES maths of evochi_torch, in one namespace (no networking, no global state besides
a per-process noise-table cache). Everything here is a function of its arguments, so it can
be tested and reused alone, the way ``torch.nn.functional`` sits beside ``torch.nn``:

* noise: :class:`NoiseTable`, :func:`member_offsets`, :func:`perturbed_params`,
  :func:`noise_weighted_sum`, :func:`noise_sums`;
* fitness shaping: :func:`shape_fitness` and :func:`centered_rank`, :func:`zscore`,
  :func:`raw`, :func:`nes_utilities`; :func:`check_rewards`;
* center optimizers: :func:`adam_step`, :func:`sgd_step`, :func:`clipup_step`;
* OpenAI-ES: :func:`es_gradient`;
* a run's strategy, by its config: :func:`tell` (the update), :func:`ask` (the dense
  population), :func:`epoch_offsets` and :func:`perturb_members` (some members), and its
  center optimizer: :func:`make_optimizer`, :func:`init_optimizer_state`,
  :func:`apply_update`;
* parameters: :func:`flatten_params`, :func:`load_flat`, :func:`unflatten_params`...;
* state: :func:`initial_state`, :func:`encode_state`, :func:`decode_state`, :func:`check_noise`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from .codec import (
    STATE_FORMAT,
    check_noise,
    decode_state,
    encode_state,
    initial_state,
    library_versions,
)
from .config import ESConfig
from .noise import (
    NOISE_FORMAT,
    Members,
    NoiseTable,
    default_table_size,
    member_offsets,
    noise_weighted_sum,
    perturbed_params,
)
from .optim import (
    Optimizer,
    OptState,
    adam_step,
    clipup_step,
    norm64,
    sgd_step,
)
from .population import (
    ParamSpec,
    flatten_params,
    is_plain_mlp,
    load_flat,
    num_params,
    param_layout,
    unflatten_params,
)
from .shaping import (
    SHAPINGS,
    centered_rank,
    check_rewards,
    nes_utilities,
    raw,
    shape_fitness,
    zscore,
)
from .strategies import ask, es_gradient, get_strategy, noise_sums, tell

__all__ = [
    "NOISE_FORMAT",
    "SHAPINGS",
    "STATE_FORMAT",
    "NoiseTable",
    "OptState",
    "ParamSpec",
    "adam_step",
    "apply_update",
    "ask",
    "centered_rank",
    "check_noise",
    "check_rewards",
    "clipup_step",
    "decode_state",
    "default_table_size",
    "encode_state",
    "epoch_offsets",
    "es_gradient",
    "es_step",
    "flatten_params",
    "init_optimizer_state",
    "initial_state",
    "is_plain_mlp",
    "library_versions",
    "load_flat",
    "make_optimizer",
    "member_offsets",
    "nes_utilities",
    "noise_sums",
    "noise_weighted_sum",
    "norm64",
    "num_params",
    "param_layout",
    "perturb_members",
    "perturbed_params",
    "raw",
    "sgd_step",
    "shape_fitness",
    "tell",
    "unflatten_params",
    "zscore",
]


def epoch_offsets(
    config: ESConfig, epoch: int, num_params: int, table: NoiseTable
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(offsets int64[npop], signs float32[npop])`` of ``epoch``'s members
    (:meth:`Strategy.offsets` of ``config.strategy``)."""
    return get_strategy(config.strategy).offsets(config, epoch, num_params, table)


def perturb_members(
    center: torch.Tensor,
    table: NoiseTable,
    config: ESConfig,
    epoch: int,
    members: Members,
    device: torch.device | str | None = None,
    sigma: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Parameters ``[len(members), P]`` of some members of ``epoch``, on ``device``.

    :func:`epoch_offsets` + :func:`perturbed_params` with the run's sigma. For a strategy
    whose sigma is a state (pgpe, snes, sep_cma, cem) pass its
    ``strategy.scale(config, state)`` as ``sigma``. ``device=None``: ``center``'s device.
    """
    offsets, signs = epoch_offsets(config, epoch, center.numel(), table)
    scale = config.sigma if sigma is None else sigma
    return perturbed_params(center, table, offsets, signs, scale, members, device)


def make_optimizer(config: ESConfig) -> Optimizer:
    """The center optimizer ``config`` asks for (its strategy's default when unset)."""
    return get_strategy(config.strategy).make_optimizer(config)


def init_optimizer_state(config: ESConfig, num_params: int) -> OptState:
    """Fresh state of ``config``'s center optimizer for ``num_params`` parameters."""
    return make_optimizer(config).init(num_params)


def apply_update(
    params: torch.Tensor, grad: torch.Tensor, opt_state: OptState, config: ESConfig
) -> tuple[torch.Tensor, OptState]:
    """One step of ``config``'s center optimizer that *ascends* ``grad`` (float32 CPU
    ``[P]``; inputs are not modified)."""
    return make_optimizer(config).step(params, grad, opt_state)


def es_step(
    params: torch.Tensor,
    opt_state: OptState,
    rewards: np.ndarray | Sequence[float],
    epoch: int,
    table: NoiseTable,
    config: ESConfig,
) -> tuple[torch.Tensor, OptState]:
    """Deprecated: :func:`tell` with ``config`` last."""
    warnings.warn(
        "es_step(params, state, rewards, epoch, table, config) is deprecated; use "
        "tell(config, params, state, rewards, epoch, table)",
        DeprecationWarning,
        stacklevel=2,
    )
    return tell(config, params, opt_state, rewards, epoch, table)
