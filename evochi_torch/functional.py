"""The pure ES maths of evochi_torch, in one namespace (no networking, no global state besides
a per-process noise-table cache). Everything here is a function of its arguments, so it can
be tested and reused alone, the way ``torch.nn.functional`` sits beside ``torch.nn``:

* noise: :class:`NoiseTable`, :func:`member_offsets`, :func:`perturbed_params`,
  :func:`noise_weighted_sum`, :func:`noise_sums`;
* fitness shaping: :func:`shape_fitness` and :func:`centered_rank`, :func:`zscore`,
  :func:`raw`, :func:`nes_utilities`;
* center optimizers: :func:`adam_step`, :func:`sgd_step`, :func:`clipup_step`;
* OpenAI-ES: :func:`es_gradient`;
* a run's strategy, by its config: :func:`tell` (the update), :func:`ask` (the dense
  population), :func:`epoch_offsets` and :func:`perturb_members` (some members);
* parameters: :func:`flatten_params`, :func:`load_flat`, :func:`unflatten_params`,
  :func:`num_params`.

Serialising a state (``encode_state``, ``decode_state``...) is :mod:`evochi_torch.codec`'s.
:func:`make_optimizer`, :func:`init_optimizer_state` and :func:`apply_update` (a config's
center optimizer) are here for the worker and the tests, outside ``__all__``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ._moved import forwarding_getattr
from .config import ESConfig
from .noise import (
    Members,
    NoiseTable,
    member_offsets,
    noise_weighted_sum,
    perturbed_params,
)
from .optim import Optimizer, OptState, adam_step, clipup_step, sgd_step
from .population import flatten_params, load_flat, num_params, unflatten_params
from .shaping import centered_rank, nes_utilities, raw, shape_fitness, zscore
from .strategies import ask, get_strategy, tell
from .strategies.base import noise_sums
from .strategies.openai_es import es_gradient

__all__ = [
    "NoiseTable",
    "adam_step",
    "ask",
    "centered_rank",
    "clipup_step",
    "epoch_offsets",
    "es_gradient",
    "flatten_params",
    "load_flat",
    "member_offsets",
    "nes_utilities",
    "noise_sums",
    "noise_weighted_sum",
    "num_params",
    "perturb_members",
    "perturbed_params",
    "raw",
    "sgd_step",
    "shape_fitness",
    "tell",
    "unflatten_params",
    "zscore",
]

# Names that belong to another module but are still looked up here: each resolves, with a
# DeprecationWarning, to its owner, which the warning names.
_FORWARDED = {
    **{name: "evochi_torch.codec" for name in (
        "STATE_FORMAT", "check_noise", "decode_state", "encode_state", "initial_state",
        "library_versions",
    )},
    **{name: "evochi_torch.noise" for name in ("NOISE_FORMAT", "default_table_size")},
    **{name: "evochi_torch.population" for name in ("ParamSpec", "is_plain_mlp", "param_layout")},
    **{name: "evochi_torch.shaping" for name in ("SHAPINGS", "check_rewards")},
    "norm64": "evochi_torch.optim",
}  # fmt: skip


__getattr__ = forwarding_getattr(__name__, _FORWARDED)


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
