"""Hostile HTTP/2 peers against a live server while honest workers train, on both transports.

Each attack of tests/server/adversary.py runs in its own process against the server in its
own process, while 4 honest workers (population 64) train from this one. The bounds of
issue 11 are asserted: honest epochs/s during the attack >= 50% of the baseline measured
just before, back to >= 90% within 5 s after it, no honest worker disconnected, server RSS
under RSS_BOUND_MB (docs/server.md#limits).

A shared test machine is noisy: a measurement outside the bounds is repeated once, and
fails only if the repeat is outside them too (a real regression is, every time).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.server.adversary import ATTACKS, Fleet, Result, ServerProcess, measure

RSS_BOUND_MB = 400


@pytest.fixture(scope="module", params=["http2", "grpcio"])
def training(request: pytest.FixtureRequest) -> Iterator[tuple[ServerProcess, Fleet]]:
    server = ServerProcess(request.param)
    fleet = Fleet(server.address)
    try:
        fleet.start()
        yield server, fleet
    finally:
        fleet.stop()
        server.stop()


def problems(result: Result) -> list[str]:
    found = []
    if result.during_ratio < 0.5:
        found.append(f"honest epochs/s fell to {result.during_ratio:.0%} of the baseline")
    if result.after_ratio < 0.9:
        found.append(f"only {result.after_ratio:.0%} of the baseline within 5 s after")
    if result.server_rss_mb > RSS_BOUND_MB:
        found.append(f"server RSS {result.server_rss_mb:.0f} MB")
    return found


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_hostile_peer_costs_honest_training_little(
    training: tuple[ServerProcess, Fleet], attack: str
) -> None:
    server, fleet = training
    result = measure(server, fleet, attack)
    if problems(result):
        result = measure(server, fleet, attack)  # noise or regression? a regression repeats
    assert result.baseline_eps > 0, "the honest workers did not train"
    # No honest worker may be disconnected: counted over both measurements, never repeated.
    assert fleet.disconnects == 0, fleet.errors
    assert not problems(result), f"{result.line()}: {problems(result)}"
    assert server.proc.poll() is None, "the server died"
