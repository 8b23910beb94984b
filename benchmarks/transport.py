"""Per-call cost of the server's two gRPC transports, side by side in one run.

The server (``EmbeddedServer`` with ``transport=grpcio`` or ``http2``) runs in its own
process; ``--concurrency`` workers subscribe from this process with the raw generated stubs
(grpc.aio) and then send Heartbeat calls back to back. Prints, per transport, calls per
second and the server's CPU time per call (user + system, from getrusage around the calls),
then the ratio:

    transport server=http2 concurrency=16 calls_per_s=... server_cpu_us=...
    transport speedup_calls=... server_cpu_ratio=...

Run: ``python -m benchmarks.transport [--calls 4000] [--concurrency 1,16]``.

``--baseline DIR`` compares the ``http2`` server of this checkout with the one of another
checkout of the repository (e.g. ``git worktree add /tmp/base HEAD``), the two measured in
turn ``--rounds`` times in one run so that the machine's noise hits both alike; it prints
each measurement and the ratio of the medians (this checkout over the baseline):

    transport baseline=/tmp/base concurrency=16 calls_ratio=... cpu_ratio=...
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import resource
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

import grpc.aio

TRANSPORTS = ("grpcio", "http2")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _serve(transport: str, pipe: Connection, root: str | None = None) -> None:
    # evochi is imported no earlier than here, so that ``root`` can decide which one.
    if root is not None:
        sys.path.insert(0, root)
    from evochi.server import EmbeddedServer, ServerConfig, http2

    if root is not None and not http2.__file__.startswith(root):
        raise RuntimeError(f"the baseline's server was not imported: {http2.__file__}")

    async def main() -> None:
        config = ServerConfig(population_size=100, worker_timeout=600, transport=transport)
        async with EmbeddedServer(config) as server:
            pipe.send(server.port)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, pipe.recv)  # "start"
            before = _cpu()
            await loop.run_in_executor(None, pipe.recv)  # "stop"
            pipe.send(_cpu() - before)

    asyncio.run(main())


async def _clients(port: int, concurrency: int, calls: int, pipe: Connection) -> float:
    from evochi.v1 import evochi_pb2 as pb
    from evochi.v1 import evochi_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.EvochiServiceStub(channel)
        streams, auths = [], []
        for i in range(concurrency):
            call = stub.Subscribe(pb.SubscribeRequest(cores=1))
            hello = await call.read()
            streams.append(call)
            auths.append((("authorization", f"Bearer {hello.hello.token}"),))
            # Heartbeat 1 proves the worker reads its stream: the server hands no task before.
            await stub.Heartbeat(pb.HeartbeatRequest(seq_id=1), metadata=auths[-1])
            if i == 0:  # the first worker initializes; later ones get hello after that
                task = (await call.read()).initialize.task_id
                await stub.FinishInitialization(
                    pb.FinishInitializationRequest(task_id=task, state=b"x"), metadata=auths[0]
                )

        async def beat(metadata: tuple[tuple[str, str], ...], first: int, n: int) -> None:
            for seq in range(first, first + n):
                await stub.Heartbeat(pb.HeartbeatRequest(seq_id=seq), metadata=metadata)

        per_worker = max(1, calls // concurrency)
        await asyncio.gather(*(beat(a, 2, 20) for a in auths))  # warm-up
        pipe.send("start")
        start = time.perf_counter()
        await asyncio.gather(*(beat(a, 22, per_worker) for a in auths))
        wall = time.perf_counter() - start
        pipe.send("stop")
        for call in streams:
            call.cancel()
        return wall


def measure(
    transport: str, concurrency: int, calls: int, root: str | None = None
) -> tuple[float, float]:
    """(calls per second, server CPU microseconds per call); ``root``: serve from the
    evochi of that checkout."""
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(transport, theirs, root))
    server.start()
    try:
        port = ours.recv()
        wall = asyncio.run(_clients(port, concurrency, calls, ours))
        server_cpu = ours.recv()
    finally:
        server.join(timeout=30)
        if server.is_alive():
            server.kill()
    total = max(1, calls // concurrency) * concurrency
    return total / wall, 1e6 * server_cpu / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=4000, help="calls per measurement")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated worker counts")
    parser.add_argument("--baseline", help="another checkout: compare its http2 server")
    parser.add_argument("--rounds", type=int, default=3, help="with --baseline: pairs run")
    args = parser.parse_args()
    if args.baseline is not None:
        compare(args.baseline, [int(c) for c in args.concurrency.split(",")], args)
        return
    for concurrency in (int(c) for c in args.concurrency.split(",")):
        results = {}
        for transport in TRANSPORTS:
            rate, cpu = measure(transport, concurrency, args.calls)
            results[transport] = (rate, cpu)
            print(
                f"transport server={transport} concurrency={concurrency} "
                f"calls_per_s={rate:.0f} server_cpu_us={cpu:.0f}",
                flush=True,
            )
        (base_rate, base_cpu), (rate, cpu) = results["grpcio"], results["http2"]
        print(
            f"transport concurrency={concurrency} speedup_calls={rate / base_rate:.2f} "
            f"server_cpu_ratio={base_cpu / cpu:.2f}",
            flush=True,
        )


def compare(baseline: str, concurrencies: list[int], args: argparse.Namespace) -> None:
    root = str(Path(baseline).resolve())
    for concurrency in concurrencies:
        runs: dict[str, list[tuple[float, float]]] = {"baseline": [], "this": []}
        for i in range(args.rounds):
            # Alternate which goes first, so that a drift of the machine's load cancels out.
            order = ("baseline", "this") if i % 2 == 0 else ("this", "baseline")
            for which in order:
                rate, cpu = measure(
                    "http2", concurrency, args.calls, root if which == "baseline" else None
                )
                runs[which].append((rate, cpu))
                print(
                    f"transport tree={which} concurrency={concurrency} "
                    f"calls_per_s={rate:.0f} server_cpu_us={cpu:.1f}",
                    flush=True,
                )
        rate = {k: statistics.median(r for r, _ in v) for k, v in runs.items()}
        cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
        print(
            f"transport baseline={root} concurrency={concurrency} "
            f"calls_ratio={rate['this'] / rate['baseline']:.3f} "
            f"cpu_ratio={cpu['baseline'] / cpu['this']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
