"""The public surface: each ``__all__`` names what a user calls, the rest stays importable
from its home module (with a DeprecationWarning where it used to be looked up elsewhere), one
error hierarchy, and every list of strategy names agrees with the registry."""

from __future__ import annotations

import argparse
import ast
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import evochi_torch
from evochi.v1.errors import EvochiError
from evochi.v1.errors import StateDecodeError as V1StateDecodeError
from evochi_torch import functional, noise, optim, registry, strategies


def test_top_level_exports_about_a_dozen_user_facing_names():
    assert 10 <= len(evochi_torch.__all__) <= 16
    for name in evochi_torch.__all__:
        assert getattr(evochi_torch, name) is not None
    assert {"TorchESWorker", "ESConfig", "get_strategy", "ClipUp", "load_policy"} <= set(
        evochi_torch.__all__
    )


@pytest.mark.parametrize("module", [evochi_torch, functional, noise, optim, strategies])
def test_every_name_in_all_resolves(module):
    assert len(set(module.__all__)) == len(module.__all__)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing in __all__ is a deprecated lookup
        for name in module.__all__:
            assert getattr(module, name) is not None, name


def test_functional_holds_the_maths_and_not_serialisation():
    assert not {"decode_state", "encode_state", "initial_state", "es_step"} & set(
        functional.__all__
    )
    assert not {"norm64", "OptState"} & set(optim.__all__)


@pytest.mark.parametrize(
    ("module", "name", "home"),
    [
        (evochi_torch, "es_step", "evochi_torch.functional"),
        (evochi_torch, "NoiseTable", "evochi_torch.functional"),
        (evochi_torch, "shape_fitness", "evochi_torch.functional"),
        (evochi_torch, "load_flat", "evochi_torch.functional"),
        (evochi_torch, "decode_state", "evochi_torch.codec"),
        (evochi_torch, "register_strategy", "evochi_torch.strategies"),
        (functional, "decode_state", "evochi_torch.codec"),
        (functional, "check_rewards", "evochi_torch.shaping"),
    ],
)
def test_names_off_a_face_still_resolve_to_their_home_with_a_warning(module, name, home):
    import importlib

    with pytest.warns(DeprecationWarning, match=home):
        found = getattr(module, name)
    assert found is getattr(importlib.import_module(home), name)


def test_unknown_names_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = evochi_torch.nope
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = functional.nope


def test_one_train_per_layer():
    from evochi_torch import harness, launch

    assert evochi_torch.train is harness.train  # sync, a run directory, returns RunResult
    with pytest.warns(DeprecationWarning, match="train_processes"):
        assert launch.train is launch.train_processes


def test_adopt_state_sets_the_state_and_calls_the_hook():
    from evochi.v1 import Worker

    seen = []

    class Offline(Worker):
        def initialize(self):
            return "s0"

        def evaluate(self, epoch, slices):
            return []

        def optimize(self, epoch, rewards):
            return "s1"

        def on_state_change(self, state):
            seen.append(state)

    worker = Offline("127.0.0.1:0", 1)
    with pytest.raises(RuntimeError, match="no state"):
        _ = worker.state
    worker.adopt_state(worker.initialize())
    assert worker.state == "s0" and seen == ["s0"]


def test_one_error_hierarchy():
    assert issubclass(evochi_torch.StateDecodeError, V1StateDecodeError)
    assert issubclass(evochi_torch.StateDecodeError, ValueError)
    assert issubclass(evochi_torch.NoiseMismatchError, EvochiError)
    with pytest.raises(V1StateDecodeError):
        evochi_torch.codec.decode_state(b"not a state at all")


def test_device_is_a_worker_setting_not_a_config_field():
    with pytest.raises(TypeError, match="device"):
        evochi_torch.ESConfig(population_size=4, device="cpu")
    assert "device" not in evochi_torch.ESConfig(population_size=4).to_dict()


def test_clipup_matches_float64_reference_including_the_speed_limit():
    from evochi_torch.functional import clipup_step

    g = torch.Generator().manual_seed(0)
    theta = torch.randn(31, generator=g)
    grads = [torch.randn(31, generator=g) * s for s in (1.0, 5.0, 0.1, 2.0)]
    opt = evochi_torch.ClipUp(lr=0.2, max_speed=0.3, momentum=0.9)
    state = opt.init(31)
    ref_theta, vel = theta.double().numpy(), np.zeros(31)
    clipped = 0
    for grad in grads:
        theta, state = opt.step(theta, grad, state)
        gd = grad.double().numpy()
        vel = 0.9 * vel + 0.2 * gd / np.linalg.norm(gd)
        if np.linalg.norm(vel) > 0.3:
            vel *= 0.3 / np.linalg.norm(vel)
            clipped += 1
        ref_theta = ref_theta + vel
    assert clipped >= 1  # the limit was exercised
    np.testing.assert_allclose(theta.double().numpy(), ref_theta, rtol=1e-5, atol=1e-6)
    again, _ = clipup_step(torch.zeros(31), grads[0], opt.init(31), lr=0.2)
    assert float(again.norm()) == pytest.approx(0.2, rel=1e-5)  # default max_speed 2*lr


# --- every list of strategy names is the registry's -------------------------------------

ROOT = Path(__file__).resolve().parents[2]
# The strategies this package registers (a test may register its own besides).
BUILT_IN = [
    name
    for name, strategy in registry.STRATEGIES.items()
    if type(strategy).__module__.startswith("evochi_torch.strategies.")
]


def test_the_registry_is_the_strategies_table():
    assert strategies.STRATEGIES is registry.STRATEGIES
    assert set(BUILT_IN) >= {"openai_es", "pgpe"}


def test_cli_strategy_choices_are_the_registry():
    from evochi_torch.__main__ import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("train", "worker"):
        flag = next(a for a in sub.choices[command]._actions if "--strategy" in a.option_strings)
        assert sorted(flag.choices) == sorted(registry.STRATEGIES), command


def _strategies_table() -> dict[str, dict[str, str]]:
    """docs/strategies.md's table whose first column is ``strategy``: name -> row by header."""
    lines = (ROOT / "docs" / "strategies.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| strategy | reference"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = dict(zip(header, cells, strict=True))
    return rows


def test_docs_strategies_table_lists_every_registered_strategy_with_its_defaults():
    table = _strategies_table()
    assert list(table) == BUILT_IN
    for name, row in table.items():
        strategy = registry.STRATEGIES[name]
        lr = float(re.match(r"[0-9.]+", row["`learning_rate` default"]).group())
        assert lr == strategy.default_learning_rate, name
        assert re.match(r"`(\w+)`", row["shaping default"]).group(1) == strategy.default_shaping
        optimizer = re.match(r"`(\w+)`", row["optimizer default"])
        assert (optimizer and optimizer.group(1)) == (strategy.default_optimizer or None), name


def test_mujoco_example_covers_every_registered_strategy():
    tree = ast.parse((ROOT / "examples" / "mujoco" / "mujoco.py").read_text())
    assigned = {
        node.targets[0].id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }
    assert list(ast.literal_eval(assigned["STRATEGIES"])) == BUILT_IN


def test_config_optimizer_names_are_the_optimizers():
    from evochi_torch import config

    assert tuple(config._OPTIMIZERS) == tuple(optim.OPTIMIZERS)
    for strategy in registry.STRATEGIES.values():
        assert strategy.default_optimizer in (None, *optim.OPTIMIZERS), strategy.name
