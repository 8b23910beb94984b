"""The pure ES maths of evochi_torch, in one namespace (no networking, no global state besides
a per-process noise-table cache). Everything here is a function of its arguments, so it can
be tested and reused alone, the way ``torch.nn.functional`` sits beside ``torch.nn``:

* noise: :class:`NoiseTable`, :func:`member_offsets`, :func:`perturbed_params`,
  :func:`noise_weighted_sum`, :func:`noise_sums`;
* fitness shaping: :func:`shape_fitness` and :func:`centered_rank`, :func:`zscore`,
  :func:`raw`, :func:`nes_utilities`; :func:`check_rewards`;
* center optimizers: :func:`adam_step`, :func:`sgd_step`, :func:`clipup_step`;
* OpenAI-ES: :func:`es_gradient`, :func:`es_step` (any strategy's update for its config);
* strategies' ask/tell for small problems: :func:`ask`, :func:`tell`;
* parameters: :func:`flatten_params`, :func:`load_flat`, :func:`unflatten_params`...;
* state: :func:`initial_state`, :func:`encode_state`, :func:`decode_state`, :func:`check_noise`.
"""

from __future__ import annotations

from .codec import (
    STATE_FORMAT,
    check_noise,
    decode_state,
    encode_state,
    initial_state,
    library_versions,
)
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
from .optim import (
    OptState,
    adam_step,
    apply_update,
    clipup_step,
    es_gradient,
    es_step,
    init_optimizer_state,
    make_optimizer,
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
from .strategies import ask, noise_sums, tell

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
