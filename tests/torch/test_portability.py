"""The update, the observation statistics and the MuJoCo evaluation episodes give the same bits
whatever code path the CPU, the BLAS or NumPy's SIMD dispatch takes, and the portable functions
are accurate."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evochi_torch import portable

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("update_digests.py")

# Each switch sends one library down another of its code paths on this same CPU, as another
# CPU generation or vendor would: MKL's portable kernels, torch's plain (non-SIMD) kernels,
# NumPy without its AVX-512 kernels (where the CPU has them), and other thread counts.
SWITCHES = {
    "mkl-compatible": {"MKL_CBWR": "COMPATIBLE"},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "numpy-no-avx512": {"NPY_DISABLE_CPU_FEATURES": "X86_V4,AVX512_ICL,AVX512_SPR"},
    "one-thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "three-threads": {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"},
}


def _digests(env: dict[str, str]) -> dict[str, str]:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    out = subprocess.run(
        [sys.executable, str(SCRIPT)], env=full, capture_output=True, text=True, timeout=300,
        check=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def baseline() -> dict[str, str]:
    return _digests({})


@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_updates_statistics_and_evaluation_episodes_give_the_same_bits_under(switch, baseline):
    got = _digests(SWITCHES[switch])
    differing = sorted(k for k in baseline if got.get(k) != baseline[k])
    assert not differing, f"{switch}: {differing} changed their bits"


def test_exp_and_log_are_accurate_and_saturate_like_libm():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(-700, 700, 20000), rng.normal(size=20000), [0.0, 1e-12]])
    want = np.array([math.exp(v) for v in x])
    assert np.max(np.abs(portable.exp(x) - want) / np.spacing(want)) <= 2
    y = np.concatenate([np.exp(rng.uniform(-700, 700, 20000)), rng.uniform(0.5, 2, 20000)])
    want = np.array([math.log(v) for v in y])
    err = np.abs(portable.log(y) - want) / np.spacing(np.maximum(np.abs(want), 1e-300))
    assert np.max(err[want != 0]) <= 4
    assert portable.log(1.0) == 0.0 and portable.exp(0.0) == 1.0
    specials = np.array([np.inf, -np.inf, np.nan, 800.0, -800.0])
    np.testing.assert_array_equal(portable.exp(specials), [np.inf, 0.0, np.nan, np.inf, 0.0])
    np.testing.assert_array_equal(
        portable.log(np.array([0.0, -1.0, np.inf, np.nan])), [-np.inf, np.nan, np.inf, np.nan]
    )


def test_tanh_is_accurate_odd_and_saturates():
    x = np.concatenate([np.linspace(-25, 25, 20001), [1e-300, 3e-5, 2.0**-13, 0.01, np.inf]])
    want = np.array([math.tanh(v) for v in x])
    got = portable.tanh(x)
    assert np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-300)) < 2.0**-39
    assert np.array_equal(portable.tanh(-x), -got)
    assert np.isnan(portable.tanh(np.nan)) and np.signbit(portable.tanh(-0.0))


def test_linear_rows_do_not_depend_on_the_batch_and_match_float64():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 4, 37)).astype(np.float32)
    w = rng.normal(size=(11, 37)).astype(np.float32)
    b = rng.normal(size=11).astype(np.float32)
    out = portable.linear(x, w, b)
    assert out.dtype == np.float32 and out.shape == (6, 4, 11)
    want = x.astype(np.float64) @ w.T.astype(np.float64) + b
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
    for i, j in ((0, 0), (5, 3), (2, 1)):
        assert np.array_equal(portable.linear(x[i, j : j + 1], w, b)[0], out[i, j])
    assert np.array_equal(portable.linear(x, w), portable.linear(x, w, np.zeros(11, np.float32)))


def test_sequential_runs_linear_tanh_relu_stacks_and_declines_the_rest():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(
        torch.nn.Linear(9, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
        torch.nn.Identity(), torch.nn.Linear(16, 3),
    )  # fmt: skip
    forward = portable.sequential(mlp)
    assert forward is not None
    x = np.random.default_rng(1).normal(size=(5, 9)).astype(np.float32)
    with torch.no_grad():
        want = mlp(torch.from_numpy(x)).numpy()
        out = forward(x)
        mlp[0].weight.add_(1.0)  # a copy was taken: later changes do not reach it
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    assert np.array_equal(forward(x), out)
    assert portable.sequential(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.GELU())) is None
    assert portable.sequential(torch.nn.Linear(3, 2)) is None


class Doubled(torch.nn.Sequential):
    def forward(self, x):
        return 2 * super().forward(x)


class Shifted(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x) + 100


def test_sequential_leaves_what_it_cannot_reproduce_to_torch():
    # Each of these computes something else than its layers' plain forward passes.
    assert portable.sequential(Doubled(torch.nn.Linear(3, 2))) is None
    assert portable.sequential(torch.nn.Sequential(Shifted(3, 2))) is None
    hooked = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh())
    handle = hooked[1].register_forward_hook(lambda module, inputs, out: out * 0)
    assert portable.sequential(hooked) is None
    handle.remove()
    assert portable.sequential(hooked) is not None
    assert portable.sequential(torch.nn.Sequential(torch.nn.Linear(3, 2).double())) is None


def test_linear_without_inputs_is_its_bias():
    out = portable.linear(np.zeros((4, 0), np.float32), np.zeros((2, 0), np.float32),
                          np.array([1.5, -2.0], np.float32))  # fmt: skip
    assert out.tolist() == [[1.5, -2.0]] * 4


def test_sqrt32_is_correctly_rounded():
    x = torch.rand(100_003, generator=torch.Generator().manual_seed(0)) * 50
    want = np.sqrt(x.numpy().astype(np.float64)).astype(np.float32)  # sqrt of a float32 in
    # float64, rounded once more, is the correctly rounded float32 root (53 >= 2 * 24 + 2)
    assert np.array_equal(portable.sqrt32(x).numpy(), want)


def test_norm_and_column_sums_are_exact_where_they_can_be():
    assert portable.norm(np.array([3.0, 4.0])) == 5.0
    x = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    want = math.sqrt(math.fsum((x.astype(np.float64) ** 2).tolist()))
    assert abs(portable.norm(torch.from_numpy(x)) - want) <= 4 * np.spacing(want)
    m = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.5]])
    np.testing.assert_array_equal(portable.column_sums(m), [9.0, 12.5])
    assert portable.column_sums(np.zeros((0, 3))).tolist() == [0.0, 0.0, 0.0]
    assert portable.powi(1.5, 3) == 1.5 * 1.5 * 1.5 and portable.powi(2.0, 0) == 1.0
