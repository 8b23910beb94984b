"""CartPole-v1 with distributed Evolution Strategies, in one command.

    python -m examples.cartpole                      # embedded server + 2 worker processes
    python -m examples.cartpole --workers 4 --seed 1
    python -m examples.cartpole --play runs/cartpole-s0/policy.safetensors --gif out.gif
    evochi-torch worker examples.cartpole:CartPole --server HOST:PORT   # join a remote run

Read top to bottom: the policy, how a batch of population members is scored, then the
training loop that prints progress, stops once the center policy is solved, and writes
`runs/<name>/` (policy, metrics CSV, learning curve, config).
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import tyro
from torch import nn

from evochi.server import EpochSummary, ServerConfig
from evochi_torch import ESConfig, TorchESWorker, decode_state, load_policy, save_checkpoint
from evochi_torch.launch import (
    WorkerSpec,
    class_path,
    default_threads,
    parse_devices,
    spread,
    train,
)

ENV_ID = "CartPole-v1"
MAX_STEPS = 500  # CartPole-v1's time limit: the best possible return


def make_policy() -> nn.Module:
    # A linear policy is enough for CartPole and keeps each epoch cheap.
    return nn.Sequential(nn.Linear(4, 2))


def rollout(policy, seeds: np.ndarray) -> np.ndarray:
    """Runs one episode per row of `policy`'s batch; returns each episode's return.

    `policy(obs)` maps a [B, 4] observation batch to [B, 2] action logits, row b with its
    own parameters. `seeds[b]` fixes episode b's start state, so a member's return does
    not depend on which worker or batch evaluates it.
    """
    n = len(seeds)
    envs = gym.make_vec(ENV_ID, num_envs=n, vectorization_mode="vector_entry_point")
    envs.reset(seed=0)
    # The vector env draws all start states from one generator; set them per episode
    # instead, from the episode's own seed.
    start = np.stack([np.random.default_rng(s).uniform(-0.05, 0.05, 4) for s in seeds], axis=1)
    envs.unwrapped.state = start
    obs = start.T.astype(np.float32)
    returns = np.zeros(n)
    alive = np.ones(n, dtype=bool)
    with torch.no_grad():
        for _ in range(MAX_STEPS):
            actions = policy(torch.from_numpy(obs)).argmax(-1).numpy()
            obs, reward, terminated, truncated, _ = envs.step(actions)
            returns += reward * alive
            alive &= ~(terminated | truncated)
            if not alive.any():
                break
    envs.close()
    return returns


class CartPole(TorchESWorker):
    """Scores each population member by one CartPole episode."""

    default_config = ESConfig(
        population_size=32, sigma=0.2, learning_rate=0.2, optimizer="adam", seed=0
    )

    def make_policy(self) -> nn.Module:
        return make_policy()

    def score(self, policy, epoch: int, members: torch.Tensor) -> np.ndarray:
        # Common random numbers: every member of an epoch starts from the same state, so
        # differences in return come from the parameters, not from luck.
        seeds = np.full(len(members), self.config.seed * 1_000_003 + epoch)
        return rollout(policy, seeds)


# --------------------------------------------------------------------------- training
@dataclass
class Args:
    """Train a CartPole-v1 policy with distributed ES on this machine."""

    workers: int = 2
    """worker processes (each evaluates its share of the population)"""
    devices: str = "cpu"
    """evaluation devices: cpu, cuda:0,cuda:1, or all"""
    seed: int = 0
    """seeds the initial policy, the noise and the episodes"""
    population_size: int = 32
    sigma: float = 0.2
    learning_rate: float = 0.2
    max_epochs: int = 200
    """give up after this many epochs"""
    target_return: float = 475.0
    """solved when the center policy's mean return reaches this"""
    eval_episodes: int = 10
    """episodes of the center policy per epoch"""
    name: str | None = None
    """run directory name (default: cartpole-s<seed>)"""
    runs_dir: Path = Path("runs")
    """where run directories are written"""
    play: Path | None = None
    """instead of training: load this policy .safetensors and play episodes"""
    gif: Path | None = None
    """with --play: render one episode to this GIF"""
    quiet: bool = False
    """no per-epoch lines"""


# The center policy is judged on a fixed set of start states, the same in every run and in
# --play, so the reported return can be reproduced from the saved policy alone.
EVAL_SEEDS = np.arange(10_000_000, 10_000_100)


def evaluate_center(module: nn.Module, episodes: int) -> np.ndarray:
    """The unperturbed policy's returns over the first `episodes` evaluation episodes."""
    return rollout(module, EVAL_SEEDS[:episodes])


