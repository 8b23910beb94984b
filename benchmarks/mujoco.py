"""Center-policy return of the MuJoCo example after an env-step budget.

    python -m benchmarks.mujoco --env HalfCheetah-v5 --env-steps 10000000 --seed 0
    python -m benchmarks.mujoco --env Hopper-v5 --env-steps 10000000 --seed 1 -- --es.sigma 0.03
    python -m benchmarks.mujoco --env Walker2d-v5 --strategy ars --env-steps 3000000
    python -m benchmarks.mujoco --table --env-steps 3000000       # every strategy x env, resumable

The training is `examples.mujoco.run` with the env's defaults (arguments after `--` go to the
example's command line; `--strategy` picks the example's preset `ENV/STRATEGY`). `return` is
the final center policy's mean true return over the example's 10 fixed evaluation episodes;
`env_steps` counts training and observation-statistics episodes (not evaluation ones);
`seconds` is training time, process start-up excluded. The run directory (curve, metrics,
policy) is kept under --runs-dir. Last line:

    mujoco env=HalfCheetah-v5 strategy=openai_es seed=0 env_steps=... seconds=... return=...

and `result.json` with the same numbers goes into the run directory. `--table` runs every
(strategy, env) pair of `--strategies` x `--envs` in turn, skipping pairs that some run
directory's `result.json` already holds (so an interrupted table continues where it stopped;
the interrupted pair's new run goes beside the old one, which is kept), then prints
the table; `--table --summarize` only prints it (markdown, one row per strategy) and plots one
curve per strategy into `<out>/strategies-<env>.png` with `--out` (beside each run's
metrics.csv and result.json).

`python -m benchmarks.mujoco --summarize runs/benchmarks --out examples/mujoco/results` plots
every env's seeds into `<out>/<env>.png`, copies their metrics.csv and prints a markdown table;
of several runs of one env and seed (runs are never overwritten) it takes the last written.
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

from examples.mujoco.mujoco import PRESETS, SETTINGS, STRATEGIES, run


def summarize(runs_dir: Path, out: Path) -> None:
    """Per env: one plot of all seeds' center returns, and a markdown table row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evochi_torch.harness import load_state, offline_worker
    from examples.mujoco.mujoco import MuJoCoES

    latest: dict[tuple[str, int], Path] = {}
    strategies: dict[str, set[str]] = {}
    # Oldest first, so that a later run of the same env and seed takes its place.
    for config in sorted(runs_dir.glob("*/config.json"), key=lambda p: p.stat().st_mtime):
        record = json.loads(config.read_text())
        env = record["worker_kwargs"]["settings"]["env_id"]
        latest[(env, record["es"]["seed"])] = config.parent
        strategies.setdefault(env, set()).add(record["es"].get("strategy", "openai_es"))
    runs: dict[str, list[tuple[int, Path]]] = {}
    for (env, seed), run_dir in sorted(latest.items()):
        runs.setdefault(env, []).append((seed, run_dir))
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
        title = f"{env} ({', '.join(sorted(strategies[env]))})"
        ax.set(xlabel="env steps", ylabel="center-policy return", title=title)
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


def bench(env: str, strategy: str, seed: int, env_steps: int, workers: int, runs_dir: Path,
          extra: list[str]) -> dict:  # fmt: skip
    """One training of the example's `ENV[/STRATEGY]` preset; returns (and stores) its result."""
    key = env if strategy == "openai_es" else f"{env}/{strategy}"
    example = tyro.extras.overridable_config_cli(
        PRESETS,
        args=[
            key, "--run.env-steps", str(env_steps), "--es.seed", str(seed),
            "--run.workers", str(workers), "--run.runs-dir", str(runs_dir), *extra,
        ],
    )  # fmt: skip
    result, final = run(example)
    record = {
        "env": env, "strategy": strategy, "seed": seed, "env_steps": result.last["env_steps"],
        "seconds": round(result.last["seconds"], 1), "return": round(final, 1),
    }  # fmt: skip
    (result.run_dir / "result.json").write_text(json.dumps(record, indent=1) + "\n")
    print("mujoco " + " ".join(f"{k}={v}" for k, v in record.items()), flush=True)
    return record


def finished(runs_dir: Path, seed: int) -> dict[tuple[str, str], tuple[dict, Path]]:
    """(strategy, env) -> (result.json, run directory) of the finished runs of `seed`; the
    last written where a pair has several."""
    results = {}
    for path in sorted(runs_dir.glob("*/result.json"), key=lambda p: p.stat().st_mtime):
        r = json.loads(path.read_text())
        if r["seed"] == seed:
            results[(r["strategy"], r["env"])] = (r, path.parent)
    return results


def table(runs_dir: Path, envs: list[str], strategies: list[str], seed: int,
          out: Path | None) -> None:  # fmt: skip
    """Markdown table (rows: strategies, columns: envs) of the finished runs, and curves."""
    results = finished(runs_dir, seed)
    print("| strategy | " + " | ".join(envs) + " |")
    print("|---|" + "---|" * len(envs))
    for s in strategies:
        cells = []
        for env in envs:
            r = results.get((s, env), (None, None))[0]
            cells.append("-" if r is None else f"{r['return']:.0f} ({r['seconds']:.0f} s)")
        print(f"| {s} | " + " | ".join(cells) + " |")
    if out is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    for env in envs:
        if not any((s, env) in results for s in strategies):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for s in strategies:
            if (s, env) not in results:
                continue
            run_dir = results[(s, env)][1]
            with open(run_dir / "metrics.csv") as fh:
                rows = list(csv.DictReader(fh))
            x = [int(r["env_steps"]) for r in rows]
            ax.plot(x, [float(r["center_score"]) for r in rows], label=s, lw=1)
            shutil.copy(run_dir / "metrics.csv", out / f"{run_dir.name}.csv")
            shutil.copy(run_dir / "result.json", out / f"{run_dir.name}.json")
        ax.set(xlabel="env steps", ylabel="center-policy return", title=f"{env}, seed {seed}")
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"strategies-{env}.png", dpi=100)
        plt.close(fig)


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
    parser.add_argument("--strategy", default="openai_es", choices=STRATEGIES)
    parser.add_argument("--env-steps", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--table", action="store_true", help="every strategy x env (resumable)")
    parser.add_argument("--envs", default=",".join(SETTINGS), help="--table's envs")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="--table's rows")
    parser.add_argument("--summarize", action="store_true", help="with --table: print only")
    parser.add_argument("--out", type=Path, help="with --table: curves and CSVs go here")
    args = parser.parse_args(argv)
    if not args.table:
        bench(args.env, args.strategy, args.seed, args.env_steps, args.workers, args.runs_dir,
              extra)  # fmt: skip
        return
    envs, strategies = args.envs.split(","), args.strategies.split(",")
    runs_dir = args.runs_dir / f"table-{args.env_steps}"
    if not args.summarize:
        done = finished(runs_dir, args.seed) if runs_dir.exists() else {}
        for env in envs:
            for s in strategies:
                if (s, env) in done:
                    continue
                print(f"mujoco table: {s} on {env}", flush=True)
                bench(env, s, args.seed, args.env_steps, args.workers, runs_dir, extra)
    table(runs_dir, envs, strategies, args.seed, args.out)


if __name__ == "__main__":
    main()
