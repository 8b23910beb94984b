"""Center-policy return of the MuJoCo example after an env-step budget.

    python -m benchmarks.mujoco --env HalfCheetah-v5 --env-steps 10000000 --seed 0
    python -m benchmarks.mujoco --env Hopper-v5 --env-steps 10000000 --seed 1 -- --sigma 0.03

The training is `examples.mujoco.run` with the env's defaults (arguments after `--` go to the
example's command line). `return` is the final center policy's mean true return over the
example's 10 fixed evaluation episodes; `env_steps` counts training and observation-statistics
episodes (not evaluation ones); `seconds` is training time, process start-up excluded. The run
directory (curve, metrics, policy) is kept under --runs-dir. Last line:

    mujoco env=HalfCheetah-v5 env_steps=... seconds=... return=...
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import tyro

from examples.mujoco.mujoco import Args, run


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--env-steps", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/benchmarks"))
    args = parser.parse_args(argv)
    example = tyro.cli(
        Args,
        args=[
            "--env", args.env, "--env-steps", str(args.env_steps), "--seed", str(args.seed),
            "--workers", str(args.workers), "--runs-dir", str(args.runs_dir),
            *extra,
        ],
    )  # fmt: skip
    result = run(example)
    print(
        f"mujoco env={args.env} env_steps={result['env_steps']} "
        f"seconds={result['seconds']:.1f} return={result['final_return']:.1f}"
    )


if __name__ == "__main__":
    main()
