"""Time to solve CartPole-v1 with the example's defaults, over several seeds.

    python -m benchmarks.cartpole_solve [--seeds 5] [--workers 2]

`seconds` is training time (first epoch to solved, as the example reports it); `wall` adds
process start-up (spawning workers, importing torch) for the whole run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from examples.cartpole.cartpole import Args, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            started = time.perf_counter()
            result = run(Args(seed=seed, workers=args.workers, runs_dir=Path(tmp), quiet=True))
            wall = time.perf_counter() - started
            rows.append((result["epoch"], result["env_steps"], result["seconds"], wall))
            status = "solved" if result["solved"] else "NOT SOLVED"
            print(
                f"cartpole_solve seed={seed} epochs={result['epoch']} "
                f"env_steps={result['env_steps']} seconds={result['seconds']:.2f} "
                f"wall={wall:.2f} {status}",
                flush=True,
            )
    epochs, steps, seconds, wall = (statistics.median(col) for col in zip(*rows, strict=True))
    print(
        f"cartpole_solve median epochs={epochs:g} env_steps={steps:g} seconds={seconds:.2f} "
        f"wall={wall:.2f} (workers={args.workers}, seeds={args.seeds})"
    )


if __name__ == "__main__":
    main()
