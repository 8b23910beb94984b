"""Center-policy return of the MuJoCo example after an env-step budget, and its cost.

    python -m benchmarks.mujoco --env HalfCheetah-v5 --env-steps 10000000 --seed 0
    python -m benchmarks.mujoco --env Hopper-v5 --env-steps 10000000 --seed 1 -- --es.sigma 0.03
    python -m benchmarks.mujoco --env Walker2d-v5 --strategy ars --env-steps 3000000
    python -m benchmarks.mujoco --table --env-steps 3000000       # every strategy x env, resumable
    python -m benchmarks.mujoco --check HalfCheetah-v5            # re-evaluate committed policies

The training is `examples.mujoco.run` with the env's defaults (arguments after `--` go to the
example's command line; `--strategy` picks the example's preset `ENV/STRATEGY`). `return` is
the final center policy's mean true return over the example's 10 fixed evaluation episodes;
`env_steps` counts training and observation-statistics episodes (not evaluation ones);
`seconds` is training time, process start-up excluded. The run directory (curve, metrics,
policy) is kept under --runs-dir. Last line:

    mujoco env=HalfCheetah-v5 strategy=openai_es seed=0 env_steps=... seconds=... return=...

and `result.json` with the same numbers goes into the run directory, beside `meta.json`: the
command, the commit, the machine (CPU model, cores), the library versions, the worker
processes and cores used, and the env's single-process env.step limit on this machine
(`benchmarks.mujoco_limit`, timed after the training). `python -m benchmarks.results_table`
turns such run directories into the results table (env steps, wall-clock, core-minutes,
fraction of the limit, returns) and `collect`s them, with a policy file, into
benchmarks/results/mujoco/ENV/STRATEGY/...; `--check ENV` evaluates those policy files again
and compares with their result.json, in seconds.

`--table` runs every (strategy, env) pair of `--strategies` x `--envs` in turn, skipping pairs
that some run directory's `result.json` already holds (so an interrupted table continues where
it stopped; the interrupted pair's new run goes beside the old one, which is kept), then prints
the table; `--table --summarize` only prints it (markdown, one row per strategy) and plots one
curve per strategy into `<out>/strategies-<env>.png` with `--out` (beside each run's
metrics.csv and result.json).

`python -m benchmarks.mujoco --summarize runs/benchmarks --out DIR` plots every env's seeds
into `DIR/<env>.png`, copies their metrics.csv and prints a markdown table of the returns; of
several runs of one env and seed (runs are never overwritten) it takes the last written.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
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
          extra: list[str], command: list[str] | None = None,
          limit_seconds: float = 3.0) -> dict:  # fmt: skip
    """One training of the example's `ENV[/STRATEGY]` preset; returns (and stores) its result."""
    from benchmarks.provenance import provenance

    key = env if strategy == "openai_es" else f"{env}/{strategy}"
    example = tyro.extras.overridable_config_cli(
        PRESETS,
        args=[
            key, "--run.env-steps", str(env_steps), "--es.seed", str(seed),
            "--run.workers", str(workers), "--run.runs-dir", str(runs_dir), *extra,
        ],
    )  # fmt: skip
    # Before the training: the commit and tree are those of the code this process imports,
    # which a checkout may move away from while a long run goes on.
    argv = command if command is not None else ["python", "-m", "benchmarks.mujoco", *sys.argv[1:]]
    started = provenance(argv)
    result, final = run(example)
    record = {
        "env": env, "strategy": strategy, "seed": seed, "env_steps": result.last["env_steps"],
        "seconds": round(result.last["seconds"], 1), "return": round(final, 1),
    }  # fmt: skip
    (result.run_dir / "result.json").write_text(json.dumps(record, indent=1) + "\n")
    meta = run_meta(env, workers, started, limit_seconds)
    (result.run_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    print("mujoco " + " ".join(f"{k}={v}" for k, v in record.items()), flush=True)
    return record


def run_meta(env: str, workers: int, started: dict, limit_seconds: float) -> dict:
    """meta.json of a run made here: `started` (command, commit, machine, versions as they
    were when it started), the cores it used, the machine's load now and its env's
    single-process env.step limit, measured now (after the training, so that the two do not
    share the cores)."""
    import os

    from benchmarks.mujoco_limit import limit
    from benchmarks.provenance import UNRECORDED

    meta = dict(started)
    meta["workers"] = workers
    # Each worker process steps its envs on one core; more workers than cores share them.
    meta["cores_used"] = min(workers, meta["machine"]["cores_available"] or workers)
    meta["load_average_1_5_15_min_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if limit_seconds > 0:
        measured = limit(env, limit_seconds, 3, "random")
        meta["limit"] = {**measured, "command": "python -m benchmarks.mujoco_limit --envs "
                         f"{env} --seconds {limit_seconds:g} --repeats 3"}  # fmt: skip
    else:
        meta["limit"] = UNRECORDED
    return meta


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


RESULTS = Path(__file__).resolve().parent / "results" / "mujoco"
#: --check's default tolerance, relative to the claimed return. The evaluation pins the policy's
#: arithmetic (evochi_torch.portable: the same actions on every CPU), and the physics is MuJoCo's
#: compiled code, whose calls into glibc's libm pick FMA variants by CPU: on an x86 CPU with FMA
#: (every one with AVX2), the same mujoco wheel and glibc, a claim reproduces up to
#: result.json's rounding (0.05). Another build rounds the physics differently, and over 1000
#: steps of chaotic dynamics that moves a stable gait's return by a little (a gait that falls
#: in some episodes can move far more, which --check then reports).
TOLERANCE = 0.02


def evaluate_policy(path: Path, episodes: int = 10) -> float:
    """Mean true return of the center policy in `path` (a policy file, checkpoint or run
    directory) over the example's first `episodes` fixed evaluation episodes."""
    from evochi_torch.harness import load_state, offline_worker
    from examples.mujoco.mujoco import MuJoCoES

    # MuJoCoES adopts the env, network and observation statistics stored with the policy.
    worker = offline_worker(MuJoCoES, load_state(path))
    return float(worker.evaluate_episodes(worker.center_policy(), episodes).returns.mean())


def agrees(claimed: float, measured: float, tolerance: float = TOLERANCE) -> bool:
    """Whether `measured` reproduces `claimed`: within `tolerance` of it (relative), or equal
    up to result.json's rounding to 0.1."""
    return abs(measured - claimed) <= max(tolerance * abs(claimed), 0.05 + 1e-9)


def check(env: str, root: Path = RESULTS, tolerance: float = TOLERANCE) -> int:
    """Evaluates every committed policy file of `env` under `root` on the fixed evaluation
    episodes and compares with its result.json. 0: all agree; 1: one does not; 2: none."""
    from benchmarks.results_table import find_results

    results = [
        r for r in find_results(root) if r.env == env and (r.path / "policy.safetensors").exists()
    ]
    if not results:
        print(f"error: no policy.safetensors of {env} under {root}", file=sys.stderr)
        return 2
    # Each policy file carries its env settings, which the evaluating worker adopts by design:
    # its notice about adopting them would only interleave with the check's lines.
    logging.getLogger("evochi_torch.gym").setLevel(logging.ERROR)
    failed = 0
    for r in results:
        measured = evaluate_policy(r.path / "policy.safetensors")
        ok = agrees(r.ret, measured, tolerance)
        failed += not ok
        where = r.path.relative_to(root) if r.path.is_relative_to(root) else r.path
        print(f"check {where} env={env} strategy={r.strategy} seed={r.seed} claimed={r.ret:.1f} "
              f"return={measured:.1f} diff={measured - r.ret:+.1f} {'ok' if ok else 'DIFFERS'}",
              flush=True)  # fmt: skip
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = ["python", "-m", "benchmarks.mujoco", *argv]
    if argv[:1] == ["--summarize"]:
        runs_dir = Path(argv[1])
        out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else runs_dir
        summarize(runs_dir, out)
        return 0
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.mujoco",
        description="\n\n".join(__doc__.split("\n\n")[:2]),
        epilog="Arguments after -- go to `python -m examples.mujoco ENV[/STRATEGY]`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--env", default="HalfCheetah-v5", help="default %(default)s")
    parser.add_argument(
        "--strategy",
        default="openai_es",
        choices=STRATEGIES,
        help="the example's ENV/STRATEGY preset (default %(default)s)",
    )
    parser.add_argument(
        "--env-steps",
        type=int,
        default=10_000_000,
        help="budget: training + statistics episodes (default %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="ES seed (default %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=Path("runs/benchmarks"),
        help="where the run directories go (default %(default)s)",
    )
    parser.add_argument(
        "--limit-seconds",
        type=float,
        default=3.0,
        help="after the run, time the env's raw env.step (3 repeats of this "
        "many seconds, benchmarks.mujoco_limit) into meta.json; 0: skip",
    )
    parser.add_argument("--table", action="store_true", help="every strategy x env (resumable)")
    parser.add_argument("--envs", default=",".join(SETTINGS), help="--table's envs")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="--table's rows")
    parser.add_argument("--summarize", action="store_true", help="with --table: print only")
    parser.add_argument("--out", type=Path, help="with --table: curves and CSVs go here")
    parser.add_argument(
        "--check",
        metavar="ENV",
        default=None,
        help="evaluate the committed policy files of ENV under --results on the "
        "10 fixed evaluation episodes and compare with their result.json; "
        "exit 1 if one differs by more than --tolerance",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="--check's results (default benchmarks/results/mujoco)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=TOLERANCE,
        help="--check's relative tolerance (default %(default)s: the same mujoco wheel and"
        " glibc reproduce a return exactly on any x86 CPU with FMA, another build rounds"
        " differently)",
    )
    args = parser.parse_args(argv)
    if args.check is not None:
        return check(args.check, args.results, args.tolerance)
    if not args.table:
        try:
            bench(args.env, args.strategy, args.seed, args.env_steps, args.workers,
                  args.runs_dir, extra, command, args.limit_seconds)  # fmt: skip
        except KeyboardInterrupt:  # no result is recorded; the trainer said what was kept
            return 130
        return 0
    envs, strategies = args.envs.split(","), args.strategies.split(",")
    runs_dir = args.runs_dir / f"table-{args.env_steps}"
    if not args.summarize:
        done = finished(runs_dir, args.seed) if runs_dir.exists() else {}
        for env in envs:
            for s in strategies:
                if (s, env) in done:
                    continue
                print(f"mujoco table: {s} on {env}", flush=True)
                bench(env, s, args.seed, args.env_steps, args.workers, runs_dir, extra, command,
                      args.limit_seconds)  # fmt: skip
    table(runs_dir, envs, strategies, args.seed, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
