"""Results tables generated from result directories, never typed by hand, with their cost.

    python -m benchmarks.results_table table benchmarks/results/mujoco            # markdown table
    python -m benchmarks.results_table table benchmarks/results/mujoco --plots    # + curves.png
    python -m benchmarks.results_table table benchmarks/results/mujoco --only '*/1e7*'  # some rows
    python -m benchmarks.results_table table runs/benchmarks                      # fresh runs
    python -m benchmarks.results_table collect runs/benchmarks/HalfCheetah-v5-ars-s0 \\
        --into benchmarks/results/mujoco/HalfCheetah-v5/ars/1e7

A *result directory* is a run directory of `python -m benchmarks.mujoco` or the part of one
that is kept in the repository:

* ``result.json``: env, strategy, seed, env_steps, seconds (training wall-clock) and return
  (the final center policy's mean true return over the 10 fixed evaluation episodes);
* ``meta.json``: how and where it was made: the exact command, the commit, the machine (CPU
  model, cores), the library versions, the worker processes and cores the run used, and the
  single-process ``env.step`` limit of its env on that machine (`benchmarks.mujoco_limit`).
  A field that was not recorded reads "unrecorded" (or null), never a guess;
* ``metrics.csv``: the per-epoch rows (curves); ``config.json``: the trainer's record;
* ``policy.safetensors`` (optional): the final center policy, checked by
  ``python -m benchmarks.mujoco --check ENV``.

`table` finds every result.json under the root; the result directories of one (parent
directory, env, strategy) make one row, seeds side by side: env steps, wall-clock and
core-minutes (medians over seeds), the run's env steps/s as a fraction of the env's limit on
the same machine, the return of each seed and their median. `--plots` draws each row's
curves (center return against env steps and against wall-clock) into ``curves.png`` beside
its seeds. Below it, for the envs with a target return (`TARGETS`, `--target`), each seed's
env steps, wall-clock and core-minutes at the first epoch whose center return reached it.
`collect` copies a run directory's kept part into a result directory and writes
its policy file.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import shutil
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.mujoco_limit import core_minutes, fraction_of_limit
from benchmarks.provenance import UNRECORDED

#: metrics.csv columns under the names that older run directories used.
CSV_ALIASES = {"center_return": "center_score", "pop_mean": "reward_mean",
               "pop_max": "reward_max", "exact_steps": "env_steps_exact"}  # fmt: skip


# --------------------------------------------------------------------------- reading
@dataclass
class Result:
    """One run: result.json, meta.json and where its metrics are."""

    path: Path
    env: str
    strategy: str
    seed: int
    env_steps: int
    seconds: float
    ret: float
    meta: dict[str, Any]

    @property
    def cores(self) -> int | None:
        cores = self.meta.get("cores_used")
        return cores if isinstance(cores, int) else None

    @property
    def limit(self) -> float | None:
        limit = self.meta.get("limit")
        rate = limit.get("steps_per_s") if isinstance(limit, dict) else None
        return float(rate) if isinstance(rate, int | float) and rate > 0 else None

    @property
    def core_minutes(self) -> float | None:
        return None if self.cores is None else core_minutes(self.seconds, self.cores)

    @property
    def fraction(self) -> float | None:
        if self.limit is None:
            return None
        return fraction_of_limit(self.env_steps, self.seconds, self.limit)

    def first_reach(self, target: float) -> tuple[int, float] | None:
        """(env steps, seconds) at the first epoch whose center return (that epoch's
        evaluation episode) reaches `target`; None if none does."""
        for steps, seconds, ret in zip(*self.curve(), strict=True):
            if ret >= target:
                return steps, seconds
        return None

    def curve(self) -> tuple[list[int], list[float], list[float]]:
        """(env steps, seconds, center return) of the epochs that have a center return."""
        steps, seconds, returns = [], [], []
        with open(self.path / "metrics.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                row = {CSV_ALIASES.get(k, k): v for k, v in row.items()}
                if row.get("center_score") not in (None, ""):
                    steps.append(int(row["env_steps"]))
                    seconds.append(float(row["seconds"]))
                    returns.append(float(row["center_score"]))
        return steps, seconds, returns


def read_result(path: Path) -> Result:
    """The result directory `path` (result.json; meta.json when present)."""
    record = json.loads((path / "result.json").read_text())
    meta_path = path / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return Result(
        path,
        record["env"],
        record.get("strategy", "openai_es"),
        int(record["seed"]),
        int(record["env_steps"]),
        float(record["seconds"]),
        float(record["return"]),
        meta,
    )


def find_results(root: Path) -> list[Result]:
    """Every result directory under `root` (or `root` itself), in path order."""
    paths = sorted({p.parent for p in Path(root).rglob("result.json")})
    return [read_result(p) for p in paths]


@dataclass
class Row:
    """The results of one (parent directory, env, strategy): one table row."""

    label: str
    where: Path
    results: list[Result]


def group(results: Sequence[Result], root: Path) -> list[Row]:
    """One row per (parent directory, env, strategy), seeds in order."""
    rows: dict[tuple[Path, str, str], list[Result]] = {}
    for r in results:
        rows.setdefault((r.path.parent, r.env, r.strategy), []).append(r)
    out = []
    for (parent, env, strategy), members in rows.items():
        try:
            label = parent.relative_to(root).as_posix()
        except ValueError:
            label = parent.as_posix()
        if label in ("", "."):
            label = f"{env}/{strategy}"
        elif env not in label:  # a flat runs directory: every env and strategy side by side
            label = f"{label}: {env}/{strategy}"
        out.append(Row(label, parent, sorted(members, key=lambda r: r.seed)))
    return sorted(out, key=lambda row: row.label)


# --------------------------------------------------------------------------- the table
def _median(values: Sequence[float | None]) -> float | None:
    """The median, or None when any seed's value was not recorded (a partial median would
    pass for the row's)."""
    if not values or any(v is None for v in values):
        return None
    return float(statistics.median(values))  # type: ignore[type-var]


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return UNRECORDED if value is None else f"{value:{spec}}{suffix}"


