"""GymWorker's parts without a server: actions, vectorised vs per-member rollouts, settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evochi_torch.gym import GymSettings, GymWorker, ObsStats, eval_seeds, module_actor
from evochi_torch.harness import attach_state, offline_worker
from tests.harness.user_workers import SmallCartPole


class Pendulum(GymWorker):
    settings = GymSettings("Pendulum-v1", hidden=(4,), episode_steps=20, eval_episodes=2)


def test_actions_argmax_for_discrete_and_rescaled_clip_for_continuous() -> None:
    cartpole = offline_worker(SmallCartPole)
    assert cartpole.discrete and cartpole.dims == (4, 2)
    assert cartpole.to_actions(np.array([[0.1, 0.9], [2.0, -1.0]])).tolist() == [1, 0]
    pendulum = offline_worker(Pendulum, config=SmallCartPole.default_config)
    assert not pendulum.discrete and pendulum.dims == (3, 1)
    actions = pendulum.to_actions(np.array([[0.0], [1.5], [-1.0], [0.5]]))
    assert actions.reshape(-1).tolist() == [0.0, 2.0, -2.0, 1.0]  # the box is [-2, 2]
    # The default continuous policy ends in tanh with a 100x smaller last layer.
    policy = pendulum.make_policy()
    assert isinstance(policy[-1], torch.nn.Tanh)
    assert float(policy[-2].weight.detach().abs().max()) < 0.01


def test_vectorised_and_per_member_rollouts_agree() -> None:
    worker = offline_worker(SmallCartPole)
    state = worker.initialize()
    attach_state(worker, state)
    policy = worker.center_policy()
    seeds = eval_seeds(4)
    stats = worker.obs_stats
    assert isinstance(stats, ObsStats) and stats.count > 0  # the initial statistics episode
    one = worker.rollout(worker.envs(4), module_actor(policy), seeds, stats)
    many = worker.vector_rollout(module_actor(policy), seeds, stats)
    assert one.lengths.tolist() == many.lengths.tolist()
    assert one.returns.tolist() == many.returns.tolist()
    assert (one.lengths <= 120).all() and one.returns.tolist() == one.lengths.tolist()


def test_joining_worker_adopts_the_states_settings_and_refuses_foreign_states() -> None:
    starter = offline_worker(SmallCartPole)
    state = starter.initialize()
    other = offline_worker(SmallCartPole, settings=GymSettings("CartPole-v1", hidden=(3,)))
    attach_state(other, state)
    assert other.env_settings == SmallCartPole.settings
    stripped = type(state)(**{**state.__dict__, "extra": {}})
    with pytest.raises(ValueError, match="not started by a GymWorker"):
        attach_state(other, stripped)


def test_cartpole_example_native_vector_env_pins_the_same_starts() -> None:
    from examples.cartpole.cartpole import CartPole

    worker = offline_worker(CartPole)
    attach_state(worker, worker.initialize())
    torch.manual_seed(0)
    policy = torch.nn.Linear(4, 2)
    seeds = eval_seeds(10)
    native = worker.vector_rollout(module_actor(policy), seeds, None)
    one_by_one = worker.rollout(worker.envs(10), module_actor(policy), seeds, None)
    assert native.returns.tolist() == one_by_one.returns.tolist()
    assert len(set(native.returns.tolist())) > 3  # episodes of different lengths


def test_env_kwargs_reach_both_env_kinds_and_travel_in_the_state() -> None:
    config = SmallCartPole.default_config
    settings = Pendulum.settings.replace(env_kwargs={"g": 3.5})
    starter = offline_worker(Pendulum, config=config, settings=settings)
    assert starter.make_env().g == 3.5
    vector = starter.make_vector_env(2)
    assert [env.unwrapped.g for env in vector.envs] == [3.5, 3.5]
    vector.close()
    # A worker started with the class defaults adopts the kwargs from the state, and the
    # gravity shows in the rollouts: the same policy and starts score differently.
    state = starter.initialize()
    joiner = offline_worker(Pendulum, config=config)
    attach_state(joiner, state)
    assert joiner.env_settings.env_kwargs == {"g": 3.5} and joiner.make_env().g == 3.5
    attach_state(starter, state)
    policy = starter.center_policy()
    light = starter.evaluate_episodes(policy, 2).returns
    default = offline_worker(Pendulum, config=config)
    attach_state(default, default.initialize())
    assert default.make_env().g == 10.0
    assert light.tolist() != default.evaluate_episodes(policy, 2).returns.tolist()


class LinearHopper(GymWorker):
    """ARS's policy shape (linear, tanh on the actions) on an env whose episodes end at
    different steps, so the rows alive in a rollout shrink to sizes with SIMD tails."""

    settings = GymSettings("Hopper-v5", hidden=(), episode_steps=200, eval_episodes=1)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_members_reward_does_not_depend_on_how_the_population_is_split(threads) -> None:
    from evochi_torch import ESConfig
    from tests.torch.threads import num_threads

    config = ESConfig(strategy="ars", population_size=38, sigma=0.5, seed=3)
    worker = offline_worker(LinearHopper, config=config)
    attach_state(worker, worker.initialize())

    def rewards(*slices: slice) -> np.ndarray:
        with num_threads(threads):
            evals = [e for s in slices for e in worker.evaluate(0, [s])]
        return np.concatenate([np.asarray(e.rewards) for e in evals])

    whole = rewards(slice(0, 38))
    assert len(set(worker.last_lengths.tolist())) > 5  # episodes really end apart
    for split in [(slice(0, 19), slice(19, 38)), (slice(0, 13), slice(13, 37), slice(37, 38))]:
        assert rewards(*split).tolist() == whole.tolist(), split
