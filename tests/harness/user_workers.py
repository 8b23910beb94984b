"""Worker classes as a user writes them (importable by spawned worker processes)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from evochi_torch import ESConfig, TorchESWorker
from evochi_torch.gym import GymSettings, GymWorker


class CartPole(TorchESWorker):
    """README's CartPole: a plain TorchESWorker, plus the optional center evaluation."""

    default_config = ESConfig(population_size=16, sigma=0.2, learning_rate=0.2)

    def make_policy(self) -> nn.Module:
        return nn.Linear(4, 2)

    def score(self, policy, epoch, members):
        envs = gym.make_vec("CartPole-v1", num_envs=len(members))
        obs, _ = envs.reset(seed=epoch)
        returns = np.zeros(len(members))
        alive = np.ones(len(members), dtype=bool)
        while alive.any():
            actions = policy(torch.as_tensor(obs)).argmax(-1).numpy()
            obs, reward, terminated, truncated, _ = envs.step(actions)
            returns += reward * alive
            alive &= ~(terminated | truncated)
        return returns

    def evaluate_center(self, policy: nn.Module) -> float:
        env = gym.make("CartPole-v1")
        obs, _ = env.reset(seed=123)
        total, done = 0.0, False
        while not done:
            with torch.no_grad():
                action = int(policy(torch.as_tensor(obs)).argmax())
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        return total


class SmallCartPole(GymWorker):
    """A GymWorker with everything on: MLP, observation statistics, pair starts, episodes
    that end at different lengths (so env steps are not a multiple of anything)."""

    settings = GymSettings("CartPole-v1", hidden=(8,), episode_steps=120, eval_episodes=3)
    default_config = ESConfig(population_size=12, sigma=0.1, learning_rate=0.05, seed=2)


class BrokenEvaluation(CartPole):
    def evaluate_center(self, policy: nn.Module) -> float:
        raise ValueError("broken evaluation")
