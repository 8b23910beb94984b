"""Workers that log the state they evaluate around (importable by spawned worker processes).

Each appends ``<state epoch> <center digest>`` to the file named by $EVOCHI_CENTER_LOG
every time it evaluates, so a test can check that every worker of a training perturbed the
same center in every epoch, whatever its CPU switches.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
from toy_workers import ToyRegression

from evochi_torch import ESConfig
from evochi_torch.codec import state_digest
from evochi_torch.gym import GymSettings, GymWorker


class _LogsCenter:
    def on_hello(self) -> None:
        super().on_hello()
        path = os.environ.get("EVOCHI_CENTER_LOG")
        if path:
            Path(path).with_suffix(".joined").touch()

    def evaluate(self, epoch, slices):
        path = os.environ.get("EVOCHI_CENTER_LOG")
        if path:
            _wait_for_fleet(Path(path).parent)
            with open(path, "a") as fh:
                fh.write(f"{self.state.epoch} {state_digest(self.state).hex()}\n")
        return super().evaluate(epoch, slices)


def _wait_for_fleet(folder: Path, timeout: float = 60.0) -> None:
    """Holds the first evaluations until $EVOCHI_FLEET_SIZE workers have joined, so that a
    fast training is still shared by the whole fleet."""
    global _fleet_seen
    if _fleet_seen:
        return
    size = int(os.environ.get("EVOCHI_FLEET_SIZE", "1"))
    deadline = time.monotonic() + timeout
    while len(list(folder.glob("*.joined"))) < size and time.monotonic() < deadline:
        time.sleep(0.05)
    # A worker marks itself at hello; its first heartbeat, which makes the server hand it
    # work, follows a moment later (longer on a loaded machine).
    time.sleep(1.0)
    _fleet_seen = True


_fleet_seen = False


class ToyLogsCenter(_LogsCenter, ToyRegression):
    def score(self, policy, epoch, members):
        # A toy task takes microseconds: without a pause the first worker would finish each
        # epoch's tasks before the others have proven themselves to the server.
        time.sleep(0.1)
        return super().score(policy, epoch, members)


class HopperLogsCenter(_LogsCenter, GymWorker):
    """Hopper with a small MLP and the observation statistics on: every worker runs the
    center episodes itself, through its own physics and matrix products."""

    settings = GymSettings("Hopper-v5", hidden=(8,), episode_steps=80, eval_episodes=1)
    default_config = ESConfig(population_size=12, sigma=0.05, learning_rate=0.05, seed=1)


class _OneUlpOff(gym.ObservationWrapper):
    def observation(self, observation):
        return np.nextafter(observation, np.inf)


class HopperOtherSimulator(HopperLogsCenter):
    """The same Hopper, but a worker with $EVOCHI_OTHER_SIMULATOR set stands for a machine
    with another simulator build: its observations come out one ulp off, so its statistics
    episodes differ from everyone else's whatever the policy's arithmetic."""

    def make_env(self, render_mode=None):
        env = super().make_env(render_mode)
        return _OneUlpOff(env) if os.environ.get("EVOCHI_OTHER_SIMULATOR") else env