def _commit(results: Sequence[Result]) -> str:
    """The seeds' commit, short; ``+`` marks a tree with uncommitted changes."""
    found = set()
    for r in results:
        sha = r.meta.get("commit")
        if not isinstance(sha, str) or sha == UNRECORDED:
            return UNRECORDED
        found.add(sha[:7] + ("+" if r.meta.get("dirty") else ""))
    return found.pop() if len(found) == 1 else "several"


HEADER = (
    "| result | strategy | seeds | env steps | wall-clock | core-min | env steps/s "
    "| of env.step limit | return per seed | median | commit |"
)


def table_row(row: Row) -> str:
    """One markdown row: medians over seeds of steps, time, cost, speed; every seed's return."""
    rs = row.results
    steps = _median([r.env_steps for r in rs])
    seconds = _median([r.seconds for r in rs])
    rate = _median([r.env_steps / r.seconds for r in rs])
    cells = [
        row.label,
        rs[0].strategy,
        ", ".join(str(r.seed) for r in rs),
        _fmt(steps, ",.0f"),
        _fmt(seconds, ".0f", " s"),
        _fmt(_median([r.core_minutes for r in rs]), ".0f"),
        _fmt(rate, ",.0f"),
        _fmt(_median([r.fraction for r in rs]), ".2f"),
        ", ".join(f"{r.ret:.0f}" for r in rs),
        f"**{statistics.median(r.ret for r in rs):.0f}**",
        _commit(rs),
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(rows: Sequence[Row]) -> str:
    """The table: a header and one line per row."""
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    lines += [table_row(row) for row in rows]
    return "\n".join(lines) + "\n"


#: Returns whose first reaching is tabulated with its cost: the published bars of an env.
TARGETS = {"Humanoid-v5": 6000.0}

REACH_HEADER = "| result | target | per seed: env steps, wall-clock, core-min to first reach it |"


def reach_row(row: Row, target: float) -> str:
    """One markdown row: for every seed, the cost of its first epoch at `target` or above."""
    cells = []
    for r in row.results:
        hit = r.first_reach(target)
        if hit is None:
            steps, _, returns = r.curve()
            best = max(returns, default=float("nan"))
            cells.append(f"s{r.seed}: not reached in {r.env_steps:,} (best {best:.0f})")
            continue
        steps, seconds = hit
        cost = None if r.cores is None else core_minutes(seconds, r.cores)
        cells.append(f"s{r.seed}: {steps:,}, {seconds:.0f} s, {_fmt(cost, '.0f')} core-min")
    return f"| {row.label} | {target:.0f} | " + "; ".join(cells) + " |"


def reach_markdown(rows: Sequence[Row], targets: dict[str, float]) -> str:
    """The first-reach table of the rows whose env has a target ('' when none has)."""
    lines = [reach_row(row, targets[row.results[0].env]) for row in rows
             if row.results[0].env in targets]  # fmt: skip
    if not lines:
        return ""
    return "\n".join([REACH_HEADER, "|---|---|---|", *lines]) + "\n"


def plot(row: Row, path: Path) -> Path:
    """The row's curves, one line per seed: center return against env steps (left) and
    against wall-clock minutes (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_steps, by_time) = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
    for r in row.results:
        steps, seconds, returns = r.curve()
        by_steps.plot(steps, returns, lw=1, label=f"seed {r.seed}")
        by_time.plot([s / 60 for s in seconds], returns, lw=1, label=f"seed {r.seed}")
    by_steps.set(xlabel="env steps", ylabel="center-policy return")
    by_time.set(xlabel="wall-clock minutes (training)")
    by_steps.legend(loc="lower right", fontsize=8)
    fig.suptitle(row.label)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def table(
    root: Path,
    plots: bool = False,
    only: Sequence[str] = (),
    targets: dict[str, float] | None = None,
) -> str:
    """The markdown table of every result under `root` (of the rows whose label matches one of
    the glob patterns `only`, when given), then the cost of first reaching each env's target
    (`TARGETS` by default); with `plots`, each row's curves."""
    targets = TARGETS if targets is None else targets
    rows = group(find_results(root), Path(root))
    if only:
        rows = [row for row in rows if any(fnmatch.fnmatchcase(row.label, p) for p in only)]
    if plots:
        for row in rows:
            plot(row, row.where / "curves.png")
    reach = reach_markdown(rows, targets)
    return markdown(rows) + ("\n" + reach if reach else "")


# --------------------------------------------------------------------------- collecting
KEPT = ("result.json", "meta.json", "metrics.csv", "config.json")


def collect(run_dir: Path, into: Path, policy: bool = True) -> Path:
    """Copies `run_dir`'s kept files into ``into/s<seed>/`` and, with `policy`, writes the
    final center policy there (the training state without its optimizer state: what an
    evaluation needs, a fraction of the checkpoint). Returns the result directory."""
    run_dir = Path(run_dir)
    if not (run_dir / "result.json").exists():
        raise FileNotFoundError(f"{run_dir} has no result.json: not a finished benchmark run")
    record = json.loads((run_dir / "result.json").read_text())
    target = Path(into) / f"s{record['seed']}"
    target.mkdir(parents=True, exist_ok=True)
    for name in KEPT:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, target / name)
    if policy:
        write_policy(run_dir / "checkpoint.safetensors", target / "policy.safetensors")
    return target


