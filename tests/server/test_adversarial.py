"""Hostile HTTP/2 peers against a live server while honest workers train, on both transports.

Each attack of tests/server/adversary.py runs in its own process against the server in its
own process, while 4 honest workers (population 64) train from this one. The server's
bounds are asserted: honest epochs/s during the attack >= 50% of the baseline measured
just before, back to >= 90% within 5 s after it, no honest worker disconnected, server RSS
under RSS_BOUND_MB (docs/server.md#limits).

A shared test machine is noisy (a neighbour's burst halves the honest rate for a second
while the server idles): a measurement outside the bounds is repeated, up to ATTEMPTS in
all, and the test fails only if every one is outside them (a real regression is, every time).
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator

import pytest

from evochi.server import EmbeddedServer, ServerConfig
from tests.server import h2raw
from tests.server.adversary import ATTACKS, Fleet, Result, ServerProcess, measure
from tests.server.h2raw import RawClient, frame, grpc_message
from tests.server.helpers import run

RSS_BOUND_MB = 400
ATTEMPTS = 3


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


# Measured weaknesses of gRPC's C core behind the grpcio transport (docs/server.md#limits):
# it keeps serving a connection that floods SETTINGS, and Rapid Reset joins and leaves
# faster than on the HTTP/2 transport. (Fake workers on Subscribe streams nobody reads,
# zero_window*, hold no work on either transport: work waits for a worker's first
# heartbeat.) Not strict: a run where they happen to stay within the bounds passes.
GRPCIO_WEAKNESSES = {
    "rapid_reset": "C core: Rapid Reset joins and leaves workers faster than the bounds allow",
    "flood_settings": "C core: a SETTINGS flood slows every connection's calls",
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_hostile_peer_costs_honest_training_little(
    training: tuple[ServerProcess, Fleet], attack: str, request: pytest.FixtureRequest
) -> None:
    server, fleet = training
    if server.transport == "grpcio" and attack in GRPCIO_WEAKNESSES:
        request.applymarker(pytest.mark.xfail(reason=GRPCIO_WEAKNESSES[attack], strict=False))
    results = [measure(server, fleet, attack)]
    while problems(results[-1]) and len(results) < ATTEMPTS:
        results.append(measure(server, fleet, attack))  # noise or regression? it repeats
    assert all(r.baseline_eps > 0 for r in results), "the honest workers did not train"
    # No honest worker may be disconnected: counted over every measurement, never excused.
    assert fleet.disconnects == 0, fleet.errors
    assert not problems(results[-1]), "\n".join(f"{r.line()}: {problems(r)}" for r in results)
    assert server.proc.poll() is None, "the server died"


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.parametrize("transport", ["http2", "grpcio"])
def test_gzip_bombs_never_inflate_past_a_bound(transport: str) -> None:
    """A 64 KiB gzip request inflating to 64 MiB, five times: the default message limit
    (1 GiB) would let every byte through; neither transport inflates it."""
    bomb = grpc_message(gzip.compress(b"\x00" * (64 << 20), 9), compressed=True)

    async def scenario() -> None:
        config = ServerConfig(population_size=8, worker_timeout=30, transport=transport)
        async with EmbeddedServer(config, host="127.0.0.1") as server:
            before = _rss_mb()
            for _ in range(5):
                client = await RawClient.connect(server.port)
                stream_id = client.request(
                    "/evochi.v1.EvochiService/Subscribe", None, keep_open=True,
                    extra=[("grpc-encoding", "gzip")],
                )  # fmt: skip
                for offset in range(0, len(bomb), 16_000):  # the default frame size
                    flags = h2raw.END_STREAM if offset + 16_000 >= len(bomb) else 0
                    client.send(frame(h2raw.DATA, flags, stream_id, bomb[offset : offset + 16_000]))
                status = (await client.response(stream_id)).status
                if transport == "http2":  # inflated only up to Subscribe's 64 KiB
                    assert status["grpc-status"] == "8", status
                    assert "limit of 65536 bytes" in status["grpc-message"]
                else:  # gRPC's C core would inflate up to 1 GiB: compression is refused
                    assert status["grpc-status"] == "12", status
                    assert "gzip" in status["grpc-message"]
                await client.close()
            assert _rss_mb() - before < 32, "a bomb was inflated"
            assert not server.service.core.workers  # and nobody joined

    run(scenario())
