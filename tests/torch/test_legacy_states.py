"""States and checkpoints written by the release before the strategy seam still load, and
continue bit for bit (fixtures: tests/torch/data/make_legacy_fixtures.py, run on that code)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evochi_torch import ESConfig, NoiseTable, decode_state, load_checkpoint

DATA = Path(__file__).parent / "data"
REWARDS = np.asarray(json.loads((DATA / "legacy_rewards.json").read_text()))


@pytest.mark.parametrize("name", ["legacy_state_adam", "legacy_checkpoint_sgd"])
def test_legacy_state_loads_and_its_next_step_is_bit_identical(name):
    path = DATA / f"{name}.safetensors"
    state = load_checkpoint(path) if "checkpoint" in name else decode_state(path.read_bytes())
    assert state.config.strategy == "openai_es"
    assert not hasattr(state.config, "device") or "device" not in state.config.to_dict()
    assert state.extra == {"note": "legacy"}
    expected = decode_state((DATA / f"legacy_next_{name}.safetensors").read_bytes())
    table = NoiseTable.for_config(state.config, state.params.numel())
    nxt = state.advance(REWARDS, table)
    assert nxt.epoch == expected.epoch == state.epoch + 1
    assert torch.equal(nxt.params, expected.params)
    assert nxt.opt_state.keys() == expected.opt_state.keys()
    for key in expected.opt_state:
        assert torch.equal(nxt.opt_state[key], expected.opt_state[key]), key


def test_legacy_config_gets_the_defaults_that_reproduce_it():
    state = decode_state((DATA / "legacy_state_adam.safetensors").read_bytes())
    cfg = state.config
    assert isinstance(cfg, ESConfig)
    assert (cfg.optimizer, cfg.fitness_shaping, cfg.learning_rate) == (
        "adam",
        "centered_rank",
        0.02,
    )
    assert cfg.strategy_options == {}
