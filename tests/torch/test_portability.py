"""The update and the observation statistics give the same bits whatever code path the CPU,
the BLAS or NumPy's SIMD dispatch takes, and the portable functions are accurate."""

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
def test_every_strategy_and_the_obs_stats_give_the_same_bits_under(switch, baseline):
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
