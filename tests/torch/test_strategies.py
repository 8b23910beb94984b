"""Each strategy's update against a plain float64 reference written from its paper's
equations (dense noise matrix), plus the seam's contracts: purity, per-parameter sigma in
perturbations, thread-count independence, option validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from threads import num_threads

from evochi_torch import ESConfig
from evochi_torch.functional import NoiseTable
from evochi_torch.noise import member_offsets, perturbed_params
from evochi_torch.strategies import STRATEGIES, ask, get_strategy

P = 23
NPOP = 12


def _setup(strategy: str, **kw):
    config = ESConfig(population_size=NPOP, strategy=strategy, sigma=0.3, seed=4,
                      noise_table_size=3000, **kw)  # fmt: skip
    params = torch.randn(P, generator=torch.Generator().manual_seed(2))
    table = NoiseTable.for_config(config, P)
    s = get_strategy(strategy)
    return config, params, table, s


def _noise(config, table, epoch):
    """Dense ``z [npop, P]`` (sign * window) in float64: what the reference uses."""
    offs, signs = member_offsets(config.seed, epoch, NPOP, P, table.size, config.antithetic)
    data = table.data.numpy().astype(np.float64)
    return np.stack([signs[i].item() * data[o : o + P] for i, o in enumerate(offs.tolist())])


def _evolve(s, config, params, table, epochs=3):
    """A few updates on a quadratic so that the state is not the initial one."""
    state = s.init(config, params)
    for e in range(epochs):
        pop = ask(config, params, state, e, table).double()
        rewards = -((pop - 0.5) ** 2).sum(-1).numpy()
        params, state = s.tell(config, params, state, rewards, e, table)
    return params, state


REWARDS = np.array([3.0, -1.0, 0.5, 2.5, -4.0, 1.5, 0.0, 7.0, -2.0, 2.0, 4.5, -0.5])


def _centered_rank(r):
    ranks = np.argsort(np.argsort(r))
    return ranks / (r.size - 1) - 0.5


def _nes_utilities(r):
    n = r.size
    raw = np.maximum(0, np.log(n / 2 + 1) - np.log(np.arange(1, n + 1)))
    u_by_rank = raw / raw.sum() - 1 / n
    u = np.empty(n)
    u[np.argsort(-r)] = u_by_rank
    return u


def _close(actual: torch.Tensor, expected: np.ndarray, rtol=2e-5, atol=1e-6):
    np.testing.assert_allclose(actual.double().numpy(), expected, rtol=rtol, atol=atol)


def test_pgpe_matches_reference():
    config, params, table, s = _setup("pgpe", learning_rate=0.05)
    params, state = _evolve(s, config, params, table)
    e = 3
    z = _noise(config, table, e)
    mu, sigma = params.double().numpy(), state["sigma"].double().numpy()
    w = _centered_rank(REWARDS)
    eps = z[0::2]  # pair k: +eps_k, -eps_k
    fplus, fminus = w[0::2], w[1::2]
    n = NPOP // 2
    grad_mu = ((fplus - fminus) / 2) @ (sigma * eps) / n
    # Averaged over the n directions, like grad_mu (pgpelib's compute_reinforce_update).
    grad_sigma = ((fplus + fminus) / 2) @ (((sigma * eps) ** 2 - sigma**2) / sigma) / n
    # ClipUp (Toklu et al. 2020)
    lr, max_speed, mom = 0.05, 0.1, 0.9
    vel = state["velocity"].double().numpy()
    vel = mom * vel + lr * grad_mu / np.linalg.norm(grad_mu)
    if np.linalg.norm(vel) > max_speed:
        vel = vel * max_speed / np.linalg.norm(vel)
    new_sigma = np.clip(sigma + 0.1 * grad_sigma, 0.8 * sigma, 1.2 * sigma)
    new_params, new_state = s.tell(config, params, state, REWARDS, e, table)
    _close(new_params, mu + vel)
    _close(new_state["sigma"], new_sigma)
    _close(new_state["velocity"], vel)


def test_snes_matches_reference():
    config, params, table, s = _setup("snes")
    params, state = _evolve(s, config, params, table)
    e = 3
    z = _noise(config, table, e)
    mu, sigma = params.double().numpy(), state["sigma"].double().numpy()
    u = _nes_utilities(REWARDS)
    eta_sigma = (3 + math.log(P)) / (5 * math.sqrt(P))
    new_mu = mu + 1.0 * sigma * (u @ z)
    new_sigma = sigma * np.exp(eta_sigma / 2 * (u @ (z * z - 1)))
    new_params, new_state = s.tell(config, params, state, REWARDS, e, table)
    _close(new_params, new_mu)
    _close(new_state["sigma"], new_sigma)


def test_sep_cma_matches_reference():
    config, params, table, s = _setup("sep_cma", antithetic=False)
    params, state = _evolve(s, config, params, table)
    e = 3
    z = _noise(config, table, e)
    n = P
    m = params.double().numpy()
    sigma = float(state["sigma"])
    C = state["C"].double().numpy()
    ps, pc = state["p_sigma"].double().numpy(), state["p_c"].double().numpy()
    g = int(state["generation"])
    # Ros and Hansen 2008 / Hansen's tutorial, written out.
    mu = NPOP // 2
    wr = np.log(mu + 0.5) - np.log(np.arange(1, mu + 1))
    w = wr / wr.sum()
    mueff = 1 / (w**2).sum()
    cs = (mueff + 2) / (n + mueff + 5)
    ds = 1 + 2 * max(0, math.sqrt((mueff - 1) / (n + 1)) - 1) + cs
    cc = (4 + mueff / n) / (n + 4 + 2 * mueff / n)
    c1 = 2 / ((n + 1.3) ** 2 + mueff) * (n + 2) / 3
    cmu = min(1 - c1, 2 * (mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff) * (n + 2) / 3)
    chi = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
    order = np.argsort(-REWARDS, kind="stable")[:mu]
    y = np.sqrt(C) * z[order]
    yw = w @ y
    new_m = m + sigma * yw
    ps = (1 - cs) * ps + math.sqrt(cs * (2 - cs) * mueff) * (yw / np.sqrt(C))
    hs = np.linalg.norm(ps) / math.sqrt(1 - (1 - cs) ** (2 * (g + 1))) / chi < 1.4 + 2 / (n + 1)
    pc = (1 - cc) * pc + hs * math.sqrt(cc * (2 - cc) * mueff) * yw
    C = (1 - c1 - cmu) * C + c1 * (pc**2 + (1 - hs) * cc * (2 - cc) * C) + cmu * (w @ (y * y))
    sigma = sigma * math.exp(cs / ds * (np.linalg.norm(ps) / chi - 1))
    new_params, new_state = s.tell(config, params, state, REWARDS, e, table)
    _close(new_params, new_m)
    _close(new_state["C"], C)
    _close(new_state["p_sigma"], ps)
    _close(new_state["p_c"], pc)
    assert float(new_state["sigma"]) == pytest.approx(sigma, rel=1e-6)
    assert int(new_state["generation"]) == g + 1


@pytest.mark.parametrize("b", [None, 3])
def test_ars_matches_reference(b):
    opts = {} if b is None else {"top_directions": b}
    config, params, table, s = _setup("ars", strategy_options=opts)
    params, state = _evolve(s, config, params, table)
    e = 3
    eps = _noise(config, table, e)[0::2]
    rp, rm = REWARDS[0::2], REWARDS[1::2]
    b = NPOP // 2 if b is None else b
    top = np.argsort(-np.maximum(rp, rm), kind="stable")[:b]
    sigma_r = np.concatenate([rp[top], rm[top]]).std()
    step = 0.02 / (b * sigma_r) * ((rp[top] - rm[top]) @ eps[top])
    new_params, _ = s.tell(config, params, state, REWARDS, e, table)
    _close(new_params, params.double().numpy() + step)


def test_cem_matches_reference():
    config, params, table, s = _setup("cem", antithetic=False)
    params, state = _evolve(s, config, params, table)
    e = 3
    z = _noise(config, table, e)
    m, std = params.double().numpy(), state["std"].double().numpy()
    x = m + std * z
    elite = x[np.argsort(-REWARDS, kind="stable")[: NPOP // 2]]
    new_m = elite.mean(0)
    new_std = 0.3 * std + 0.7 * elite.std(0)
    new_params, new_state = s.tell(config, params, state, REWARDS, e, table)
    _close(new_params, new_m, atol=1e-5)
    _close(new_state["std"], new_std, atol=1e-5)


def test_openai_es_matches_reference_with_sgd():
    config, params, table, s = _setup("openai_es", optimizer="sgd", momentum=0.0,
                                      learning_rate=0.1)  # fmt: skip
    z = _noise(config, table, 0)
    state = s.init(config, params)
    grad = _centered_rank(REWARDS) @ z / (NPOP * 0.3)
    new_params, _ = s.tell(config, params, state, REWARDS, 0, table)
    _close(new_params, params.double().numpy() + 0.1 * grad)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_update_is_pure_and_thread_count_independent(name):
    antithetic = name in ("pgpe", "ars", "openai_es")
    config, _, _, s = _setup(name, antithetic=antithetic)
    p = 40_000  # large enough for torch to split elementwise kernels over threads
    params = torch.randn(p, generator=torch.Generator().manual_seed(0))
    table = NoiseTable.for_params(config.seed, p, 200_000)
    config = config.replace(noise_table_size=200_000)
    state = s.init(config, params)
    before = {k: v.clone() for k, v in state.items()}
    results = []
    for threads in (1, 2, 3):
        with num_threads(threads):
            out = s.tell(config, params, state, REWARDS, 5, table)
            out = s.tell(config, out[0], out[1], REWARDS[::-1].copy(), 6, table)
        results.append(out)
    for k, v in before.items():
        assert torch.equal(state[k], v), f"update modified its input {k}"
    for other in results[1:]:
        assert torch.equal(other[0], results[0][0])
        for k in results[0][1]:
            assert torch.equal(other[1][k], results[0][1][k]), k


@pytest.mark.parametrize("name", ["pgpe", "snes", "sep_cma", "cem"])
def test_members_use_the_per_parameter_scale(name):
    config, params, table, s = _setup(name)
    params, state = _evolve(s, config, params, table)
    scale = s.scale(config, state)
    assert isinstance(scale, torch.Tensor) and scale.shape == (P,)
    assert not torch.allclose(scale, torch.full((P,), 0.3))  # adapted, no longer uniform
    z = _noise(config, table, 7)
    offs, signs = member_offsets(config.seed, 7, NPOP, P, table.size, config.antithetic)
    rows = perturbed_params(params, table, offs, signs, scale, [1, 4, 9])
    _close(rows, params.double().numpy() + scale.double().numpy() * z[[1, 4, 9]], rtol=1e-6)


def test_strategy_options_are_validated_with_the_valid_names():
    with pytest.raises(ValueError, match="stdev_learning_rate"):
        ESConfig(population_size=4, strategy="pgpe", strategy_options={"lr": 1})
    with pytest.raises(ValueError, match="elite_fraction"):
        ESConfig(population_size=4, strategy="cem", strategy_options={"elite_fraction": 2.0})
    with pytest.raises(ValueError, match="antithetic"):
        ESConfig(population_size=5, strategy="ars", antithetic=False)
    with pytest.raises(ValueError, match="top_directions"):
        ESConfig(population_size=4, strategy="ars", strategy_options={"top_directions": 3})
    cfg = ESConfig(population_size=4, strategy="pgpe")
    assert (cfg.lr, cfg.shaping) == (0.15, "centered_rank")
    assert get_strategy("pgpe").make_optimizer(cfg).name == "clipup"


def test_noise_sums_read_cached_squares_with_the_bits_of_squaring_each_window():
    """The squared table is a cache: the sums equal squaring each window in the loop."""
    from evochi_torch.strategies.base import noise_sums

    config, _, table, _ = _setup("snes")
    assert torch.equal(table.squared, table.data * table.data)
    offs, signs = member_offsets(config.seed, 5, NPOP, P, table.size, config.antithetic)
    lin = np.linspace(-1.0, 1.0, NPOP)
    sq = np.linspace(0.5, -0.25, NPOP)
    s_lin, s_sq = noise_sums(table, offs, signs, P, lin, sq)
    c_sq: dict[int, float] = {}
    for i, o in enumerate(offs.tolist()):
        c_sq[o] = c_sq.get(o, 0.0) + float(sq[i])
    expected = torch.zeros(P)
    for o, c in c_sq.items():
        window = table.data[o : o + P]
        expected.add_((window * window).mul_(float(np.float32(c))))
    assert torch.equal(s_sq, expected)
    z = _noise(config, table, 5)
    _close(s_lin, lin @ z)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_ask_gives_the_offsets_and_scale_that_tell_assumes(name):
    config, params, table, s = _setup(name)
    state = s.init(config, params)
    offsets, signs, scale = s.ask(config, state, 3, P, table)
    want_offsets, want_signs = s.offsets(config, 3, P, table)
    assert torch.equal(offsets, want_offsets) and torch.equal(signs, want_signs)
    want_scale = s.scale(config, state)
    if isinstance(want_scale, torch.Tensor):
        assert torch.equal(scale, want_scale)
    else:
        assert scale == want_scale


def test_the_deprecated_update_is_tell_with_config_last():
    config, params, table, s = _setup("snes")
    state = s.init(config, params)
    want = s.tell(config, params, state, REWARDS, 1, table)
    with pytest.deprecated_call():
        got = s.update(params, state, REWARDS, 1, table, config)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1]["sigma"], want[1]["sigma"])


def test_a_strategy_written_against_update_still_tells():
    from evochi_torch.strategies import Strategy

    class Legacy(Strategy):
        name = "legacy_test"

        def init(self, config, params):
            return {}

        def update(self, params, state, rewards, epoch, table, config):
            return params + float(np.sum(rewards)), state

    config, params, table, _ = _setup("openai_es")
    new, _ = Legacy().tell(config, params, {}, np.ones(NPOP), 0, table)
    assert torch.equal(new, params + NPOP)


def test_config_reads_defaults_from_the_registry():
    from evochi_torch import registry

    assert registry.STRATEGIES is STRATEGIES
    assert (
        ESConfig(population_size=4, strategy="pgpe").lr
        == registry.lookup("pgpe").default_learning_rate
    )
    with pytest.raises(ValueError, match="known strategies"):
        registry.lookup("nope")
