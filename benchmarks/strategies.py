"""Benchmark: every strategy on sphere / Rastrigin / Rosenbrock, and its update-step cost.

Part 1 (search quality): each strategy minimises each function at each dimension with the same
population and the same evaluation budget, starting from the same point; it prints the
evaluations needed to reach the function's target (``inf``: not within the budget) next to the
reference library's implementation of the same strategy where one is installed
(``pip install -e '.[bench]'``): pycma's ``CMA_diagonal`` for sep_cma, EvoTorch for pgpe, snes
and cem, configured with our strategy's defaults. Where the reference cannot express one of
our defaults, a ``# reference`` line says so and an extra row runs ours with the reference's
setting (e.g. ``snes(antithetic=False)``)::

    strategies fn=sphere d=100 strategy=sep_cma evals_to_target=N ref_evals_to_target=M ratio=R

Part 2 (cost): one update at ``npop=1000, P=1,000,000`` for every strategy, side by side with
today's OpenAI-ES step (``es_step`` with Adam), interleaved repeats, median::

    strategies update npop=1000 params=1000000 strategy=snes seconds=S openai_es_seconds=B ratio=R

    python -m benchmarks.strategies [--dims 100,10000] [--fns sphere,rastrigin,rosenbrock]
        [--budget-per-dim 300] [--seeds 1] [--update-params 1000000] [--skip-search]
        [--skip-update]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import statistics
import time
from collections.abc import Callable

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
    fn: str,
    d: int,
    strategy: str,
    budget: int,
    seed: int = 1,
    antithetic: bool = True,
    options: dict[str, float] | None = None,
) -> tuple[float, float]:
    """(evaluations until f(center) <= target, best f(center)/d) of one of our strategies."""
    f, x0, sigma, target = PROBLEMS[fn]
    npop = population_size(d)
    config = ESConfig(
        population_size=npop, strategy=strategy, sigma=sigma, seed=seed, antithetic=antithetic,
        strategy_options=dict(options or {}),
    )  # fmt: skip
    s = get_strategy(strategy)
    x = torch.full((d,), x0, dtype=torch.float32)
    table = NoiseTable.for_config(config, d)
    state = s.init(config, x)
    best = float(f(x.double())) / d
    for epoch in range(budget // npop):
        pop = ask(config, x, state, epoch, table)
        x, state = s.tell(config, x, state, -f(pop.double()).numpy(), epoch, table)
        value = float(f(x.double())) / d
        best = min(best, value)
        if not math.isfinite(value):
            break
        if value <= target:
            return float((epoch + 1) * npop), best
    return math.inf, best


#: Our strategy -> the reference library that implements it (``pip install -e '.[bench]'``).
REFERENCE_LIBRARY = {"sep_cma": "pycma", "pgpe": "evotorch", "snes": "evotorch", "cem": "evotorch"}
#: Reference library -> its distribution name (for the version in the ``# reference`` lines).
LIBRARY_PACKAGE = {"pycma": "cma", "evotorch": "evotorch"}

#: What the reference cannot express of our defaults: printed before the results, so that a
#: ratio is never read as "same settings" when it is not.
REFERENCE_DIFFERENCES = {
    "sep_cma": "pycma CMA_diagonal with CSA step sizes (its default at large d is TPA); "
    "samples independently (no mirrored pairs)",
    "pgpe": "EvoTorch functional pgpe (symmetric, centered ranks, ClipUp with our lr, "
    "max_speed and momentum, our stdev lr and max change): the same settings",
    "snes": "EvoTorch's SNES distribution (ExpSeparableGaussian, nes ranking, the same lr and "
    "sigma lr); samples independently (no mirrored pairs)",
    "cem": "EvoTorch functional cem (elite fraction 0.5); no std smoothing (std = elite std), "
    "elite std with Bessel's correction (/(E-1)), elite count floor (ours: round), "
    "samples independently (no mirrored pairs)",
}

#: The extra row of ours that drops what the reference cannot express (see
#: REFERENCE_DIFFERENCES): strategy -> (antithetic, strategy_options).
SAME_AS_REFERENCE: dict[str, tuple[bool, dict[str, float]]] = {
    "sep_cma": (False, {}),
    "snes": (False, {}),
    "cem": (False, {"std_smoothing": 1.0}),
}

#: One generation of a reference implementation (ask, evaluate, tell) -> its new center.
Step = Callable[[], torch.Tensor]


def run_reference(step: Step, fn: str, d: int, budget: int) -> tuple[float, float]:
    """(evaluations until f(center) <= target, best f(center)/d) of a reference ``step``, with
    the stopping rule of :func:`evals_to_target`: the distribution's center, not the best
    sample, and as many generations as ours."""
    f, _, _, target = PROBLEMS[fn]
    npop = population_size(d)
    best = math.inf
    for generation in range(budget // npop):
        value = float(f(step().double())) / d
        best = min(best, value)
        if not math.isfinite(value):
            break
        if value <= target:
            return float((generation + 1) * npop), best
    return math.inf, best


def pycma_step(fn: str, d: int, seed: int) -> Step | None:
    """pycma's sep-CMA-ES (CMA_diagonal) from our start point, sigma and population; None
    without pycma."""
    try:
        import cma
    except ImportError:
        return None
    f, x0, sigma, _ = PROBLEMS[fn]
    es = cma.CMAEvolutionStrategy(
        [x0] * d,
        sigma,
        # CSA, sep-CMA-ES's step-size rule: pycma's default switches to its two-point rule
        # (TPA) from d = cma.evolution_strategy.TPA_dimension on, another algorithm.
        {"CMA_diagonal": True, "popsize": population_size(d), "seed": seed, "verbose": -9,
         "tolfun": 0, "tolx": 0, "tolflatfitness": 10**9,
         "AdaptSigma": cma.sigma_adaptation.CMAAdaptSigmaCSA},
    )  # fmt: skip

    def step() -> torch.Tensor:
        xs = es.ask()
        es.tell(xs, f(torch.as_tensor(np.asarray(xs), dtype=torch.float64)).tolist())
        return torch.as_tensor(np.asarray(es.mean), dtype=torch.float64)

    return step


def evotorch_step(strategy: str, fn: str, d: int, seed: int) -> Step | None:
    """EvoTorch's PGPE / SNES / CEM from our start point, sigma and population, configured
    with *our* strategy's defaults (read from our classes, so the two cannot drift apart);
    None without EvoTorch. Float32 parameters like ours, evaluated in float64."""
    try:
        import evotorch.algorithms.functional as etf
        from evotorch.distributions import ExpSeparableGaussian
    except ImportError:
        return None
    f, x0, sigma, _ = PROBLEMS[fn]
    npop = population_size(d)
    config = ESConfig(population_size=npop, strategy=strategy, sigma=sigma)
    opts = get_strategy(strategy).options(config)
    x = torch.full((d,), x0, dtype=torch.float32)
    torch.manual_seed(seed)  # EvoTorch samples from torch's global generator

    def evaluate(pop: torch.Tensor) -> torch.Tensor:
        return f(pop.double())

    if strategy == "pgpe":
        state = etf.pgpe(
            center_init=x, center_learning_rate=config.lr,
            stdev_learning_rate=opts.stdev_learning_rate, objective_sense="min",
            ranking_method="centered", optimizer="clipup",
            optimizer_config={"max_speed": config.max_speed or 2.0 * config.lr,
                              "momentum": config.momentum},
            stdev_init=sigma, stdev_max_change=opts.stdev_max_change, symmetric=True,
        )  # fmt: skip

        def step() -> torch.Tensor:
            nonlocal state
            pop = etf.pgpe_ask(state, popsize=npop)
            state = etf.pgpe_tell(state, pop, evaluate(pop))
            return state.optimizer_state.center

    elif strategy == "cem":
        state = etf.cem(
            center_init=x, parenthood_ratio=opts.elite_fraction, objective_sense="min",
            stdev_init=sigma, stdev_min=opts.min_std,
        )  # fmt: skip

        def step() -> torch.Tensor:
            nonlocal state
            pop = etf.cem_ask(state, popsize=npop)
            state = etf.cem_tell(state, pop, evaluate(pop))
            return state.center

    elif strategy == "snes":
        # EvoTorch has no functional SNES: this is the distribution update its SNES class runs
        # each generation (no stdev bounds by default).
        rates = {
            "mu": config.lr,
            "sigma": opts.sigma_learning_rate or (3 + math.log(d)) / (5 * math.sqrt(d)),
        }
        dist = ExpSeparableGaussian({"mu": x, "sigma": torch.full((d,), sigma)})

        def step() -> torch.Tensor:
            nonlocal dist
            pop = dist.sample(npop)
            grads = dist.compute_gradients(
                pop, evaluate(pop), objective_sense="min", ranking_method="nes"
            )
            dist = dist.update_parameters(grads, learning_rates=rates)
            return dist.mu

    else:
        return None
    return step


def reference_evals_to_target(
    strategy: str, fn: str, d: int, budget: int, seed: int
) -> tuple[float, float] | None:
    """The reference library's run of ``strategy`` (see REFERENCE_LIBRARY), or None."""
    library = REFERENCE_LIBRARY.get(strategy)
    if library == "pycma":
        step = pycma_step(fn, d, seed)
    elif library == "evotorch":
        step = evotorch_step(strategy, fn, d, seed)
    else:
        step = None
    return None if step is None else run_reference(step, fn, d, budget)


