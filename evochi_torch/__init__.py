"""evochi_torch: Evolution Strategies for PyTorch on top of evochi.

What a user writes code against (``from evochi_torch import ...``):

* :class:`TorchESWorker` (subclass it: ``make_policy`` + ``score``), :class:`PopulationPolicy`
  (what ``score`` receives; :class:`evochi_torch.lowrank_policy.LowRankPolicy` with
  ``ESConfig(perturbation="lowrank")``),
  :class:`ESConfig`;
* strategies: :func:`get_strategy` (the registered names: :data:`evochi_torch.registry.STRATEGIES`;
  writing one: :mod:`evochi_torch.strategies`, ``Strategy``, ``register_strategy``);
* center optimizers: :class:`Adam`, :class:`SGD`, :class:`ClipUp`;
* checkpoints: :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`load_policy`,
  :class:`TorchESState`;
* training with a run directory: :func:`train`, :class:`Trainer`, :class:`RunConfig`
  (:mod:`evochi_torch.harness`); gymnasium tasks: :mod:`evochi_torch.gym`;
* errors: :class:`StateDecodeError` (:class:`evochi.v1.StateDecodeError` itself),
  :class:`NoiseMismatchError`; every exception of evochi and evochi_torch is an
  :class:`evochi.errors.EvochiError`.

The pure maths (noise, shaping, optimizer steps, ask/tell) lives in
:mod:`evochi_torch.functional`; serialisation in :mod:`evochi_torch.codec`.
"""

from __future__ import annotations

from ._moved import forwarding_getattr
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

# Names that are not part of this face but are still looked up here: each resolves, with a
# DeprecationWarning, to the module that owns it, so that code using them keeps working while
# it moves to the import the warning names.
_FORWARDED = {
    "TorchStateCodec": "evochi_torch.worker",
    "Strategy": "evochi_torch.strategies",
    "register_strategy": "evochi_torch.strategies",
    "RunResult": "evochi_torch.harness",
    **{name: "evochi_torch.functional" for name in (
        "NoiseTable", "apply_update", "centered_rank", "epoch_offsets", "es_gradient",
        "es_step", "flatten_params", "init_optimizer_state", "load_flat", "member_offsets",
        "noise_weighted_sum", "num_params", "perturb_members", "perturbed_params", "raw",
        "shape_fitness", "unflatten_params", "zscore",
    )},
    **{name: "evochi_torch.codec" for name in (
        "STATE_FORMAT", "check_noise", "decode_state", "encode_state", "initial_state",
        "library_versions",
    )},
    **{name: "evochi_torch.noise" for name in ("NOISE_FORMAT", "default_table_size")},
    **{name: "evochi_torch.population" for name in ("ParamSpec", "is_plain_mlp", "param_layout")},
    "check_rewards": "evochi_torch.shaping",
    "OptState": "evochi_torch.optim",
}  # fmt: skip


__getattr__ = forwarding_getattr(__name__, _FORWARDED)
