"""What the per-member metrics extension costs the server, side by side in one run.

Drives the server's service (request decoding, the core, event encoding; no network, no
transport) in this process with workers that send no metrics, one metric (``env_steps``) or
four, and times only the server's side of every call. Variants alternate round by round and
the best round of each is kept, so that a noisy shared machine disturbs them alike. Prints
one line per shape and variant, with the ratio to the no-metrics variant:

    member_metrics population=1000 workers=4 metrics=1 server_us_per_epoch=... ratio=1.07

Run: ``python -m benchmarks.member_metrics [--epochs 200] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np

from evochi.server.config import ServerConfig
from evochi.server.service import EvochiService
from evochi.v1 import evochi_pb2 as pb

SHAPES = ((1000, 1), (1000, 4), (1000, 16), (100, 4))
VARIANTS = (0, 1, 4)  # metrics per evaluation


class _Stream:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, message: bytes) -> None:
        self.sent.append(message)

    def close(self, code: str, message: str) -> None:
        pass


def server_seconds_per_epoch(population: int, workers: int, metrics: int, epochs: int) -> float:
    """Seconds the server spends per epoch (its calls only, client work excluded)."""
    service = EvochiService(
        ServerConfig(population_size=population, max_epochs=epochs, straggler_reissue=False)
    )
    rng = np.random.default_rng(0)
    names = [f"metric_{i}" for i in range(metrics)]
    streams: dict[str, _Stream] = {}
    tokens: dict[str, str] = {}
    spent = 0.0
    cores = -(-population // workers)

    def call(method: str, request: bytes, token: str) -> None:
        nonlocal spent
        started = time.perf_counter()
        service.unary(method, request, token)
        spent += time.perf_counter() - started

    for _ in range(workers):
        stream = _Stream()
        subscribe = pb.SubscribeRequest(cores=cores).SerializeToString()
        started = time.perf_counter()
        worker_id = service.subscribe(subscribe, None, stream)
        spent += time.perf_counter() - started
        streams[worker_id] = stream
    busy = True
    while busy:
        busy = False
        for worker_id, stream in streams.items():
            events, stream.sent = stream.sent, []
            for raw in events:
                busy = True
                event = pb.SubscribeResponse.FromString(raw)
                kind = event.type
                if kind == pb.EVENT_TYPE_HELLO:
                    tokens[worker_id] = event.hello.token
                elif kind == pb.EVENT_TYPE_INITIALIZE:
                    request = pb.FinishInitializationRequest(
                        task_id=event.initialize.task_id, state=b"state"
                    )
                    call("FinishInitialization", request.SerializeToString(), tokens[worker_id])
                elif kind == pb.EVENT_TYPE_EVALUATE:
                    evaluations = []
                    for s in event.evaluate.slices:
                        width = s.end - s.start
                        ev = pb.Evaluation(slice=s, rewards=rng.random(width).tolist())
                        for name in names:
                            ev.metrics.add(name=name, values=rng.integers(1, 1000, width).tolist())
                        evaluations.append(ev)
                    request = pb.FinishEvaluationRequest(
                        task_id=event.evaluate.task_id, evaluations=evaluations
                    )
                    call("FinishEvaluation", request.SerializeToString(), tokens[worker_id])
                elif kind == pb.EVENT_TYPE_OPTIMIZE:
                    request = pb.FinishOptimizationRequest(task_id=event.optimize.task_id)
                    call("FinishOptimization", request.SerializeToString(), tokens[worker_id])
                elif kind == pb.EVENT_TYPE_SHARE_STATE:
                    request = pb.FinishShareStateRequest(
                        task_id=event.share_state.task_id, state=b"state"
                    )
                    call("FinishShareState", request.SerializeToString(), tokens[worker_id])
    if not service.core.finished:
        raise RuntimeError(f"the training stopped at epoch {service.core.epoch}")
    return spent / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=200, help="epochs per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; best kept")
    args = parser.parse_args()
    logging.getLogger("evochi.server").setLevel(logging.WARNING)
    for population, workers in SHAPES:
        best = {m: float("inf") for m in VARIANTS}
        for _ in range(args.rounds):
            for m in VARIANTS:
                seconds = server_seconds_per_epoch(population, workers, m, args.epochs)
                best[m] = min(best[m], seconds)
        for m in VARIANTS:
            print(
                f"member_metrics population={population} workers={workers} metrics={m} "
                f"server_us_per_epoch={best[m] * 1e6:.1f} ratio={best[m] / best[0]:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
