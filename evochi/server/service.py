"""The thin grpc.aio adapter around the pure core.

Everything runs on one asyncio event loop and every core call is synchronous, so the core
is never mutated concurrently and needs no lock. Each worker's Subscribe stream drains its
own ``asyncio.Queue``; core commands fill the queues. Requests are decoded here (not by
gRPC) so that undecodable bytes get INVALID_ARGUMENT instead of a generic INTERNAL.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import inspect
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn

import grpc
import grpc.aio
import numpy as np
from google.protobuf.message import DecodeError

from evochi.server import core
from evochi.server.config import ServerConfig
from evochi.server.metrics import ServerMetrics
from evochi.server.store import Checkpoint, CheckpointWriter
from evochi.v1 import evochi_pb2 as pb

__all__ = ["EpochCallback", "EvochiService", "server_options"]

log = logging.getLogger("evochi.server")

SERVICE_NAME = "evochi.v1.EvochiService"
EpochCallback = Callable[[core.EpochSummary], Any]
_CLOSE = object()


def server_options(config: ServerConfig) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        # Detect dead peers on idle connections, and tolerate clients' own keepalive pings.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
    ]


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class JwtIssuer:
    """HS512 JWTs with the worker id as subject, like the reference server's tokens.

    Workers treat tokens as opaque; the server accepts a token only while it maps to a live
    worker, so a token expires with its worker whatever its claims say.
    """

    _HEADER = _b64(json.dumps({"alg": "HS512", "typ": "JWT"}, separators=(",", ":")).encode())

    def __init__(self, secret: str | None) -> None:
        self._key = secret.encode() if secret else secrets.token_bytes(64)

    def __call__(self, worker_id: str) -> str:
        now = int(time.time())
        claims = {"iss": "evochi@v1", "sub": worker_id, "iat": now, "nbf": now}
        claims["jti"] = secrets.token_hex(8)  # unguessable even with a known secret's claims
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        signing_input = f"{self._HEADER}.{payload}".encode()
        signature = _b64(hmac.new(self._key, signing_input, hashlib.sha512).digest())
        return f"{self._HEADER}.{payload}.{signature}"


def _bearer(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class EvochiService:
    """Owns the core, the worker streams, the tick loop and the side effects of commands."""

    def __init__(
        self,
        config: ServerConfig,
        *,
        metrics: ServerMetrics | None = None,
        on_epoch: EpochCallback | None = None,
        snapshot: core.TrainingSnapshot | None = None,
        writer: CheckpointWriter | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics or ServerMetrics()
        self.on_epoch = on_epoch
        self.writer = writer
        self.core = core.Training(
            core.CoreConfig(
                population_size=config.population_size,
                max_epochs=config.max_epochs,
                max_workers=config.max_workers,
                worker_timeout=config.worker_timeout,
                max_slices_per_eval=config.max_slices_per_eval,
                straggler_reissue=config.straggler_reissue,
                straggler_factor=config.straggler_factor,
                straggler_min_seconds=config.straggler_min_seconds,
            ),
            token_factory=JwtIssuer(config.jwt_secret),
            snapshot=snapshot,
        )
        self._queues: dict[str, asyncio.Queue[Any]] = {}
        self._notices: asyncio.Queue[Any] = asyncio.Queue()
        self._notice_task: asyncio.Task[None] | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self.finished = asyncio.Event()
        # (id of the epoch's reward array, its packed little-endian float32 bytes)
        self._rewards_cache: tuple[int, bytes] | None = None
        self._join_token = config.join_token.encode() if config.join_token else None
        self.metrics.epoch.set(self.core.epoch)
        if self.core.finished:
            self.finished.set()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._notice_task = loop.create_task(self._run_notices())
        self._tick_task = loop.create_task(self._run_ticks())

    def finish_training(self) -> None:
        """Sends stop to every worker now and marks the training finished."""
        self._execute(self.core.finish_now())

    async def close(self, reason: str = "server stopping") -> None:
        """End every stream (UNAVAILABLE: the worker may reconnect) and the background tasks."""
        for worker_id in list(self._queues):
            self._queues[worker_id].put_nowait((_CLOSE, "UNAVAILABLE", reason))
        if self._tick_task is not None:
            self._tick_task.cancel()
        if self._notice_task is not None:
            # Let pending on_epoch callbacks run, but never hang a shutdown on them.
            self._notices.put_nowait(None)
            try:
                await asyncio.wait_for(asyncio.shield(self._notice_task), timeout=5.0)
            except (TimeoutError, asyncio.CancelledError):
                self._notice_task.cancel()
        if self.writer is not None:
            await self.writer.flush()

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """Handlers taking the raw request bytes (decoded by the service)."""

        def serialize(message: Any) -> bytes:
            # Optimize events arrive pre-serialized (see _optimize_message).
            return message if type(message) is bytes else message.SerializeToString()

        def unary(fn: Callable[..., Awaitable[Any]]) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(fn, response_serializer=serialize)

        return {
            "Subscribe": grpc.unary_stream_rpc_method_handler(
                self.subscribe, response_serializer=serialize
            ),
            "Heartbeat": unary(self.heartbeat),
            "FinishEvaluation": unary(self.finish_evaluation),
            "FinishOptimization": unary(self.finish_optimization),
            "FinishInitialization": unary(self.finish_initialization),
            "FinishShareState": unary(self.finish_share_state),
        }

    def register(self, server: grpc.aio.Server) -> None:
        handlers = self.method_handlers()
        # Registered methods are matched inside gRPC core without a per-call lookup in
        # Python; the generic handler stays for servers that route by name.
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        server.add_registered_method_handlers(SERVICE_NAME, handlers)

    # ------------------------------------------------------------------ RPCs

    async def subscribe(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SubscribeResponse | bytes]:
        req = await self._decode(pb.SubscribeRequest, request, context, "Subscribe")
        if self._join_token is not None:
            token = _bearer(context)
            if token is None or not hmac.compare_digest(token.encode(), self._join_token):
                await self._reject(
                    context,
                    "Subscribe",
                    core.Unauthenticated("this server requires a join token"),
                )
        try:
            worker_id, commands = self.core.join(req.cores, time.monotonic())
        except core.CoreError as err:
            await self._reject(context, "Subscribe", err)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._queues[worker_id] = queue
        self._execute(commands)
        try:
            while True:
                item = await queue.get()
                if type(item) is tuple:
                    _, code, reason = item
                    if code == "UNAVAILABLE":
                        await context.abort(grpc.StatusCode.UNAVAILABLE, reason)
                    if code is not None and code != "CANCELLED":
                        message = f"removed from the training: {reason}"
                        await context.abort(grpc.StatusCode[code], message)
                    return
                yield item
        finally:
            self._queues.pop(worker_id, None)
            if worker_id in self.core.workers:
                self._execute(self.core.leave(worker_id, time.monotonic(), "left"))

    async def heartbeat(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatResponse:
        req = await self._decode(pb.HeartbeatRequest, request, context, "Heartbeat")
        try:
            worker_id = self._authenticate(context)
            self.core.heartbeat(worker_id, req.seq_id, time.monotonic())
        except core.CoreError as err:
            await self._reject(context, "Heartbeat", err)
        return pb.HeartbeatResponse(ok=True)

    async def finish_evaluation(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> pb.FinishEvaluationResponse:
        req = await self._decode(pb.FinishEvaluationRequest, request, context, "FinishEvaluation")
        try:
            worker_id = self._authenticate(context)
            evaluations = [(e.slice.start, e.slice.end, e.rewards) for e in req.evaluations]
            commands = self.core.finish_evaluation(
                worker_id, req.task_id, evaluations, time.monotonic()
            )
        except core.CoreError as err:
            await self._reject(context, "FinishEvaluation", err)
        self._execute(commands)
        return pb.FinishEvaluationResponse(ok=True)

    async def finish_optimization(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> pb.FinishOptimizationResponse:
        req = await self._decode(
            pb.FinishOptimizationRequest, request, context, "FinishOptimization"
        )
        try:
            worker_id = self._authenticate(context)
            commands = self.core.finish_optimization(worker_id, req.task_id, time.monotonic())
        except core.CoreError as err:
            await self._reject(context, "FinishOptimization", err)
        self._execute(commands)
        return pb.FinishOptimizationResponse(ok=True)

    async def finish_initialization(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> pb.FinishInitializationResponse:
        req = await self._decode(
            pb.FinishInitializationRequest, request, context, "FinishInitialization"
        )
        try:
            worker_id = self._authenticate(context)
            commands = self.core.finish_initialization(
                worker_id, req.task_id, req.state, time.monotonic()
            )
        except core.CoreError as err:
            await self._reject(context, "FinishInitialization", err)
        self._execute(commands)
        return pb.FinishInitializationResponse(ok=True)

    async def finish_share_state(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> pb.FinishShareStateResponse:
        req = await self._decode(pb.FinishShareStateRequest, request, context, "FinishShareState")
        try:
            worker_id = self._authenticate(context)
            commands = self.core.finish_share_state(
                worker_id, req.task_id, req.state, time.monotonic()
            )
        except core.CoreError as err:
            await self._reject(context, "FinishShareState", err)
        self._execute(commands)
        return pb.FinishShareStateResponse(ok=True)

    # ------------------------------------------------------------------ helpers

    async def _decode(
        self, cls: Any, data: bytes, context: grpc.aio.ServicerContext, method: str
    ) -> Any:
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError, TypeError) as err:
            await self._reject(
                context, method, core.InvalidArgument(f"malformed {cls.__name__}: {err}")
            )

    def _authenticate(self, context: grpc.aio.ServicerContext) -> str:
        token = _bearer(context)
        if token is None:
            raise core.Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        return self.core.authenticate(token)

    async def _reject(
        self, context: grpc.aio.ServicerContext, method: str, err: core.CoreError
    ) -> NoReturn:
        self.metrics.rejected.labels(method, err.code).inc()
        log.debug("%s rejected: %s %s", method, err.code, err.message)
        await context.abort(grpc.StatusCode[err.code], err.message)
        raise AssertionError("context.abort returned")

    def _to_message(self, event: core.Event) -> pb.SubscribeResponse | bytes:
        kind = type(event)
        if kind is core.Evaluate:
            return pb.SubscribeResponse(
                type=pb.EVENT_TYPE_EVALUATE,
                evaluate=pb.EvaluateEvent(
                    task_id=event.task_id,
                    epoch=event.epoch,
                    slices=[pb.Slice(start=s, end=e) for s, e in event.slices],
                ),
            )
        if kind is core.Optimize:
            return self._optimize_message(event)
        if kind is core.Hello:
            hello = pb.HelloEvent(
                id=event.worker_id,
                token=event.token,
                population_size=event.population_size,
                heartbeat_interval=event.heartbeat_interval,
                max_epochs=event.max_epochs,
            )
            if event.state is not None:
                hello.state = event.state
            return pb.SubscribeResponse(type=pb.EVENT_TYPE_HELLO, hello=hello)
        if kind is core.ShareState:
            return pb.SubscribeResponse(
                type=pb.EVENT_TYPE_SHARE_STATE,
                share_state=pb.ShareStateEvent(task_id=event.task_id, epoch=event.epoch),
            )
        if kind is core.Initialize:
            return pb.SubscribeResponse(
                type=pb.EVENT_TYPE_INITIALIZE,
                initialize=pb.InitializeEvent(task_id=event.task_id),
            )
        if kind is core.Stop:
            return pb.SubscribeResponse(
                type=pb.EVENT_TYPE_STOP, stop=pb.StopEvent(task_id=event.task_id)
            )
        raise TypeError(f"unknown event {event!r}")

    def _optimize_message(self, event: core.Optimize) -> bytes:
        """The serialized SubscribeResponse of an optimize event.

        Every worker gets the same reward vector: it is encoded once per epoch as a packed
        float32 field and spliced into each worker's message, instead of copying the whole
        population into a protobuf repeated field per worker. (tests check the bytes parse
        to the same message protobuf would build.)
        """
        cache = self._rewards_cache
        if cache is None or cache[0] != id(event.rewards):
            cache = (id(event.rewards), event.rewards.astype("<f4", copy=False).tobytes())
            self._rewards_cache = cache
        packed = cache[1]
        task_id = event.task_id.encode()
        optimize = b"".join(
            (
                b"\x0a", _varint(len(task_id)), task_id,  # task_id = 1
                b"\x10", _varint(event.epoch),  # epoch = 2
                b"\x1a" if packed else b"", _varint(len(packed)) if packed else b"", packed,
            )
        )  # fmt: skip
        # type = 1 (EVENT_TYPE_OPTIMIZE), optimize = 4
        return b"".join((b"\x08", _varint(pb.EVENT_TYPE_OPTIMIZE), b"\x22",
                         _varint(len(optimize)), optimize))  # fmt: skip

    def _execute(self, commands: list[core.Command]) -> None:
        metrics = self.metrics
        for command in commands:
            kind = type(command)
            if kind is core.Send:
                queue = self._queues.get(command.worker_id)
                if queue is not None:
                    queue.put_nowait(self._to_message(command.event))
            elif kind is core.TaskFinished:
                metrics.task_seconds_by_kind[command.kind].observe(command.seconds)
            elif kind is core.Close:
                queue = self._queues.get(command.worker_id)
                if queue is not None:
                    queue.put_nowait((_CLOSE, command.code, command.reason))
            elif kind is core.EpochCompleted:
                self._epoch_completed(command.summary)
            elif kind is core.StateChanged:
                metrics.epoch.set(self.core.epoch)
                if self.writer is not None:
                    self.writer.submit(
                        Checkpoint(command.epoch, command.state, self.config.stored_fields())
                    )
            elif kind is core.WorkerJoined:
                metrics.joins.inc()
                metrics.workers.set(command.workers)
                log.info("worker joined id=%s cores=%d workers=%d", command.worker_id,
                         command.cores, command.workers)  # fmt: skip
            elif kind is core.WorkerLeft:
                metrics.workers.set(command.workers)
                metrics.leave(command.reason)
                if command.returned_members:
                    metrics.reassignments.labels("evaluate").inc()
                if command.reassigned_task:
                    metrics.reassignments.labels(command.reassigned_task).inc()
                level = (
                    logging.WARNING
                    if "deadline" in command.reason or "heartbeat" in command.reason
                    else logging.INFO
                )
                log.log(level, "worker left id=%s reason=%r workers=%d returned_members=%d",
                        command.worker_id, command.reason, command.workers,
                        command.returned_members)  # fmt: skip
            elif kind is core.Reissued:
                metrics.reissued_members.inc(command.members)
                log.info("re-issued %d members of a straggling evaluate task", command.members)
            elif kind is core.TrainingFinished:
                log.info("training finished after epoch %d", command.epoch)
                self._notices.put_nowait(command)

    def _epoch_completed(self, summary: core.EpochSummary) -> None:
        metrics = self.metrics
        metrics.epochs.inc()
        metrics.epoch_seconds.observe(summary.seconds)
        rewards = summary.rewards
        mean = float(np.mean(rewards))
        metrics.reward_mean.set(mean)
        if log.isEnabledFor(logging.INFO):
            log.info("epoch=%d seconds=%.3f workers=%d reward_mean=%.6g min=%.6g max=%.6g",
                     summary.epoch, summary.seconds, summary.workers, mean,
                     float(rewards.min()), float(rewards.max()))  # fmt: skip
        if self.on_epoch is not None:
            self._notices.put_nowait(summary)

    async def _run_notices(self) -> None:
        """Runs on_epoch callbacks in order, off the RPC path; then signals the finish."""
        while True:
            item = await self._notices.get()
            if item is None:
                return
            if isinstance(item, core.TrainingFinished):
                self.finished.set()
                continue
            try:
                result = self.on_epoch(item)  # type: ignore[misc]
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("on_epoch callback failed for epoch %d", item.epoch)

    async def _run_ticks(self) -> None:
        # Deadlines are checked at a tenth of the timeout: removal happens at most 10% late.
        interval = min(1.0, max(0.02, self.config.worker_timeout / 10))
        while True:
            await asyncio.sleep(interval)
            try:
                self._execute(self.core.tick(time.monotonic()))
            except Exception:
                log.exception("tick failed")
