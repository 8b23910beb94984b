"""Center-policy return of the MuJoCo example after an env-step budget.

    python -m benchmarks.mujoco --env HalfCheetah-v5 --env-steps 10000000 --seed 0
    python -m benchmarks.mujoco --env Hopper-v5 --env-steps 10000000 --seed 1 -- --es.sigma 0.03

The training is `examples.mujoco.run` with the env's defaults (arguments after `--` go to the
example's command line). `return` is the final center policy's mean true return over the
example's 10 fixed evaluation episodes; `env_steps` counts training and observation-statistics
episodes (not evaluation ones); `seconds` is training time, process start-up excluded. The run
directory (curve, metrics, policy) is kept under --runs-dir. Last line:

    mujoco env=HalfCheetah-v5 env_steps=... seconds=... return=...

`python -m benchmarks.mujoco --summarize runs/benchmarks --out examples/mujoco/results` plots
every env's seeds into `<out>/<env>.png`, copies their metrics.csv and prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
from pathlib import Path

import tyro

from examples.mujoco.mujoco import PRESETS, run


def summarize(runs_dir: Path, out: Path) -> None:
    """Per env: one plot of all seeds' center returns, and a markdown table row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evochi_torch.harness import load_state, offline_worker
    from examples.mujoco.mujoco import MuJoCoES

    runs: dict[str, list[tuple[int, Path]]] = {}
    for config in sorted(runs_dir.glob("*/config.json")):
        record = json.loads(config.read_text())
        env = record["worker_kwargs"]["settings"]["env_id"]
        runs.setdefault(env, []).append((record["es"]["seed"], config.parent))
    out.mkdir(parents=True, exist_ok=True)
    print("| env | seeds | env steps | wall time (s) | center return per seed | mean | median |")
    print("|---|---|---|---|---|---|---|")
    for env, seeds in runs.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        finals, steps, seconds = [], [], []
        for seed, run_dir in sorted(seeds):
            with open(run_dir / "metrics.csv") as fh:
                rows = list(csv.DictReader(fh))
            x = [int(r["env_steps"]) for r in rows]
            ax.plot(x, [float(r["center_score"]) for r in rows], label=f"seed {seed}", lw=1)
            shutil.copy(run_dir / "metrics.csv", out / f"{env}-s{seed}.csv")
            worker = offline_worker(MuJoCoES, load_state(run_dir))
            finals.append(
                float(worker.evaluate_episodes(worker.center_policy(), 10).returns.mean())
            )
            steps.append(x[-1])
            seconds.append(float(rows[-1]["seconds"]))
        ax.set(xlabel="env steps", ylabel="center-policy return", title=f"{env} (ES)")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out / f"{env}.png", dpi=100)
        plt.close(fig)
        per_seed = ", ".join(f"{r:.0f}" for r in finals)
        print(
            f"| {env} | {len(finals)} | {statistics.median(steps):,.0f} | "
            f"{statistics.median(seconds):.0f} | {per_seed} | {statistics.mean(finals):.0f} | "
            f"{statistics.median(finals):.0f} |"
        )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--summarize"]:
        runs_dir = Path(argv[1])
        out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else runs_dir
        summarize(runs_dir, out)
        return
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
    example = tyro.extras.overridable_config_cli(
        PRESETS,
        args=[
            args.env, "--run.env-steps", str(args.env_steps), "--es.seed", str(args.seed),
            "--run.workers", str(args.workers), "--run.runs-dir", str(args.runs_dir),
            *extra,
        ],
    )  # fmt: skip
    result, final = run(example)
    print(
        f"mujoco env={args.env} env_steps={result.last['env_steps']} "
        f"seconds={result.last['seconds']:.1f} return={final:.1f}"
    )


if __name__ == "__main__":
    main()