def write_policy(checkpoint: Path, out: Path) -> Path:
    """`checkpoint` without its optimizer state: the center parameters, the observation
    statistics and the env settings that an evaluation reads."""
    import dataclasses

    from evochi_torch.codec import load_checkpoint, save_checkpoint

    state = load_checkpoint(checkpoint)
    return save_checkpoint(out, dataclasses.replace(state, opt_state={}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.results_table",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "table",
        help="print the markdown table of every result under ROOT",
        description="One row per (directory, env, strategy): env steps, "
        "wall-clock, core-minutes, env steps/s and its fraction of the env's "
        "single-process env.step limit (medians over seeds), every seed's return "
        "and the median. 'unrecorded' where a result does not say.",
    )
    t.add_argument("root", type=Path, help="a results tree or a runs directory")
    t.add_argument(
        "--plots",
        action="store_true",
        help="also draw each row's curves.png (return by env steps and by time)",
    )
    t.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="GLOB",
        help="only rows whose label (the directory under ROOT) matches, e.g. '*/1e7'; "
        "may be repeated",
    )
    t.add_argument("--out", type=Path, default=None, help="write the table here too")
    t.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="ENV=RETURN",
        help="tabulate the cost of first reaching RETURN on ENV (default: "
        + ", ".join(f"{k}={v:.0f}" for k, v in TARGETS.items())
        + "); may be repeated",
    )
    c = sub.add_parser(
        "collect",
        help="copy benchmark runs into a result directory",
        description="Copies each RUN_DIR's result.json, meta.json, metrics.csv, "
        "config.json into INTO/s<seed>/ and writes policy.safetensors (the final "
        "center policy without optimizer state).",
    )
    c.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    c.add_argument(
        "--into", type=Path, required=True, help="e.g. benchmarks/results/mujoco/ENV/STRATEGY/1e7"
    )
    c.add_argument("--no-policy", action="store_true", help="do not write policy.safetensors")
    args = parser.parse_args(argv)
    if args.command == "collect":
        for run_dir in args.run_dirs:
            print(f"wrote {collect(run_dir, args.into, policy=not args.no_policy)}/")
        return 0
    if not args.root.exists():
        parser.error(f"{args.root} does not exist")
    targets = dict(TARGETS)
    for spec in args.target:
        env, sep, value = spec.partition("=")
        try:
            targets[env] = float(value)
        except ValueError:
            parser.error(f"--target wants ENV=RETURN, got {spec!r}")
        if not sep or not env:
            parser.error(f"--target wants ENV=RETURN, got {spec!r}")
    text = table(args.root, plots=args.plots, only=args.only, targets=targets)
    print(text, end="")
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
