import numpy as np
import pytest
import torch
from threads import num_threads

from evochi_torch import ESConfig
from evochi_torch.functional import (
    NoiseTable,
    apply_update,
    es_gradient,
    init_optimizer_state,
    member_offsets,
    perturbed_params,
    shape_fitness,
    tell,
)


def _grads(p: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p, generator=g) for _ in range(steps)]


def test_init_state_layout():
    adam = init_optimizer_state(ESConfig(population_size=2), 5)
    assert set(adam) == {"step", "exp_avg", "exp_avg_sq"}
    assert adam["step"].dtype == torch.int64 and adam["step"].dim() == 0
    sgd = init_optimizer_state(ESConfig(population_size=2, optimizer="sgd"), 5)
    assert set(sgd) == {"step", "momentum_buffer"}
    assert sgd["momentum_buffer"].shape == (5,) and sgd["momentum_buffer"].dtype == torch.float32


def _numpy_adam(theta, grads, lr, b1, b2, eps, wd):
    theta = theta.astype(np.float64)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat = m / (1 - b1**t)
        vhat = v / (1 - b2**t)
        theta = theta * (1 - lr * wd) + lr * mhat / (np.sqrt(vhat) + eps)
    return theta


def _numpy_sgd(theta, grads, lr, mom, wd):
    theta = theta.astype(np.float64)
    buf = np.zeros_like(theta)
    for g in grads:
        buf = mom * buf + g
        theta = theta * (1 - lr * wd) + lr * buf
    return theta


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adam_matches_float64_reference(wd):
    cfg = ESConfig(population_size=2, learning_rate=0.05, betas=(0.8, 0.95), weight_decay=wd)
    p = 37
    theta0 = torch.randn(p, generator=torch.Generator().manual_seed(1))
    grads = _grads(p, 6)
    theta, state = theta0, init_optimizer_state(cfg, p)
    for g in grads:
        theta, state = apply_update(theta, g, state, cfg)
    assert int(state["step"]) == 6
    expected = _numpy_adam(
        theta0.numpy(), [g.double().numpy() for g in grads], 0.05, 0.8, 0.95, 1e-8, wd
    )
    np.testing.assert_allclose(theta.numpy(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_sgd_matches_float64_reference(wd):
    cfg = ESConfig(
        population_size=2, optimizer="sgd", learning_rate=0.1, momentum=0.7, weight_decay=wd
    )
    p = 23
    theta0 = torch.randn(p, generator=torch.Generator().manual_seed(2))
    grads = _grads(p, 5, seed=3)
    theta, state = theta0, init_optimizer_state(cfg, p)
    for g in grads:
        theta, state = apply_update(theta, g, state, cfg)
    expected = _numpy_sgd(theta0.numpy(), [g.double().numpy() for g in grads], 0.1, 0.7, wd)
    np.testing.assert_allclose(theta.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_adam_agrees_with_torch_optim_adamw_maximize():
    cfg = ESConfig(population_size=2, learning_rate=0.01, weight_decay=0.05)
    p = 19
    theta0 = torch.randn(p, generator=torch.Generator().manual_seed(4))
    grads = _grads(p, 4, seed=5)
    ref = torch.nn.Parameter(theta0.clone())
    opt = torch.optim.AdamW([ref], lr=0.01, weight_decay=0.05, maximize=True, foreach=False)
    theta, state = theta0, init_optimizer_state(cfg, p)
    for g in grads:
        ref.grad = g.clone()
        opt.step()
        theta, state = apply_update(theta, g, state, cfg)
    torch.testing.assert_close(theta, ref.detach(), rtol=1e-5, atol=1e-6)


def test_sgd_agrees_with_torch_optim_sgd_maximize():
    cfg = ESConfig(population_size=2, optimizer="sgd", learning_rate=0.05, momentum=0.9)
    p = 11
    theta0 = torch.randn(p, generator=torch.Generator().manual_seed(6))
    ref = torch.nn.Parameter(theta0.clone())
    opt = torch.optim.SGD([ref], lr=0.05, momentum=0.9, maximize=True, foreach=False)
    theta, state = theta0, init_optimizer_state(cfg, p)
    for g in _grads(p, 4, seed=7):
        ref.grad = g.clone()
        opt.step()
        theta, state = apply_update(theta, g, state, cfg)
    torch.testing.assert_close(theta, ref.detach(), rtol=1e-5, atol=1e-6)


def test_first_adam_step_is_lr_times_sign():
    # Hand-computed: after one step m_hat = g, v_hat = g^2, so the step is lr * g / (|g| + eps).
    cfg = ESConfig(population_size=2, learning_rate=0.5)
    g = torch.tensor([2.0, -3.0, 0.25])
    theta, _ = apply_update(torch.zeros(3), g, init_optimizer_state(cfg, 3), cfg)
    torch.testing.assert_close(theta, torch.tensor([0.5, -0.5, 0.5]))


def test_decoupled_weight_decay_with_zero_gradient_is_exact():
    cfg = ESConfig(population_size=2, learning_rate=0.1, weight_decay=0.5)
    theta0 = torch.tensor([1.0, -2.0, 4.0])
    theta, _ = apply_update(theta0, torch.zeros(3), init_optimizer_state(cfg, 3), cfg)
    assert torch.equal(theta, theta0 * np.float32(0.95))


def test_inputs_are_not_mutated():
    cfg = ESConfig(population_size=2)
    theta = torch.ones(4)
    state = init_optimizer_state(cfg, 4)
    snapshot = {k: v.clone() for k, v in state.items()}
    new_theta, new_state = apply_update(theta, torch.ones(4), state, cfg)
    assert torch.equal(theta, torch.ones(4))
    for k, v in state.items():
        assert torch.equal(v, snapshot[k])
    assert not torch.equal(new_theta, theta)
    assert int(new_state["step"]) == 1


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_update_bit_identical_across_thread_counts(optimizer):
    cfg = ESConfig(population_size=2, optimizer=optimizer, weight_decay=0.01)
    p = 100_003
    theta0 = torch.randn(p, generator=torch.Generator().manual_seed(8))
    grads = _grads(p, 3, seed=9)
    results = []
    for n in (1, 2):
        with num_threads(n):
            theta, state = theta0, init_optimizer_state(cfg, p)
            for g in grads:
                theta, state = apply_update(theta, g, state, cfg)
            results.append((theta, state))
    (t1, s1), (t2, s2) = results
    assert torch.equal(t1, t2)
    for k in s1:
        assert torch.equal(s1[k], s2[k])


def test_state_for_other_optimizer_is_rejected():
    adam = ESConfig(population_size=2)
    sgd = ESConfig(population_size=2, optimizer="sgd")
    with pytest.raises(ValueError, match="momentum_buffer"):
        apply_update(torch.zeros(3), torch.zeros(3), init_optimizer_state(adam, 3), sgd)


def test_es_gradient_matches_dense_estimator():
    cfg = ESConfig(population_size=8, sigma=0.1, seed=1, fitness_shaping="zscore")
    p = 50
    table = NoiseTable.from_seed(cfg.seed, 4096)
    rewards = np.random.default_rng(0).normal(size=8)
    g = es_gradient(rewards, 3, table, cfg, p)
    offs, signs = member_offsets(cfg.seed, 3, 8, p, table.size)
    eps = torch.stack([s * table.window(int(o), p) for o, s in zip(offs, signs, strict=True)])
    w = torch.from_numpy(shape_fitness(rewards, "zscore"))
    dense = (w[:, None] * eps.double()).sum(0) / (8 * 0.1)
    torch.testing.assert_close(g.double(), dense, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="7 rewards"):
        es_gradient(rewards[:7], 3, table, cfg, p)
    assert not torch.equal(g, es_gradient(rewards, 4, table, cfg, p))


def test_tell_ascends_a_quadratic():
    # A real ES loop on f(theta) = -|theta - target|^2 with the library's own pieces.
    cfg = ESConfig(population_size=32, sigma=0.1, learning_rate=0.05, seed=3)
    p = 10
    target = torch.linspace(-1, 1, p)
    table = NoiseTable.from_seed(cfg.seed, 1 << 16)
    theta = torch.zeros(p)
    state = init_optimizer_state(cfg, p)
    start = float(((theta - target) ** 2).sum())
    for epoch in range(150):
        offs, signs = member_offsets(cfg.seed, epoch, cfg.population_size, p, table.size)
        pop = perturbed_params(theta, table, offs, signs, cfg.sigma, range(cfg.population_size))
        rewards = (-((pop - target) ** 2).sum(1)).double().numpy()
        theta, state = tell(cfg, theta, state, rewards, epoch, table)
    end = float(((theta - target) ** 2).sum())
    assert end < 0.05 * start
