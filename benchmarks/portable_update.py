"""Benchmark: what the CPU-independent update costs, per strategy, against the same update with
the libraries' CPU-dispatched kernels.

Baseline ("dispatched"): the update as it is, except that the functions of
:mod:`evochi_torch.portable` are swapped for the library kernels they replace: ``torch.sqrt``
(MKL's vector math), NumPy's ``exp`` and ``log`` (AVX-512 kernels where the CPU has them) and a
NumPy ``sum`` for norms. Both variants run side by side in this process, interleaved, and the
median step time of each is printed with their ratio.

    python -m benchmarks.portable_update [--params 1000000] [--population 100] [--repeats 7]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from collections.abc import Iterator

import numpy as np
import torch

from evochi_torch import ESConfig, optim, portable
from evochi_torch.functional import NoiseTable
from evochi_torch.strategies import STRATEGIES, get_strategy


def _dispatched_norm(x: torch.Tensor | np.ndarray) -> float:
    a = np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    return math.sqrt(float(np.sum(a * a)))


@contextlib.contextmanager
def dispatched_kernels() -> Iterator[None]:
    """The update with the library kernels that the portable functions replace."""
    swaps = [
        (optim, "sqrt32", torch.sqrt),
        (optim, "norm", _dispatched_norm),
        (portable, "norm", _dispatched_norm),
        (portable, "exp", np.exp),
        (portable, "log", np.log),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in swaps]
    try:
        for mod, name, fn in swaps:
            setattr(mod, name, fn)
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)


def bench(strategy: str, p: int, npop: int, repeats: int) -> tuple[float, float]:
    config = ESConfig(population_size=npop, strategy=strategy, sigma=0.05, seed=0)
    s = get_strategy(strategy)
    params = torch.zeros(p)
    table = NoiseTable.for_config(config, p)
    state = s.init(config, params)
    rewards = np.random.default_rng(0).normal(size=npop)
    s.tell(config, params, state, rewards, 0, table)  # warm-up: page faults, caches
    times: dict[str, list[float]] = {"portable": [], "dispatched": []}
    for r in range(repeats):
        # Alternate which variant goes first: the second one of a pair finds warmer caches.
        for kind in sorted(times, reverse=bool(r % 2)):
            ctx = dispatched_kernels() if kind == "dispatched" else contextlib.nullcontext()
            with ctx:
                t0 = time.perf_counter()
                s.tell(config, params, state, rewards, 0, table)
                times[kind].append(time.perf_counter() - t0)
    return statistics.median(times["portable"]), statistics.median(times["dispatched"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=1_000_000, help="parameters P")
    parser.add_argument("--population", type=int, default=100, help="population size")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per variant")
    parser.add_argument("--strategies", default=",".join(sorted(STRATEGIES)))
    args = parser.parse_args(argv)
    print(f"update step, P={args.params}, population {args.population}, "
          f"torch threads {torch.get_num_threads()}, median of {args.repeats}")  # fmt: skip
    print(f"{'strategy':<10} {'portable s':>11} {'dispatched s':>13} {'ratio':>7}")
    for name in args.strategies.split(","):
        ours, base = bench(name, args.params, args.population, args.repeats)
        print(f"{name:<10} {ours:>11.4f} {base:>13.4f} {ours / base:>7.3f}")


if __name__ == "__main__":
    main()
