"""States and checkpoints of the OpenAI-ES-only format (no strategy, ``ESConfig.device``)
still load and continue (fixtures: tests/torch/data/make_legacy_fixtures.py, run on code of
that format)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from evochi_torch import ESConfig, load_checkpoint
from evochi_torch.codec import decode_state
from evochi_torch.functional import NoiseTable, es_gradient

DATA = Path(__file__).parent / "data"
REWARDS = np.asarray(json.loads((DATA / "legacy_rewards.json").read_text()))


def _load(name: str):
    path = DATA / f"{name}.safetensors"
    state = load_checkpoint(path) if "checkpoint" in name else decode_state(path.read_bytes())
    expected = decode_state((DATA / f"legacy_next_{name}.safetensors").read_bytes())
    return state, expected


@pytest.mark.parametrize("name", ["legacy_state_adam", "legacy_checkpoint_sgd"])
def test_legacy_state_loads_and_continues(name):
    state, expected = _load(name)
    assert state.config.strategy == "openai_es"
    assert not hasattr(state.config, "device") or "device" not in state.config.to_dict()
    assert state.extra == {"note": "legacy"}
    table = NoiseTable.for_config(state.config, state.params.numel())
    nxt = state.advance(REWARDS, table)
    assert nxt.epoch == expected.epoch == state.epoch + 1
    assert nxt.opt_state.keys() == expected.opt_state.keys()
    for key in expected.opt_state:
        assert torch.equal(nxt.opt_state[key], expected.opt_state[key]), key
    if name == "legacy_checkpoint_sgd":
        assert torch.equal(nxt.params, expected.params)
    else:
        # The recording took Adam's square roots from torch, i.e. from MKL's vector math (not
        # correctly rounded, per CPU); the update now rounds them correctly, which moves the
        # recorded center by a couple of ulp and the moments not at all.
        ulps = nxt.params.view(torch.int32).long() - expected.params.view(torch.int32).long()
        assert int(ulps.abs().max()) <= 2


def test_adam_step_is_the_correctly_rounded_scalar_formula():
    """The array update equals Adam written one float32 IEEE operation at a time: no fused,
    approximate or CPU-dispatched kernel can hide in it."""
    state, _ = _load("legacy_state_adam")
    cfg = state.config
    table = NoiseTable.for_config(cfg, state.params.numel())
    nxt = state.advance(REWARDS, table)
    grad = es_gradient(REWARDS, state.epoch, table, cfg, state.params.numel()).numpy()
    f = np.float32
    b1, b2 = cfg.betas
    t = int(state.opt_state["step"]) + 1
    bias1, bias2 = 1.0 - b1**t, 1.0 - b2**t
    for i in range(state.params.numel()):
        g = f(grad[i])
        m = f(state.opt_state["exp_avg"][i]) * f(b1) + g * f(1.0 - b1)
        v = f(state.opt_state["exp_avg_sq"][i]) * f(b2) + (g * g) * f(1.0 - b2)
        denom = np.sqrt(v) / f(math.sqrt(bias2)) + f(cfg.eps)
        update = (m / denom) * f(cfg.lr / bias1)
        want = f(state.params[i]) * f(1.0 - cfg.lr * cfg.weight_decay) + update
        assert (m, v) == (nxt.opt_state["exp_avg"][i], nxt.opt_state["exp_avg_sq"][i])
        assert want.view(np.int32) == nxt.params[i].numpy().view(np.int32), i


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
