"""pgpe, snes and cem against EvoTorch (the reference library): one update from the
same center, sigma and optimizer state, on the same population and fitness, must give the same
next distribution as EvoTorch's own update (its functional ``pgpe_tell`` / ``cem_tell`` and the
``ExpSeparableGaussian`` step of its SNES class), configured with our defaults.

Our population comes from our noise table (``ask``) and is handed to EvoTorch as its samples,
so the check also covers the member layout EvoTorch assumes (pairs ``2k, 2k+1`` = ``+/-``).
Skipped without EvoTorch (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evochi_torch import ESConfig
from evochi_torch.functional import NoiseTable
from evochi_torch.strategies import ask, get_strategy

pytest.importorskip("evotorch")
etf = pytest.importorskip("evotorch.algorithms.functional")
ExpSeparableGaussian = pytest.importorskip("evotorch.distributions").ExpSeparableGaussian

P = 17
NPOP = 12


def _evolved(strategy: str, epochs: int = 3, **kw):
    """Our strategy after a few updates on a shifted sphere (non-uniform sigma, non-zero
    ClipUp velocity), and the population and distinct fitnesses of the next epoch."""
    config = ESConfig(population_size=NPOP, strategy=strategy, sigma=0.3, seed=5,
                      noise_table_size=4000, **kw)  # fmt: skip
    s = get_strategy(strategy)
    table = NoiseTable.for_config(config, P)
    params = torch.randn(P, generator=torch.Generator().manual_seed(1))
    state = s.init(config, params)
    for epoch in range(epochs + 1):
        pop = ask(config, params, state, epoch, table)
        rewards = -((pop.double() - 0.5) ** 2).sum(-1)
        if epoch == epochs:
            break
        params, state = s.tell(config, params, state, rewards.numpy(), epoch, table)
    assert len(set(rewards.tolist())) == NPOP  # no ties: rankings agree whatever the tie rule
    new_params, new_state = s.tell(config, params, state, rewards.numpy(), epochs, table)
    return config, params, state, pop.double(), rewards, new_params, new_state


def _close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = 1e-5) -> None:
    np.testing.assert_allclose(ours.double().numpy(), theirs.double().numpy(), rtol=rtol,
                               atol=1e-7)  # fmt: skip


def test_pgpe_update_matches_evotorch():
    config, params, state, pop, rewards, new_params, new_state = _evolved("pgpe")
    opts = get_strategy("pgpe").options(config)
    assert float(state["velocity"].norm()) > 0 and state["sigma"].std() > 0  # not the init
    theirs = etf.pgpe(
        center_init=params.double(), center_learning_rate=config.lr,
        stdev_learning_rate=opts.stdev_learning_rate, objective_sense="max",
        ranking_method="centered", optimizer="clipup",
        optimizer_config={"max_speed": 2.0 * config.lr, "momentum": config.momentum},
        stdev_init=state["sigma"].double(), stdev_max_change=opts.stdev_max_change,
        symmetric=True,
    )  # fmt: skip
    # Continue from our ClipUp velocity (EvoTorch's state is a NamedTuple).
    theirs = theirs._replace(
        optimizer_state=theirs.optimizer_state._replace(velocity=state["velocity"].double())
    )
    theirs = etf.pgpe_tell(theirs, pop, rewards)
    _close(new_params, theirs.optimizer_state.center)
    _close(new_state["velocity"], theirs.optimizer_state.velocity)
    _close(new_state["sigma"], theirs.stdev)
    # The sigma step is not clipped away: the check sees the sigma gradient itself.
    moved = (new_state["sigma"] - state["sigma"]).abs()
    assert torch.all(moved < opts.stdev_max_change * state["sigma"] * 0.99)
    assert float(moved.max()) > 1e-4


@pytest.mark.parametrize("antithetic", [True, False])
def test_snes_update_matches_evotorch(antithetic):
    config, params, state, pop, rewards, new_params, new_state = _evolved(
        "snes", antithetic=antithetic
    )
    eta_sigma = (3 + math.log(P)) / (5 * math.sqrt(P))  # both libraries' default
    dist = ExpSeparableGaussian({"mu": params.double(), "sigma": state["sigma"].double()})
    grads = dist.compute_gradients(pop, rewards, objective_sense="max", ranking_method="nes")
    theirs = dist.update_parameters(grads, learning_rates={"mu": config.lr, "sigma": eta_sigma})
    _close(new_params, theirs.mu)
    _close(new_state["sigma"], theirs.sigma)


@pytest.mark.parametrize("std_smoothing", [1.0, 0.7])
def test_cem_update_matches_evotorch_up_to_bessel(std_smoothing):
    """EvoTorch's CEM has no std smoothing (ours with ``std_smoothing=1``) and takes the elite
    std with Bessel's correction (``torch.std``: ``/(E-1)``) where ours uses ``/E``: its std is
    ours times ``sqrt(E/(E-1))``; the smoothed std is ``(1-b) std + b * elite std``."""
    config, params, state, pop, rewards, new_params, new_state = _evolved(
        "cem", antithetic=False, strategy_options={"std_smoothing": std_smoothing}
    )
    opts = get_strategy("cem").options(config)
    elite = round(opts.elite_fraction * NPOP)
    assert elite == math.floor(opts.elite_fraction * NPOP)  # EvoTorch floors, we round
    theirs = etf.cem(
        center_init=params.double(), parenthood_ratio=opts.elite_fraction,
        objective_sense="max", stdev_init=state["std"].double(), stdev_min=opts.min_std,
    )  # fmt: skip
    theirs = etf.cem_tell(theirs, pop, rewards)
    _close(new_params, theirs.center)
    elite_std = theirs.stdev * math.sqrt((elite - 1) / elite)
    expected = (1 - std_smoothing) * state["std"].double() + std_smoothing * elite_std
    _close(new_state["std"], expected)
