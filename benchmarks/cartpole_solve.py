"""Time to solve CartPole-v1 with the example's defaults, over several seeds.

    python -m benchmarks.cartpole_solve [--seeds 5] [--workers 2] [--baseline DIR]

`seconds` is training time (first epoch to solved, as the example reports it); `wall` adds
process start-up (spawning workers, importing torch) for the whole run. `--baseline DIR` also
runs DIR's own `benchmarks.cartpole_solve` (e.g. `git archive main | tar -x -C DIR`), after
this one, on the same machine, and prints the ratios of the medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from evochi_torch.harness import RunConfig
from examples.cartpole.cartpole import Args, CartPole, run

MEDIAN = re.compile(r"median epochs=(\S+) env_steps=(\S+) seconds=(\S+) wall=(\S+)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--baseline", type=Path, default=None, help="a checkout to compare with")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            started = time.perf_counter()
            settings = RunConfig(max_epochs=200, target=475.0, runs_dir=Path(tmp),
                                 workers=args.workers, quiet=True)  # fmt: skip
            es = dataclasses.replace(CartPole.default_config, seed=seed)
            result = run(Args(es=es, run=settings))
            wall = time.perf_counter() - started
            last = result.last
            rows.append((last["epoch"], last["env_steps"], last["seconds"], wall))
            status = "solved" if result.stopped_by == "target" else "NOT SOLVED"
            print(
                f"cartpole_solve seed={seed} epochs={last['epoch']} "
                f"env_steps={last['env_steps']} seconds={last['seconds']:.2f} "
                f"wall={wall:.2f} {status}",
                flush=True,
            )
    medians = [statistics.median(col) for col in zip(*rows, strict=True)]
    epochs, steps, seconds, wall = medians
    print(
        f"cartpole_solve median epochs={epochs:g} env_steps={steps:g} seconds={seconds:.2f} "
        f"wall={wall:.2f} (workers={args.workers}, seeds={args.seeds})",
        flush=True,
    )
    if args.baseline is not None:
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.cartpole_solve", "--seeds", str(args.seeds),
             "--workers", str(args.workers)],
            cwd=args.baseline, capture_output=True, text=True, check=True,
        )  # fmt: skip
        print("baseline: " + out.stdout.strip().replace("\n", "\nbaseline: "))
        base = [float(v) for v in MEDIAN.search(out.stdout).groups()]
        print("cartpole_solve ratio (this / baseline) " + " ".join(
            f"{name}={new / old:.2f}" for name, new, old in
            zip(("epochs", "env_steps", "seconds", "wall"), medians, base, strict=True)
        ))  # fmt: skip


if __name__ == "__main__":
    main()
