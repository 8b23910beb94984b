"""evochi_torch: Evolution Strategies for PyTorch on top of evochi.

What a user writes code against (``from evochi_torch import ...``):

* :class:`TorchESWorker` (subclass it: ``make_policy`` + ``score``), :class:`PopulationPolicy`
  (what ``score`` receives), :class:`ESConfig`;
* strategies: :func:`get_strategy` (``openai_es``, ``pgpe``, ``snes``, ``sep_cma``, ``ars``,
  ``cem``; writing one: :mod:`evochi_torch.strategies`, ``Strategy``, ``register_strategy``);
* center optimizers: :class:`Adam`, :class:`SGD`, :class:`ClipUp`;
* checkpoints: :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`load_policy`,
  :class:`TorchESState`;
* training with a run directory: :func:`train`, :class:`Trainer`, :class:`RunConfig`
  (:mod:`evochi_torch.harness`); gymnasium tasks: :mod:`evochi_torch.gym`;
* errors: :class:`StateDecodeError` (:class:`evochi.v1.StateDecodeError` itself),
  :class:`NoiseMismatchError`; every exception of evochi and evochi_torch is an
  :class:`evochi.errors.EvochiError`.

The pure maths (noise, shaping, optimizer steps, ask/tell) lives in
:mod:`evochi_torch.functional`. The names this package exported before (``es_step``,
``NoiseTable``, ``shape_fitness``...) still resolve here, forwarded to their home modules.
"""

from __future__ import annotations

import importlib
from typing import Any

from .codec import (
    NoiseMismatchError,
    StateDecodeError,
    TorchESState,
    load_checkpoint,
    load_policy,
    save_checkpoint,
)
from .config import ESConfig
from .harness import RunConfig, Trainer, train
from .optim import SGD, Adam, ClipUp
from .population import PopulationPolicy
from .strategies import get_strategy
from .worker import TorchESWorker

__all__ = [
    "SGD",
    "Adam",
    "ClipUp",
    "ESConfig",
    "NoiseMismatchError",
    "PopulationPolicy",
    "RunConfig",
    "StateDecodeError",
    "TorchESState",
    "TorchESWorker",
    "Trainer",
    "get_strategy",
    "load_checkpoint",
    "load_policy",
    "save_checkpoint",
    "train",
]

# Names of the pre-curation top level, forwarded (lazily) so existing code keeps working.
_FORWARDED = {
    "TorchStateCodec": "evochi_torch.worker",
    "Strategy": "evochi_torch.strategies",
    "register_strategy": "evochi_torch.strategies",
    "RunResult": "evochi_torch.harness",
    **{name: "evochi_torch.functional" for name in (
        "NOISE_FORMAT", "STATE_FORMAT", "NoiseTable", "OptState", "ParamSpec", "apply_update",
        "centered_rank", "check_noise", "check_rewards", "decode_state", "default_table_size",
        "encode_state", "epoch_offsets", "es_gradient", "es_step", "flatten_params",
        "init_optimizer_state", "initial_state", "is_plain_mlp", "library_versions",
        "load_flat", "member_offsets", "noise_weighted_sum", "num_params", "param_layout",
        "perturb_members", "perturbed_params", "raw", "shape_fitness", "unflatten_params",
        "zscore",
    )},
}  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _FORWARDED.get(name)
    if module is None:
        raise AttributeError(f"module 'evochi_torch' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
