"""Writes the legacy-state fixtures of tests/torch/test_legacy_states.py.

Run ONCE with code of the OpenAI-ES-only format (commit 9ca776b: OpenAI-ES hard-wired,
``ESConfig.device``); its outputs are committed next to it:

* ``legacy_state_adam.safetensors``: an encoded state (epoch 3, Adam moments non-zero),
* ``legacy_checkpoint_sgd.safetensors``: a checkpoint (epoch 2, SGD momentum buffer),
* ``legacy_next_<name>.safetensors``: each of them after one update with
  :data:`REWARDS` (the bits that code produced),
* ``legacy_rewards.json``: the reward vector.

The current code must load the first two and continue them as test_legacy_states.py
states.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from evochi_torch import ESConfig, save_checkpoint
from evochi_torch.codec import encode_state, initial_state
from evochi_torch.functional import NoiseTable

HERE = Path(__file__).parent
P = 57
NPOP = 10
REWARDS = [0.5, -1.25, 3.0, 3.0, 0.0, 7.5, -2.0, 1.0, 0.25, 4.0]


def _state(config: ESConfig, epochs: int):
    params = torch.randn(P, generator=torch.Generator().manual_seed(7))
    table = NoiseTable.for_config(config, P)
    state = initial_state(params, config, table, extra={"note": "legacy"})
    rng = np.random.default_rng(3)
    for _ in range(epochs):
        state = state.advance(rng.normal(size=NPOP), table)
    return state, table


def main() -> None:
    adam = ESConfig(
        population_size=NPOP,
        sigma=0.05,
        learning_rate=0.02,
        seed=11,
        noise_table_size=5000,
        weight_decay=0.01,
    )
    sgd = ESConfig(
        population_size=NPOP,
        sigma=0.1,
        learning_rate=0.03,
        optimizer="sgd",
        momentum=0.8,
        fitness_shaping="zscore",
        seed=5,
        noise_table_size=4000,
    )
    for name, config, epochs, writer in (
        ("legacy_state_adam", adam, 3, "state"),
        ("legacy_checkpoint_sgd", sgd, 2, "checkpoint"),
    ):
        state, table = _state(config, epochs)
        if writer == "state":
            (HERE / f"{name}.safetensors").write_bytes(encode_state(state))
        else:
            save_checkpoint(HERE / f"{name}.safetensors", state)
        nxt = state.advance(np.asarray(REWARDS), table)
        (HERE / f"legacy_next_{name}.safetensors").write_bytes(encode_state(nxt))
    (HERE / "legacy_rewards.json").write_text(json.dumps(REWARDS) + "\n")


if __name__ == "__main__":
    main()
