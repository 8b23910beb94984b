"""CartPole-v1 with distributed Evolution Strategies, in one command.

    python -m examples.cartpole                         # embedded server + 2 worker processes
    python -m examples.cartpole --es.seed 1 --run.workers 4 --run.loggers tensorboard
    evochi-torch play examples.cartpole:CartPole runs/cartpole-s0 --gif out.gif
    evochi-torch worker examples.cartpole:CartPole --server HOST:PORT   # join a remote run

Everything but the task is the library's: `GymWorker` runs the episodes (gymnasium's vector
CartPole, argmax actions) and evaluates the center policy on fixed start states; `Trainer`
starts the server and the workers, prints one line per epoch, stops once the center policy is
solved and writes runs/cartpole-s<seed>/ (checkpoints, metrics.csv, curve.png, config.json);
a second run goes beside it, with its start time appended (runs/cartpole-s0-20261207-141500/).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
import tyro
from torch import nn

from evochi_torch import ESConfig
from evochi_torch.gym import GymSettings, GymWorker
from evochi_torch.harness import RunConfig, RunResult, Trainer


class CartPole(GymWorker):
    """Scores each population member by one CartPole episode (its return = its length)."""

    settings = GymSettings(
        "CartPole-v1",
        hidden=(),  # a linear policy is enough for CartPole and keeps each epoch cheap
        stats_episodes=0,  # observations are already of order 1: no normalisation
        eval_episodes=10,
        vectorized=True,  # gymnasium's numpy CartPole steps all members in one call
    )
    default_config = ESConfig(population_size=32, sigma=0.2, learning_rate=0.2, seed=0)

    def make_policy(self) -> nn.Module:
        return nn.Sequential(nn.Linear(4, 2))  # observation -> logits of left/right

    def start_seeds(self, members: np.ndarray) -> np.ndarray:
        # Common random numbers: every member of an epoch starts from the same state, so
        # differences in return come from the parameters, not from luck.
        return np.full(len(members), self.config.seed * 1_000_003 + self.state.epoch + 1)

    def evaluation_seeds(self, n: int) -> np.ndarray:
        return np.arange(10_000_000, 10_000_000 + n)  # fixed: play reproduces the score

    def make_vector_env(self, n: int) -> gym.vector.VectorEnv:
        return gym.make_vec("CartPole-v1", num_envs=n, vectorization_mode="vector_entry_point")

    def reset_vector(self, envs: gym.vector.VectorEnv, seeds: np.ndarray) -> np.ndarray:
        # The vector env draws all start states from one generator; pin each episode's own
        # (the draw `env.reset(seed=s)` makes), so a member's return depends on its seed only.
        envs.reset(seed=0)
        start = np.stack([np.random.default_rng(s).uniform(-0.05, 0.05, 4) for s in seeds])
        envs.unwrapped.state = start.T.copy()
        return start.astype(np.float32)


@dataclass
class Args:
    """Train a CartPole-v1 policy with distributed ES on this machine."""

    es: ESConfig = CartPole.default_config
    """the ES hyper-parameters (every ESConfig field)"""
    env: GymSettings = CartPole.settings
    """the task: episode length, start states, evaluation episodes"""
    run: RunConfig = field(
        default_factory=lambda: RunConfig(max_epochs=200, target=475.0, checkpoint_every=10)
    )
    """workers, budget, run directory, loggers; solved when the center reaches --run.target"""


def run(args: Args) -> RunResult:
    """Trains; used by main(), the tests and the benchmark."""
    name = args.run.name or f"cartpole-s{args.es.seed}"
    settings = dataclasses.replace(args.run, name=name)
    trainer = Trainer(CartPole, args.es, settings, worker_kwargs={"settings": args.env})
    return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    try:
        result = run(tyro.cli(Args, args=argv))
    except (ValueError, FileNotFoundError) as exc:  # e.g. a taken --run.run-dir: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the trainer said what the run directory kept
        return 130
    solved = result.stopped_by == "target"
    print(f"{'solved' if solved else 'not solved'} epoch={result.last['epoch']} "
          f"env_steps={result.last['env_steps']} seconds={result.last['seconds']:.2f} "
          f"return={result.last['center_score']:.1f}")  # fmt: skip
    return 0 if solved else 1


if __name__ == "__main__":
    sys.exit(main())
