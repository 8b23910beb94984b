"""Prints a digest of every strategy's update, of the observation statistics and of MuJoCo
evaluation episodes, as JSON.

Run in subprocesses under different math-library switches by test_portability.py: each line
of numbers must come out the same whatever code path the CPU, BLAS or SIMD dispatch picks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

import numpy as np
import torch

from evochi_torch import ESConfig
from evochi_torch.functional import NoiseTable
from evochi_torch.gym import GymSettings, GymWorker, ObsStats
from evochi_torch.harness import attach_state, offline_worker
from evochi_torch.strategies import STRATEGIES, ask, get_strategy

P = 4099  # not a multiple of any SIMD width: every kernel runs its body and its tail
NPOP = 16
EPOCHS = 4


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def strategy_digest(name: str) -> str:
    config = ESConfig(population_size=NPOP, strategy=name, sigma=0.1, seed=3)
    s = get_strategy(name)
    # Not torch.randn: its vectorised Box-Muller rounds per SIMD path. (In a training only the
    # initializing worker draws the start, and everyone else receives it.)
    params = torch.from_numpy(np.random.default_rng(1).standard_normal(P, dtype=np.float32))
    table = NoiseTable.for_config(config, P)
    state = s.init(config, params)
    for epoch in range(EPOCHS):
        pop = ask(config, params, state, epoch, table).numpy().astype(np.float64)
        # Exactly rounded sums: the rewards must not depend on the switches either.
        rewards = np.array([-math.fsum(((row - 0.3) * (row - 0.3)).tolist()) for row in pop])
        params, state = s.tell(config, params, state, rewards, epoch, table)
    return _digest(params.numpy(), *(state[k].numpy() for k in sorted(state)))


def stats_digest() -> str:
    rng = np.random.default_rng(5)
    stats = ObsStats.initial(17)
    for n in (1, 333, 1000):
        stats = stats.update(rng.normal(2.0, 3.0, size=(n, 17)))
    return _digest(stats.mean, stats.var)


class Cheetah(GymWorker):
    settings = GymSettings("HalfCheetah-v5", hidden=(32, 32), episode_steps=300, eval_episodes=2)
    default_config = ESConfig(population_size=4, sigma=0.1)


def evaluation_digest() -> str:
    """Two evaluation episodes of an MLP whose actions span the action box: chaotic dynamics
    turn any rounding difference of the policy into other returns."""
    worker = offline_worker(Cheetah)
    state = worker.initialize()
    # Not the initial center and statistics: torch's initialisation draws, and the statistics
    # episodes' torch forward, round per SIMD path.
    rng = np.random.default_rng(7)
    center = rng.normal(0.0, 0.5, state.params.shape).astype(np.float32)
    stats = ObsStats.initial(worker.dims[0]).update(rng.normal(0.0, 2.0, (50, worker.dims[0])))
    state = dataclasses.replace(
        state,
        params=torch.from_numpy(center),
        extra_tensors={**state.extra_tensors, **stats.to_tensors()},
    )
    attach_state(worker, state)
    result = worker.evaluate_episodes(worker.center_policy(), 2)
    return _digest(result.returns, result.lengths)


if __name__ == "__main__":
    out = {name: strategy_digest(name) for name in sorted(STRATEGIES)}
    out["obs_stats"] = stats_digest()
    out["evaluation"] = evaluation_digest()
    print(json.dumps(out))
