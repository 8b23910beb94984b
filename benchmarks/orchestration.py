"""Orchestration throughput: how many epochs per second the server drives when evaluation
and optimization cost nothing (population 1000, random rewards).

The server runs in its own process, as in a deployment; all workers run in this process on
one event loop. ``--client stubs`` speaks the protocol with the raw generated stubs (the
leanest client possible); ``--client worker`` runs real `evochi.v1.Worker` subclasses with
``async def`` hooks, the like-for-like comparison with another server driven by its own
Python client. ``--transport`` picks the server's gRPC transport: ``http2`` (the default)
or ``grpcio`` (grpc.aio's server, the baseline), or both side by side. Prints one line per
shape (workers x cores), transport and client:

    orchestration transport=http2 client=worker workers=4 cores=250 epochs_per_s=...

Run: ``python -m benchmarks.orchestration [--client stubs,worker] [--transport http2,grpcio]
[--epochs N] [--shapes 4x250,16x63] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import random
import time

import grpc
import grpc.aio

from evochi.v1 import Eval, Worker
from evochi.v1 import evochi_pb2 as pb
from evochi.v1 import evochi_pb2_grpc as pb_grpc

POPULATION = 1000
SHAPES = ((1, 1000), (4, 250), (16, 63), (4, 25))
WARMUP = 20
OPTIONS = [
    ("grpc.max_send_message_length", 1 << 30),
    ("grpc.max_receive_message_length", 1 << 30),
]


def _serve(epochs: int, port_queue: mp.Queue, straggler_reissue: bool, transport: str) -> None:
    from evochi.server import EmbeddedServer, ServerConfig

    logging.basicConfig(level=logging.WARNING)

    async def main() -> None:
        config = ServerConfig(
            population_size=POPULATION,
            max_epochs=epochs,
            worker_timeout=60.0,
            straggler_reissue=straggler_reissue,
            transport=transport,
        )
        async with EmbeddedServer(config) as server:
            port_queue.put(server.port)
            await server.wait_finished()
            await asyncio.sleep(0.2)  # let the stop events reach the workers

    asyncio.run(main())


async def _worker(address: str, cores: int, marks: dict[int, float]) -> None:
    """A minimal worker: random rewards, instant optimize, a constant state."""
    async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
        stub = pb_grpc.EvochiServiceStub(channel)
        call = stub.Subscribe(pb.SubscribeRequest(cores=cores))
        metadata: tuple[tuple[str, str], ...] = ()
        heartbeat: asyncio.Task[None] | None = None
        state = b"\x00" * 64
        rand = random.random

        async def beat(interval: int) -> None:
            seq = 0
            while True:
                seq += 1
                await stub.Heartbeat(pb.HeartbeatRequest(seq_id=seq), metadata=metadata)
                await asyncio.sleep(interval)

        try:
            async for event in call:
                kind = event.type
                if kind == pb.EVENT_TYPE_EVALUATE:
                    ev = event.evaluate
                    evaluations = [
                        pb.Evaluation(slice=s, rewards=[rand() for _ in range(s.end - s.start)])
                        for s in ev.slices
                    ]
                    await stub.FinishEvaluation(
                        pb.FinishEvaluationRequest(task_id=ev.task_id, evaluations=evaluations),
                        metadata=metadata,
                    )
                elif kind == pb.EVENT_TYPE_OPTIMIZE:
                    marks.setdefault(event.optimize.epoch, time.perf_counter())
                    await stub.FinishOptimization(
                        pb.FinishOptimizationRequest(task_id=event.optimize.task_id),
                        metadata=metadata,
                    )
                elif kind == pb.EVENT_TYPE_SHARE_STATE:
                    await stub.FinishShareState(
                        pb.FinishShareStateRequest(task_id=event.share_state.task_id, state=state),
                        metadata=metadata,
                    )
                elif kind == pb.EVENT_TYPE_INITIALIZE:
                    await stub.FinishInitialization(
                        pb.FinishInitializationRequest(
                            task_id=event.initialize.task_id, state=state
                        ),
                        metadata=metadata,
                    )
                elif kind == pb.EVENT_TYPE_HELLO:
                    metadata = (("authorization", f"Bearer {event.hello.token}"),)
                    heartbeat = asyncio.get_running_loop().create_task(
                        beat(event.hello.heartbeat_interval)
                    )
                elif kind == pb.EVENT_TYPE_STOP:
                    break
        finally:
            if heartbeat is not None:
                heartbeat.cancel()


class _BenchWorker(Worker[bytes]):
    """The same trivial work as `_worker`, through the real client with async hooks."""

    def __init__(self, address: str, cores: int, marks: dict[int, float]) -> None:
        super().__init__(address, cores)
        self._marks = marks

    async def initialize(self) -> bytes:
        return b"\x00" * 64

    async def evaluate(self, epoch: int, slices: list[slice]) -> list[Eval]:
        rand = random.random
        return [Eval(s, [rand() for _ in range(s.stop - s.start)]) for s in slices]

    async def optimize(self, epoch: int, rewards: list[float]) -> bytes:
        self._marks.setdefault(epoch, time.perf_counter())
        return self.state


async def _real_worker(address: str, cores: int, marks: dict[int, float]) -> None:
    async with _BenchWorker(address, cores, marks) as worker:
        await worker.start()


CLIENTS = {"stubs": _worker, "worker": _real_worker}


def run_shape(
    workers: int,
    cores: int,
    epochs: int,
    straggler_reissue: bool = True,
    client: str = "stubs",
    transport: str = "http2",
) -> float:
    """Epochs per second after a warm-up, for one shape."""
    ctx = mp.get_context("spawn")
    port_queue: mp.Queue = ctx.Queue()
    server = ctx.Process(target=_serve, args=(epochs, port_queue, straggler_reissue, transport))
    server.start()
    try:
        port = port_queue.get(timeout=60)
        marks: dict[int, float] = {}

        async def main() -> None:
            address = f"127.0.0.1:{port}"
            # The first worker initializes; the others join once it is in.
            run = CLIENTS[client]
            await asyncio.gather(*(run(address, cores, marks) for _ in range(workers)))

        asyncio.run(main())
    finally:
        server.join(timeout=30)
        if server.is_alive():
            server.kill()
    first = min(WARMUP, epochs // 4)
    return (epochs - first) / (marks[epochs] - marks[first])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=600, help="epochs per shape")
    parser.add_argument(
        "--shapes",
        default=",".join(f"{w}x{c}" for w, c in SHAPES),
        help="comma-separated WORKERSxCORES",
    )
    parser.add_argument("--no-straggler-reissue", action="store_true")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per shape; the median is printed"
    )
    parser.add_argument(
        "--client",
        default="stubs",
        help="comma-separated client kinds: stubs (raw generated stubs), worker (evochi.v1.Worker)",
    )
    parser.add_argument(
        "--transport",
        default="http2",
        help="comma-separated server transports: http2 (default), grpcio (the baseline)",
    )
    args = parser.parse_args()
    clients = args.client.split(",")
    transports = args.transport.split(",")
    for transport in transports:
        if transport not in ("http2", "grpcio"):
            parser.error(f"unknown transport {transport!r}; choose from http2, grpcio")
    for client in clients:
        if client not in CLIENTS:
            parser.error(f"unknown client {client!r}; choose from {', '.join(CLIENTS)}")
    for shape in args.shapes.split(","):
        workers, cores = (int(x) for x in shape.lower().split("x"))
        for transport in transports:
            for client in clients:
                rates = sorted(
                    run_shape(
                        workers,
                        cores,
                        args.epochs,
                        not args.no_straggler_reissue,
                        client,
                        transport,
                    )
                    for _ in range(max(1, args.repeat))
                )
                rate = rates[len(rates) // 2]
                print(
                    f"orchestration transport={transport} client={client} workers={workers} "
                    f"cores={cores} epochs_per_s={rate:.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
