"""Benchmark: every strategy on sphere / Rastrigin / Rosenbrock, and its update-step cost.

Part 1 (search quality): each strategy minimises each function at each dimension with the same
population and the same evaluation budget, starting from the same point; it prints the
evaluations needed to reach the function's target (``inf``: not within the budget) next to the
reference library's implementation of the same strategy where one is installed (pycma's
``CMA_diagonal`` for sep_cma: ``pip install -e '.[bench]'``; EvoTorch is not used: it pulls
ray and pandas)::

    strategies fn=sphere d=100 strategy=sep_cma evals_to_target=N ref_evals_to_target=M ratio=R

Part 2 (cost): one update at ``npop=1000, P=1,000,000`` for every strategy, side by side with
today's OpenAI-ES step (``es_step`` with Adam), interleaved repeats, median::

    strategies update npop=1000 params=1000000 strategy=snes seconds=S openai_es_seconds=B ratio=R

    python -m benchmarks.strategies [--dims 100,10000] [--fns sphere,rastrigin,rosenbrock]
        [--budget-per-dim 300] [--update-params 1000000] [--skip-search] [--skip-update]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from evochi_torch import ESConfig, get_strategy
from evochi_torch.functional import NoiseTable, ask

STRATEGY_NAMES = ["openai_es", "pgpe", "snes", "sep_cma", "ars", "cem"]


def sphere(x: torch.Tensor) -> torch.Tensor:
    return (x * x).sum(-1)


def rastrigin(x: torch.Tensor) -> torch.Tensor:
    return 10 * x.shape[-1] + (x * x - 10 * torch.cos(2 * math.pi * x)).sum(-1)


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (100 * (x[..., 1:] - x[..., :-1] ** 2) ** 2 + (1 - x[..., :-1]) ** 2).sum(-1)


#: name -> (function, start value of every coordinate, initial sigma, target of f / d).
#: Targets: sphere 1e-4 per coordinate from 1 (f0/d = 1); Rastrigin 5 per coordinate from 2.5
#: (f0/d = 26.25, i.e. most coordinates in the basins around 0/+-1); Rosenbrock 0.5 from 0
#: (f0/d ~ 1, i.e. halfway down the valley).
PROBLEMS = {
    "sphere": (sphere, 1.0, 0.5, 1e-4),
    "rastrigin": (rastrigin, 2.5, 0.5, 5.0),
    "rosenbrock": (rosenbrock, 0.0, 0.1, 0.5),
}


def population_size(d: int) -> int:
    return 50 if d <= 1000 else 100


def evals_to_target(
    fn: str, d: int, strategy: str, budget: int, seed: int = 1, antithetic: bool = True
) -> tuple[float, float]:
    """(evaluations until f(center) <= target, best f(center)/d) of one of our strategies."""
    f, x0, sigma, target = PROBLEMS[fn]
    npop = population_size(d)
    config = ESConfig(
        population_size=npop, strategy=strategy, sigma=sigma, seed=seed, antithetic=antithetic
    )
    s = get_strategy(strategy)
    x = torch.full((d,), x0, dtype=torch.float32)
    table = NoiseTable.for_config(config, d)
    state = s.init(config, x)
    best = float(f(x.double())) / d
    for epoch in range(budget // npop):
        pop = ask(config, x, state, epoch, table)
        x, state = s.update(x, state, -f(pop.double()).numpy(), epoch, table, config)
        value = float(f(x.double())) / d
        best = min(best, value)
        if not math.isfinite(value):
            break
        if value <= target:
            return float((epoch + 1) * npop), best
    return math.inf, best


def pycma_evals_to_target(
    fn: str, d: int, budget: int, seed: int = 1
) -> tuple[float, float] | None:
    """pycma's sep-CMA-ES (CMA_diagonal) on the same problem: (evaluations to target, best
    f(mean)/d), or None without pycma."""
    try:
        import cma
    except ImportError:
        return None
    f, x0, sigma, target = PROBLEMS[fn]
    npop = population_size(d)
    es = cma.CMAEvolutionStrategy(
        [x0] * d,
        sigma,
        {"CMA_diagonal": True, "popsize": npop, "seed": seed, "verbose": -9,
         "maxfevals": budget, "tolfun": 0, "tolx": 0, "tolflatfitness": 10**9},
    )  # fmt: skip
    evals = 0
    best = math.inf
    while evals < budget:
        xs = es.ask()
        values = f(torch.as_tensor(np.asarray(xs), dtype=torch.float64)).numpy()
        es.tell(xs, values.tolist())
        evals += npop
        # The same criterion as ours: the distribution's mean, not the best sample.
        mean = torch.as_tensor(np.asarray(es.mean), dtype=torch.float64)
        value = float(f(mean)) / d
        best = min(best, value)
        if value <= target:
            return float(evals), best
    return math.inf, best


def search(dims: list[int], fns: list[str], budget_per_dim: int, strategies: list[str]) -> None:
    for d in dims:
        budget = max(budget_per_dim * d, 20_000) if d <= 1000 else budget_per_dim * 10 * 1000
        for fn in fns:
            ref = pycma_evals_to_target(fn, d, budget)
            # sep_cma also without mirrored sampling: pycma samples independently.
            variants = [(n, True) for n in strategies]
            if "sep_cma" in strategies:
                variants.insert(strategies.index("sep_cma") + 1, ("sep_cma", False))
            for strategy, antithetic in variants:
                t0 = time.perf_counter()
                evals, best = evals_to_target(fn, d, strategy, budget, antithetic=antithetic)
                label = strategy if antithetic else f"{strategy}(antithetic=False)"
                ref_evals, ref_best = (
                    ref if ref is not None and strategy == "sep_cma" else (None, None)
                )
                ref_best_s = "n/a" if ref_best is None else f"{ref_best:.3g}"
                if ref_evals is None:
                    ref_s, ratio = "n/a", "n/a"
                else:
                    ref_s = f"{ref_evals:.0f}"
                    ratio = f"{evals / ref_evals:.2f}" if math.isfinite(ref_evals) else "n/a"
                print(
                    f"strategies fn={fn} d={d} strategy={label} evals_to_target={evals:.0f} "
                    f"ref_evals_to_target={ref_s} ratio={ratio} budget={budget} "
                    f"npop={population_size(d)} best_f_per_dim={best:.3g} "
                    f"ref_best_f_per_dim={ref_best_s} "
                    f"({time.perf_counter() - t0:.1f}s)",
                    flush=True,
                )


def update_cost(num_params: int, npop: int, repeats: int, strategies: list[str]) -> None:
    t0 = time.perf_counter()
    table = NoiseTable.for_params(0, num_params)
    print(f"# noise table: {table.size} floats in {time.perf_counter() - t0:.1f}s", flush=True)
    rng = np.random.default_rng(0)
    setups = {}
    for name in strategies:
        config = ESConfig(population_size=npop, strategy=name, seed=0)
        params = torch.randn(num_params, generator=torch.Generator().manual_seed(0))
        setups[name] = (config, params, get_strategy(name).init(config, params))
    times: dict[str, list[float]] = {name: [] for name in strategies}
    for r in range(repeats):
        rewards = rng.normal(size=npop)
        for name in strategies:  # interleaved: load changes hit every strategy alike
            config, params, state = setups[name]
            t = time.perf_counter()
            get_strategy(name).update(params, state, rewards, r, table, config)
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["openai_es"])
    for name in strategies:
        med = statistics.median(times[name])
        print(
            f"strategies update npop={npop} params={num_params} strategy={name} "
            f"seconds={med:.3f} openai_es_seconds={base:.3f} ratio={med / base:.2f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dims", default="100,10000", help="dimensions (default 100,10000)")
    parser.add_argument("--fns", default="sphere,rastrigin,rosenbrock")
    parser.add_argument("--strategies", default=",".join(STRATEGY_NAMES))
    parser.add_argument(
        "--budget-per-dim",
        type=int,
        default=300,
        help="evaluation budget per dimension at d <= 1000 (at least 20,000); larger d get "
        "10x this per 1000 dimensions. Default 300 (30,000 evals at d=100, 3,000,000 at 10,000)",
    )
    parser.add_argument("--update-params", type=int, default=1_000_000)
    parser.add_argument("--update-npop", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--skip-update", action="store_true")
    args = parser.parse_args()
    strategies = args.strategies.split(",")
    if not args.skip_update:
        names = ["openai_es", *[s for s in strategies if s != "openai_es"]]
        update_cost(args.update_params, args.update_npop, args.repeats, names)
    if not args.skip_search:
        dims = [int(d) for d in args.dims.split(",")]
        search(dims, args.fns.split(","), args.budget_per_dim, strategies)


if __name__ == "__main__":
    main()
