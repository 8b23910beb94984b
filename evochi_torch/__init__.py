"""evochi_torch: OpenAI-style Evolution Strategies for PyTorch on top of evochi.

The pure ES maths (no networking, no global state besides a per-process noise-table cache):

* :mod:`~evochi_torch.config`: :class:`ESConfig`;
* :mod:`~evochi_torch.noise`: shared noise table, per-epoch member offsets, perturbed
  parameters on the evaluation device, streamed weighted noise sums;
* :mod:`~evochi_torch.shaping`: fitness shaping and reward checks;
* :mod:`~evochi_torch.optim`: functional SGD/Adam and the full :func:`es_step`;
* :mod:`~evochi_torch.population`: one ``nn.Module`` evaluated for many members at once;
* :mod:`~evochi_torch.codec`: state <-> bytes (safetensors + allow-listed pickle), checkpoints.
"""

from .codec import (
    STATE_FORMAT,
    NoiseMismatchError,
    StateDecodeError,
    TorchESState,
    check_noise,
    decode_state,
    encode_state,
    initial_state,
    library_versions,
    load_checkpoint,
    load_policy,
    save_checkpoint,
)
from .config import ESConfig
from .noise import (
    NOISE_FORMAT,
    NoiseTable,
    default_table_size,
    epoch_offsets,
    member_offsets,
    noise_weighted_sum,
    perturb_members,
    perturbed_params,
)
from .optim import OptState, apply_update, es_gradient, es_step, init_optimizer_state
from .population import (
    ParamSpec,
    PopulationPolicy,
    flatten_params,
    is_plain_mlp,
    load_flat,
    num_params,
    param_layout,
    unflatten_params,
)
from .shaping import centered_rank, check_rewards, raw, shape_fitness, zscore

__all__ = [
    "NOISE_FORMAT",
    "STATE_FORMAT",
    "ESConfig",
    "NoiseMismatchError",
    "NoiseTable",
    "OptState",
    "ParamSpec",
    "PopulationPolicy",
    "StateDecodeError",
    "TorchESState",
    "apply_update",
    "centered_rank",
    "check_noise",
    "check_rewards",
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
    "load_checkpoint",
    "load_flat",
    "load_policy",
    "member_offsets",
    "noise_weighted_sum",
    "num_params",
    "param_layout",
    "perturb_members",
    "perturbed_params",
    "raw",
    "save_checkpoint",
    "shape_fitness",
    "unflatten_params",
    "zscore",
]

# --- worker (issue 3, TorchESWorker): the worker engineer appends its import/export here. ---
from .worker import TorchESWorker, TorchStateCodec

__all__ += ["TorchESWorker", "TorchStateCodec"]

# --- harness (issue 12): run directories, resume, loggers; `evochi_torch.train(...)`. ---
from .harness import RunConfig, RunResult, Trainer, train  # noqa: E402

__all__ += ["RunConfig", "RunResult", "Trainer", "train"]
