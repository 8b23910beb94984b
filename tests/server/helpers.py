"""A foreign client made of the raw generated stubs, for driving the real server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from evochi.v1 import evochi_pb2 as pb
from evochi.v1 import evochi_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]

OPTIONS = [
    ("grpc.max_send_message_length", 1 << 30),
    ("grpc.max_receive_message_length", 1 << 30),
]


def run(coro: Any, timeout: float = 60.0) -> Any:
    """Run a coroutine to completion in a fresh event loop (there is no pytest-asyncio)."""

    async def guarded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(guarded())


class StubWorker:
    """One worker speaking the protocol by hand: every step is explicit in the test."""

    def __init__(self, address: str, cores: int, *, metadata: Sequence[tuple[str, str]] = ()):
        self.channel = grpc.aio.insecure_channel(address, options=OPTIONS)
        self.stub = pb_grpc.EvochiServiceStub(self.channel)
        self.cores = cores
        self.call: Any = None
        self.hello: pb.HelloEvent | None = None
        self.seq = 0
        self._metadata = tuple(metadata)
        self._heartbeats: asyncio.Task[None] | None = None
        self._read: asyncio.Future[Any] | None = None

    @property
    def token(self) -> str:
        assert self.hello is not None
        return self.hello.token

    def auth(self, token: str | None = None) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token or self.token}"),)

    async def subscribe(self, prove: bool = True) -> pb.HelloEvent:
        """Join and read hello; ``prove``: then send heartbeat 1 at once, as real clients
        do (the server gives work only after it, to workers that read their stream)."""
        self.call = self.stub.Subscribe(
            pb.SubscribeRequest(cores=self.cores), metadata=self._metadata or None
        )
        event = await self.next_event()
        assert event.type == pb.EVENT_TYPE_HELLO, event
        self.hello = event.hello
        if prove:
            await self.heartbeat()
        return event.hello

    async def read(self, timeout: float | None = 10.0) -> Any:
        """The next stream item (or EOF); a timeout never cancels the stream itself."""
        if self._read is None:
            self._read = asyncio.ensure_future(self.call.read())
        done, _ = await asyncio.wait({self._read}, timeout=timeout)
        if not done:
            raise TimeoutError("no event")
        read, self._read = self._read, None
        return read.result()

    async def next_event(self, timeout: float = 10.0) -> pb.SubscribeResponse:
        event = await self.read(timeout)
        assert event is not grpc.aio.EOF, "stream ended"
        return event

    async def expect(self, kind: int, timeout: float = 10.0) -> pb.SubscribeResponse:
        event = await self.next_event(timeout)
        assert event.type == kind, f"expected {pb.EventType.Name(kind)}, got {event}"
        return event

    async def no_event(self, within: float = 0.3) -> None:
        with contextlib.suppress(TimeoutError):
            event = await self.read(within)
            raise AssertionError(f"unexpected event {event}")

    async def heartbeat(self, seq: int | None = None) -> pb.HeartbeatResponse:
        if seq is None:
            self.seq += 1
            seq = self.seq
        return await self.stub.Heartbeat(pb.HeartbeatRequest(seq_id=seq), metadata=self.auth())

    def start_heartbeats(self) -> None:
        assert self.hello is not None
        interval = max(self.hello.heartbeat_interval, 1) / 2

        async def loop() -> None:
            while True:
                await self.heartbeat()
                await asyncio.sleep(interval)

        self._heartbeats = asyncio.get_running_loop().create_task(loop())

    async def finish_evaluation(
        self, task_id: str, evaluations: Sequence[tuple[int, int, Sequence[float]]]
    ) -> pb.FinishEvaluationResponse:
        request = pb.FinishEvaluationRequest(
            task_id=task_id,
            evaluations=[
                pb.Evaluation(slice=pb.Slice(start=s, end=e), rewards=list(r))
                for s, e, r in evaluations
            ],
        )
        return await self.stub.FinishEvaluation(request, metadata=self.auth())

    async def evaluate(
        self, event: pb.SubscribeResponse, reward: Callable[[int, int], float]
    ) -> pb.FinishEvaluationResponse:
        ev = event.evaluate
        evaluations = [
            (s.start, s.end, [reward(ev.epoch, m) for m in range(s.start, s.end)])
            for s in ev.slices
        ]
        return await self.finish_evaluation(ev.task_id, evaluations)

    async def finish_optimization(self, task_id: str) -> pb.FinishOptimizationResponse:
        return await self.stub.FinishOptimization(
            pb.FinishOptimizationRequest(task_id=task_id), metadata=self.auth()
        )

    async def finish_initialization(self, task_id: str, state: bytes) -> Any:
        return await self.stub.FinishInitialization(
            pb.FinishInitializationRequest(task_id=task_id, state=state), metadata=self.auth()
        )

    async def finish_share_state(self, task_id: str, state: bytes) -> Any:
        return await self.stub.FinishShareState(
            pb.FinishShareStateRequest(task_id=task_id, state=state), metadata=self.auth()
        )

    async def kill(self) -> None:
        """Vanish like a crashed process: cancel the stream and stop heartbeating."""
        if self._heartbeats is not None:
            self._heartbeats.cancel()
        if self._read is not None:
            self._read.cancel()
        if self.call is not None:
            self.call.cancel()
        await asyncio.sleep(0)

    async def close(self) -> None:
        await self.kill()
        await self.channel.close()


async def expect_error(
    awaitable: Any, code: grpc.StatusCode | tuple[grpc.StatusCode, ...]
) -> grpc.aio.AioRpcError:
    codes = code if isinstance(code, tuple) else (code,)
    try:
        await awaitable
    except grpc.aio.AioRpcError as err:
        assert err.code() in codes, f"expected {code}, got {err.code()}: {err.details()}"
        return err
    raise AssertionError(f"expected {code}, the call succeeded")


def reward_of(epoch: int, member: int) -> float:
    """A known reward per (epoch, member), exact in float32."""
    return float(epoch * 10_000 + member)


async def play(
    worker: StubWorker,
    *,
    reward: Callable[[int, int], float] = reward_of,
    state: Callable[[int], bytes] = lambda epoch: b"state-%d" % epoch,
    vectors: dict[int, list[float]] | None = None,
    stop_after: Callable[[pb.SubscribeResponse], bool] | None = None,
) -> list[pb.SubscribeResponse]:
    """Behave as a correct worker until stop, the end of the stream, or ``stop_after``."""
    seen: list[pb.SubscribeResponse] = []
    if worker.hello is None:
        await worker.subscribe()
    if worker._heartbeats is None:
        worker.start_heartbeats()
    while True:
        event = await worker.read(None)
        if event is grpc.aio.EOF:
            return seen
        seen.append(event)
        if event.type == pb.EVENT_TYPE_INITIALIZE:
            await worker.finish_initialization(event.initialize.task_id, state(1))
        elif event.type == pb.EVENT_TYPE_EVALUATE:
            await worker.evaluate(event, reward)
        elif event.type == pb.EVENT_TYPE_OPTIMIZE:
            if vectors is not None:
                vectors.setdefault(event.optimize.epoch, list(event.optimize.rewards))
            await worker.finish_optimization(event.optimize.task_id)
        elif event.type == pb.EVENT_TYPE_SHARE_STATE:
            ss = event.share_state
            await worker.finish_share_state(ss.task_id, state(ss.epoch + 1))
        elif event.type == pb.EVENT_TYPE_STOP:
            pass
        if stop_after is not None and stop_after(event):
            return seen


def cli(*args: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.Popen:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EVOCHI_")}
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "evochi.server", *args],
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,  # type: ignore[arg-type]
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError("the server did not listen")