def play(args: Args) -> None:
    module = load_policy(make_policy(), args.play)
    returns = evaluate_center(module, args.eval_episodes)
    print(f"returns: {' '.join(f'{r:.0f}' for r in returns)}")
    print(f"mean return {returns.mean():.1f} over {len(returns)} episodes")
    if args.gif is not None:
        write_gif(module, args.gif)
        print(f"wrote {args.gif}")


def write_gif(module: nn.Module, path: Path) -> None:
    import imageio.v2 as imageio

    env = gym.make(ENV_ID, render_mode="rgb_array")
    obs, _ = env.reset(seed=123)
    frames = [env.render()]
    done = False
    with torch.no_grad():
        while not done:
            action = int(module(torch.as_tensor(obs)[None]).argmax(-1))
            obs, _, terminated, truncated, _ = env.step(action)
            frames.append(env.render())
            done = terminated or truncated
    env.close()
    imageio.mimsave(path, frames[::2], duration=0.04, loop=0)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["env_steps"] for r in rows]
    ax.plot(steps, [r["center_return"] for r in rows], label="center policy")
    ax.plot(steps, [r["pop_mean"] for r in rows], label="population mean", alpha=0.7)
    ax.axhline(475, color="grey", ls="--", lw=0.8)
    ax.set(xlabel="env steps", ylabel="return", title=f"{ENV_ID} (ES)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: Args) -> dict:
    """Trains; returns the final metrics row. Used by main(), the tests and the benchmark."""
    config = CartPole.default_config.replace(
        population_size=args.population_size,
        sigma=args.sigma,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )
    run_dir = args.runs_dir / (args.name or f"cartpole-s{args.seed}")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(
        json.dumps(
            {"args": dataclasses.asdict(args), "es": config.to_dict()}, default=str, indent=2
        )
    )
    devices = spread(parse_devices(args.devices), args.workers)
    spec = WorkerSpec(
        class_path(CartPole),
        cores=-(-config.population_size // args.workers),
        kwargs={"config": config},
        threads=default_threads(args.workers),
    )
    module = make_policy()
    rows: list[dict] = []
    env_steps = 0
    started = 0.0

    def on_epoch(summary: EpochSummary) -> bool:
        nonlocal env_steps, started
        if rows and rows[-1]["center_return"] >= args.target_return:
            return True  # an epoch that finished while the stop was on its way
        if not rows:
            # Training time starts with the first epoch: process start-up is not training.
            started = time.perf_counter() - summary.seconds
        state = decode_state(summary.state)
        torch.nn.utils.vector_to_parameters(state.params, module.parameters())
        center = evaluate_center(module, args.eval_episodes)
        # CartPole pays 1 per step, so a member's return is its episode's step count.
        env_steps += int(summary.rewards.sum())
        row = {
            "epoch": summary.epoch,
            "env_steps": env_steps,
            "seconds": round(time.perf_counter() - started, 3),
            "center_return": float(center.mean()),
            "pop_mean": float(summary.rewards.mean()),
            "pop_max": float(summary.rewards.max()),
            "steps_per_s": round(summary.rewards.sum() / max(summary.seconds, 1e-9)),
        }
        rows.append(row)
        save_checkpoint(run_dir / "policy.safetensors", state)
        if not args.quiet:
            print(
                f"epoch {row['epoch']:4d}  center {row['center_return']:6.1f}  "
                f"pop mean {row['pop_mean']:6.1f} max {row['pop_max']:5.0f}  "
                f"{row['steps_per_s']:>8} steps/s",
                flush=True,
            )
        return row["center_return"] >= args.target_return

    server_config = ServerConfig(
        population_size=config.population_size, max_epochs=args.max_epochs, worker_timeout=30.0
    )
    result = asyncio.run(train(spec, server_config, devices, on_epoch=on_epoch))
    if not rows:
        raise RuntimeError("the training ended before its first epoch")

    with open(run_dir / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, run_dir / "curve.png")
    last = rows[-1]
    word = "solved" if last["center_return"] >= args.target_return else "not solved"
    print(
        f"{word} epoch={last['epoch']} env_steps={last['env_steps']} "
        f"seconds={last['seconds']:.2f} return={last['center_return']:.1f}"
    )
    print(f"wrote {run_dir}/ (policy.safetensors, metrics.csv, curve.png, config.json)")
    return {**last, "solved": word == "solved", "run_dir": str(run_dir), "crashed": result.crashed}


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(Args, args=argv)
    if args.play is not None:
        play(args)
        return 0
    return 0 if run(args)["solved"] else 1


if __name__ == "__main__":
    sys.exit(main())
