"""Soak: the standalone server in its own process, many churning workers in another.

    python -m benchmarks.soak [--epochs 5000] [--workers 64] [--population 10000]
                              [--churn-every 5] [--warmup 200] [--transport http2]

The server is `python -m evochi.server` (a real process, so that its memory is its own and
not mixed with the gRPC client core of the workers); this process runs the workers, checks
every reward vector (benchmarks.load's ledger: a lost or doubled member is counted), churns
a quarter of the workers every `--churn-every` epochs, and reads the server's RSS and open
file descriptors from /proc. Growth is measured from epoch `--warmup` (allocator arenas and
caches fill during the first epochs) to the last epoch. Progress every 10% of the run; the
last line:
`soak epochs=5000 server_rss_growth_mb=... fds_growth=... lost=0 duplicated=0`
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import signal
import time

from benchmarks.load import (
    ChurningPool,
    Ledger,
    free_port,
    open_fds,
    rss_mb,
    start_server,
    wait_for_port,
)


async def run_soak(
    epochs: int,
    workers: int,
    population: int,
    churn_every: int,
    warmup: int,
    transport: str = "http2",
    seed: int = 0,
    stub: bool = False,
) -> dict[str, float]:
    port = free_port()
    server = start_server(port, population, epochs, transport, worker_timeout=10.0)
    ledger = Ledger(population)
    rng = random.Random(seed)
    cores = -(-population // workers)
    progress = asyncio.Event()
    warmup = min(warmup, max(1, epochs // 2))
    marks: dict[str, tuple[float, int]] = {}
    workers_rss: dict[str, float] = {}
    # (epoch, open fds) at every epoch: the count moves while churned connections open and
    # close, so growth compares the lowest count of a churn window at the start and the end.
    fd_samples: list[tuple[int, int]] = []
    report_every = max(1, epochs // 10)
    started = time.perf_counter()
    try:
        await wait_for_port(port, server)
        pool = ChurningPool(f"127.0.0.1:{port}", cores, ledger, progress, stub=stub, rng=rng)
        pool.join(workers)
        last_churn = last_report = 0
        seen = 0
        while seen < epochs:
            try:
                await asyncio.wait_for(progress.wait(), timeout=60)
            except TimeoutError:
                raise RuntimeError(f"no epoch for 60 s after epoch {seen}") from None
            progress.clear()
            seen = max(ledger.checked, default=0)
            if server.poll() is None and seen >= warmup:
                fd_samples.append((seen, open_fds(server.pid)))
            if server.poll() is None and (seen >= warmup and "warm" not in marks):
                marks["warm"] = (rss_mb(server.pid), open_fds(server.pid))
                workers_rss["warm"] = rss_mb()
            if server.poll() is None and seen >= epochs - 1:
                # The last epoch's optimize is under way: the server is still serving.
                marks["end"] = (rss_mb(server.pid), open_fds(server.pid))
                workers_rss["end"] = rss_mb()
            if seen - last_report >= report_every and server.poll() is None:
                last_report = seen
                rate = seen / (time.perf_counter() - started)
                print(
                    f"  epoch {seen}/{epochs} {rate:.1f} epochs/s "
                    f"server_rss_mb={rss_mb(server.pid):.1f} fds={open_fds(server.pid)}",
                    flush=True,
                )
            if churn_every and seen - last_churn >= churn_every and seen < epochs - 1:
                last_churn = seen
                await pool.churn()
        await pool.finish(server, 60)
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            await asyncio.to_thread(server.wait, 30)
    seconds = time.perf_counter() - started
    missing = epochs - len(ledger.checked)
    warm = marks.get("warm", (0.0, 0))
    end = marks.get("end", warm)
    window = 2 * max(1, churn_every)
    first = [n for e, n in fd_samples if e <= warmup + window] or [0]
    last = [n for e, n in fd_samples if e >= epochs - window] or first
    return {
        "lost": ledger.lost + missing * population,
        "duplicated": ledger.duplicated,
        "server_rss_growth_mb": end[0] - warm[0],
        "server_rss_mb": end[0],
        "fds_growth": min(last) - min(first),
        "epochs_per_s": epochs / seconds,
        "workers_rss_growth_mb": workers_rss.get("end", 0.0) - workers_rss.get("warm", 0.0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--epochs", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--population", type=int, default=10_000)
    parser.add_argument("--churn-every", type=int, default=5, help="epochs between churns")
    parser.add_argument("--warmup", type=int, default=200, help="epoch of the first RSS reading")
    parser.add_argument("--transport", choices=("http2", "grpcio"), default="http2")
    parser.add_argument(
        "--stub", action="store_true", help="raw-stub workers instead of evochi.v1.Worker"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    # SIGTERM as Ctrl-C: the run is cancelled and its server process stopped, not orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    result = asyncio.run(
        run_soak(
            args.epochs,
            args.workers,
            args.population,
            args.churn_every,
            args.warmup,
            args.transport,
            stub=args.stub,
        )
    )
    print(
        f"soak epochs={args.epochs} transport={args.transport} "
        f"server_rss_growth_mb={result['server_rss_growth_mb']:.1f} "
        f"fds_growth={result['fds_growth']} lost={result['lost']} "
        f"duplicated={result['duplicated']} server_rss_mb={result['server_rss_mb']:.1f} "
        f"epochs_per_s={result['epochs_per_s']:.1f} "
        f"workers_process_rss_growth_mb={result['workers_rss_growth_mb']:.1f}"
    )


if __name__ == "__main__":
    main()
