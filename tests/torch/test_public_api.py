"""The curated top level, the functional namespace, one error hierarchy, device off ESConfig,
and ClipUp against a float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import evochi_torch
from evochi.v1.errors import EvochiError
from evochi.v1.errors import StateDecodeError as V1StateDecodeError


def test_top_level_exports_about_a_dozen_user_facing_names():
    assert 10 <= len(evochi_torch.__all__) <= 16
    for name in evochi_torch.__all__:
        assert getattr(evochi_torch, name) is not None
    assert {"TorchESWorker", "ESConfig", "get_strategy", "ClipUp", "load_policy"} <= set(
        evochi_torch.__all__
    )


def test_pre_curation_names_still_resolve_to_their_functional_home():
    from evochi_torch import functional

    for name in ("es_step", "NoiseTable", "shape_fitness", "decode_state", "load_flat"):
        assert getattr(evochi_torch, name) is getattr(functional, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = evochi_torch.nope


def test_one_error_hierarchy():
    assert issubclass(evochi_torch.StateDecodeError, V1StateDecodeError)
    assert issubclass(evochi_torch.StateDecodeError, ValueError)
    assert issubclass(evochi_torch.NoiseMismatchError, EvochiError)
    with pytest.raises(V1StateDecodeError):
        evochi_torch.functional.decode_state(b"not a state at all")


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