def median_result(results: list[tuple[float, float]]) -> tuple[float, float]:
    """(median evaluations to target, median best f/d) over seeds (``inf`` sorts last)."""
    return (
        statistics.median(r[0] for r in results),
        statistics.median(r[1] for r in results),
    )


def print_references(strategies: list[str]) -> None:
    """One ``# reference`` line per strategy with a reference: library, version, differences."""
    for name in strategies:
        if name not in REFERENCE_LIBRARY:
            continue
        library = REFERENCE_LIBRARY[name]
        try:
            version = importlib.metadata.version(LIBRARY_PACKAGE[library])
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"# reference {name}: {library} {version}: {REFERENCE_DIFFERENCES[name]}")


def search(
    dims: list[int], fns: list[str], budget_per_dim: int, strategies: list[str], seeds: int = 1
) -> None:
    print_references(strategies)
    for d in dims:
        budget = max(budget_per_dim * d, 20_000) if d <= 1000 else budget_per_dim * 10 * 1000
        for fn in fns:
            # Our default row, then (where the reference cannot express our defaults) the row
            # of ours with the reference's settings: same reference run for both.
            variants: list[tuple[str, bool, dict[str, float]]] = []
            for name in strategies:
                variants.append((name, True, {}))
                if name in SAME_AS_REFERENCE:
                    variants.append((name, *SAME_AS_REFERENCE[name]))
            refs: dict[str, tuple[float, float] | None] = {}
            for strategy, antithetic, options in variants:
                t0 = time.perf_counter()
                evals, best = median_result(
                    [
                        evals_to_target(fn, d, strategy, budget, seed, antithetic, options)
                        for seed in range(1, seeds + 1)
                    ]
                )
                if strategy not in refs:
                    runs = [
                        reference_evals_to_target(strategy, fn, d, budget, seed)
                        for seed in range(1, seeds + 1)
                    ]
                    refs[strategy] = None if None in runs else median_result(runs)
                ref = refs[strategy]
                changed = ([] if antithetic else ["antithetic=False"]) + [
                    f"{k}={v}" for k, v in options.items()
                ]
                label = f"{strategy}({','.join(changed)})" if changed else strategy
                ref_s, ratio, ref_best_s = "n/a", "n/a", "n/a"
                if ref is not None:
                    ref_s, ref_best_s = f"{ref[0]:.0f}", f"{ref[1]:.3g}"
                    if math.isfinite(ref[0]):
                        ratio = f"{evals / ref[0]:.2f}"  # inf: we miss a target it reaches
                print(
                    f"strategies fn={fn} d={d} strategy={label} evals_to_target={evals:.0f} "
                    f"ref_evals_to_target={ref_s} ratio={ratio} budget={budget} "
                    f"npop={population_size(d)} best_f_per_dim={best:.3g} "
                    f"ref_best_f_per_dim={ref_best_s} seeds={seeds} "
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
            get_strategy(name).tell(config, params, state, rewards, r, table)
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
    parser.add_argument(
        "--seeds", type=int, default=1, help="seeds per run; the lines show medians (default 1)"
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
        search(dims, args.fns.split(","), args.budget_per_dim, strategies, args.seeds)


if __name__ == "__main__":
    main()
