import random

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from evochi_torch.functional import centered_rank, raw, shape_fitness, zscore
from evochi_torch.shaping import check_rewards

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


def test_centered_rank_known_values():
    np.testing.assert_array_equal(centered_rank([3.0, 1.0, 2.0]), [0.5, -0.5, 0.0])
    np.testing.assert_array_equal(
        centered_rank([10.0, -5.0, 0.0, 7.0, 1.0]), [0.5, -0.5, -0.25, 0.25, 0.0]
    )


def test_centered_rank_ties_share_the_average_rank():
    out = centered_rank([1.0, 2.0, 1.0, 2.0])
    # ranks: 1s -> (0+1)/2 = 0.5, 2s -> (2+3)/2 = 2.5; / 3 - 0.5
    np.testing.assert_allclose(out, [-1 / 3, 1 / 3, -1 / 3, 1 / 3])
    np.testing.assert_array_equal(centered_rank([4.0, 4.0, 4.0]), [0.0, 0.0, 0.0])


def test_degenerate_sizes():
    assert centered_rank([5.0]).tolist() == [0.0]
    assert centered_rank([]).size == 0
    assert zscore([5.0]).tolist() == [0.0]


@settings(max_examples=60, deadline=None)
@given(st.lists(finite, min_size=2, max_size=40), st.randoms(use_true_random=False))
@example([1e6, 999999.9999999999], random.Random(0))  # found by CI: arctan merges them
@example([0.0, 5e-324], random.Random(0))
def test_centered_rank_properties(values, rnd):
    r = np.array(values)
    out = centered_rank(r)
    assert out.dtype == np.float64
    assert out.min() >= -0.5 and out.max() <= 0.5
    assert abs(out.sum()) < 1e-9
    # Order preserving, equal rewards get equal weights.
    for i in range(len(r)):
        for j in range(len(r)):
            if r[i] < r[j]:
                assert out[i] < out[j]
            if r[i] == r[j]:
                assert out[i] == out[j]
    # Permutation equivariant and invariant to strictly increasing transforms.
    perm = list(range(len(r)))
    rnd.shuffle(perm)
    np.testing.assert_array_equal(centered_rank(r[perm]), out[perm])
    # Strictly increasing on the reals is not strictly increasing in float64: arctan is flat
    # far from 0 (1e6 and its neighbour meet), rounding merges 0 and 5e-324. Only transforms
    # that keep distinct rewards distinct count.
    for transformed in (np.arctan(r / 1e3), r * 0.5 - 7.0):
        if np.unique(transformed).size == np.unique(r).size:
            np.testing.assert_array_equal(centered_rank(transformed), out)


def test_zscore_standardises():
    r = np.random.default_rng(0).normal(3.0, 5.0, size=101)
    z = zscore(r)
    assert abs(z.mean()) < 1e-12
    assert abs(z.std() - 1.0) < 1e-12
    np.testing.assert_allclose(z, (r - r.mean()) / r.std(), rtol=1e-12)
    assert zscore([2.0, 2.0, 2.0]).tolist() == [0.0, 0.0, 0.0]


def test_raw_is_a_float64_copy():
    r = np.array([1, 2, 3], dtype=np.int32)
    out = raw(r)
    assert out.dtype == np.float64
    out[0] = 100
    assert r[0] == 1


def test_shape_fitness_dispatch_and_errors():
    r = [1.0, 5.0, 2.0, 3.0]
    np.testing.assert_array_equal(shape_fitness(r), centered_rank(r))
    np.testing.assert_array_equal(shape_fitness(r, "zscore"), zscore(r))
    np.testing.assert_array_equal(shape_fitness(r, "raw"), raw(r))
    with pytest.raises(ValueError, match="unknown fitness shaping"):
        shape_fitness(r, "ranked")
    with pytest.raises(ValueError, match="non-finite"):
        shape_fitness([1.0, float("nan")])


def test_check_rewards_names_offending_members():
    with pytest.raises(ValueError) as info:
        check_rewards([1.0, float("nan"), 2.0, float("-inf")], members=[10, 11, 12, 13])
    msg = str(info.value)
    assert "member 11" in msg and "member 13" in msg
    assert "member 10" not in msg and "member 12" not in msg
    assert "nan_penalty" in msg


def test_check_rewards_penalty_replaces_and_passes_finite_through():
    out = check_rewards([1.0, float("nan"), float("inf")], members=range(3), nan_penalty=-100.0)
    assert out.tolist() == [1.0, -100.0, -100.0]
    ok = np.array([1.0, 2.0])
    assert check_rewards(ok).tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="2 rewards for 3 members"):
        check_rewards([1.0, 2.0], members=[0, 1, 2])
