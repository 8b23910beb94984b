"""The speed limit of a MuJoCo training: raw single-process `env.step` speed per environment.

    python -m benchmarks.mujoco_limit                         # five envs, random actions
    python -m benchmarks.mujoco_limit --envs Hopper-v5 --actions zero --seconds 5
    python -m benchmarks.mujoco_limit --json limit.json       # + machine, versions, commit

One process steps one environment, built as the MuJoCo example's workers build it (the
registered env without its wrappers, with the example's `env_kwargs`, e.g. Ant-v5 without its
contact forces), with pre-drawn random actions (or zeros), resetting when an episode ends or
reaches 1000 steps. What counts is the CPU time of env.step (resets are not steps, and a
falling Hopper or Humanoid resets every few dozen steps): other jobs on a shared machine then
do not lower the limit, they lower a run's speed, and its fraction of the limit shows it. No
policy, no observation normalisation, no server: a run's env steps/s divided by this number
is the fraction of the machine's raw simulation speed that the training kept, and a run with
W worker processes on W free cores could reach up to W. A step's cost depends somewhat on the
state (the contacts), so a trained gait may step a little faster or slower than random
actions do. Each env is timed `--repeats` times for `--seconds`; the best repeat is the limit
(caches and frequency scaling only ever slow a repeat down).

One line per env:

    mujoco_limit env=Hopper-v5 actions=random steps_per_s=... resets=... repeats=3

Import-free arithmetic (`steps_per_second`, `limit_of`, `fraction_of_limit`, `core_minutes`,
`hours_at`) is what the results table uses to state a run's cost.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ENVS = ("HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "Ant-v5", "Humanoid-v5")
EPISODE_STEPS = 1000


# --------------------------------------------------------------------------- arithmetic
def steps_per_second(steps: int, seconds: float) -> float:
    """Env steps per second of wall-clock time."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    return steps / seconds


def limit_of(rates: Sequence[float]) -> float:
    """The limit from repeated measurements: the fastest, since interference only slows."""
    if not rates:
        raise ValueError("no measurements")
    return max(rates)


def fraction_of_limit(env_steps: int, seconds: float, limit: float) -> float:
    """A run's env steps/s over the single-process limit of the same env and machine."""
    if not limit > 0:
        raise ValueError(f"limit must be > 0 steps/s, got {limit}")
    return steps_per_second(env_steps, seconds) / limit


def core_minutes(seconds: float, cores: int) -> float:
    """What a run occupied: wall-clock minutes times the cores its processes ran on."""
    if seconds < 0 or cores < 1:
        raise ValueError(f"need seconds >= 0 and cores >= 1, got {seconds}, {cores}")
    return seconds * cores / 60


def hours_at(env_steps: float, limit: float, processes: int = 1, fraction: float = 1.0) -> float:
    """Wall-clock hours for `env_steps` with `processes` stepping in parallel, each at
    `fraction` of the single-process `limit` (1.0: the bound no training beats)."""
    if not limit > 0 or processes < 1 or not fraction > 0:
        raise ValueError("need limit > 0, processes >= 1 and fraction > 0")
    return env_steps / (limit * processes * fraction) / 3600


# --------------------------------------------------------------------------- measurement
def env_kwargs(env_id: str) -> dict[str, Any]:
    """The example's keyword arguments for `env_id` (Ant-v5: no contact forces), else none."""
    try:
        from examples.mujoco.mujoco import SETTINGS
    except ImportError:  # run outside the repository: the env's own defaults
        return {}
    settings = SETTINGS.get(env_id)
    return dict(settings.env_kwargs) if settings is not None else {}


def measure(env_id: str, seconds: float, actions: str = "random", seed: int = 0) -> dict[str, Any]:
    """Steps one unwrapped env for about `seconds` of wall-clock; returns the steps, the CPU
    seconds spent in env.step, the resets and steps per CPU second."""
    import gymnasium as gym
    import numpy as np

    env = gym.make(env_id, disable_env_checker=True, **env_kwargs(env_id)).unwrapped
    rng = np.random.default_rng(seed)
    low, high = env.action_space.low, env.action_space.high
    # Drawn beforehand, so the timing holds env.step alone, not the random generator.
    if actions == "zero":
        block = np.zeros((EPISODE_STEPS, *env.action_space.shape), dtype=env.action_space.dtype)
    else:
        block = rng.uniform(low, high, (EPISODE_STEPS, *low.shape)).astype(env.action_space.dtype)
    env.reset(seed=seed)
    steps = resets = t = 0
    # CPU time of this thread, not wall-clock: other jobs on a shared machine then do not
    # lower the limit (they lower a run's speed, which its fraction of the limit shows).
    # Resets are not steps (a falling Hopper or Humanoid resets every few dozen steps), so
    # their time is taken out.
    cpu = time.thread_time
    stepping = 0.0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        block_start = cpu()
        for _ in range(256):
            _, _, terminated, truncated, _ = env.step(block[t])
            steps += 1
            t += 1
            if terminated or truncated or t == EPISODE_STEPS:
                reset_start = cpu()
                env.reset()
                stepping -= cpu() - reset_start
                resets += 1
                t = 0
        stepping += cpu() - block_start
    env.close()
    return {"steps": steps, "seconds": stepping, "resets": resets,
            "steps_per_s": steps_per_second(steps, stepping)}  # fmt: skip


def limit(env_id: str, seconds: float, repeats: int, actions: str) -> dict[str, Any]:
    """`repeats` measurements after a short warm-up; the fastest is the limit."""
    measure(env_id, min(0.5, seconds), actions)  # imports, model compilation, caches
    runs = [measure(env_id, seconds, actions, seed=i) for i in range(repeats)]
    rates = [r["steps_per_s"] for r in runs]
    return {
        "env": env_id,
        "actions": actions,
        "steps_per_s": round(limit_of(rates)),
        "repeats": [round(r) for r in rates],
        "seconds_each": seconds,
        "resets": sum(r["resets"] for r in runs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.mujoco_limit",
        description=__doc__.split("\n\nImport-free")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--envs",
        default=",".join(ENVS),
        help="comma-separated gymnasium ids (default: %(default)s)",
    )
    parser.add_argument(
        "--actions",
        choices=("random", "zero", "both"),
        default="random",
        help="random (uniform over the action box) or zero actions, or both; default: random",
    )
    parser.add_argument(
        "--seconds", type=float, default=3.0, help="time per repeat (default %(default)s)"
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="measurements per env; the fastest counts (default %(default)s)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the numbers, machine, versions and commit here",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.repeats < 1:
        parser.error("--seconds must be > 0 and --repeats >= 1")
    kinds = ("random", "zero") if args.actions == "both" else (args.actions,)
    results = []
    for env_id in args.envs.split(","):
        for kind in kinds:
            r = limit(env_id, args.seconds, args.repeats, kind)
            results.append(r)
            print(
                f"mujoco_limit env={env_id} actions={kind} steps_per_s={r['steps_per_s']} "
                f"resets={r['resets']} repeats={len(r['repeats'])}",
                flush=True,
            )
    if args.json is not None:
        from benchmarks.provenance import provenance

        command = [
            "python",
            "-m",
            "benchmarks.mujoco_limit",
            *(sys.argv[1:] if argv is None else argv),
        ]
        record = {"limits": results, **provenance(command)}
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(math.isfinite(r["steps_per_s"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
