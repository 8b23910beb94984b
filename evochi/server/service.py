"""The service: the pure core plus its side effects, independent of the gRPC transport.

Transports (``evochi.server.http2``, the default, and ``evochi.server.grpcio``) hand over
raw request bytes and the bearer token; the service decodes them (so undecodable bytes get
INVALID_ARGUMENT instead of a generic INTERNAL), calls the core and returns serialized
responses. Rejections are :class:`core.CoreError` exceptions carrying the gRPC status code
name. Everything runs on one asyncio event loop and every core call is synchronous, so the
core is never mutated concurrently and needs no lock.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import inspect
import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from google.protobuf.message import DecodeError

from evochi.server import core
from evochi.server.config import ServerConfig
from evochi.server.metrics import ServerMetrics
from evochi.server.store import Checkpoint, CheckpointWriter
from evochi.v1 import evochi_pb2 as pb

__all__ = ["EpochCallback", "EvochiService", "WorkerStream"]

log = logging.getLogger("evochi.server")

SERVICE_NAME = "evochi.v1.EvochiService"
UNARY_METHODS = (
    "Heartbeat",
    "FinishEvaluation",
    "FinishOptimization",
    "FinishInitialization",
    "FinishShareState",
)
EpochCallback = Callable[[core.EpochSummary], Any]


class WorkerStream(Protocol):
    """One worker's Subscribe response stream, as a transport provides it."""

    def send(self, message: bytes) -> None:
        """Queue one serialized ``SubscribeResponse``; never blocks."""

    def close(self, code: str, message: str) -> None:
        """End the stream with this gRPC status (``"OK"``: a normal end) after what was sent."""


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


def parse_bearer(value: str | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` value, else None."""
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


_OK = pb.HeartbeatResponse(ok=True).SerializeToString()  # every Finish*Response alike


def _metric_pairs(metrics: Any) -> list[tuple[str, Any]]:
    """(name, values) pairs of the ``Evaluation.metrics`` extension, for the core."""
    return [(m.name, m.values) for m in metrics]


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
        restarted: bool = False,
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
                heartbeat_before_work=config.heartbeat_before_work,
            ),
            token_factory=JwtIssuer(config.jwt_secret),
            snapshot=snapshot,
        )
        self._streams: dict[str, WorkerStream] = {}
        self._notices: asyncio.Queue[Any] = asyncio.Queue()
        self._notice_task: asyncio.Task[None] | None = None
        self._tick_task: asyncio.Task[None] | None = None
        self.finished = asyncio.Event()
        # When a worker may last have started reconnecting: the last time one was lost
        # without its stop, or now when this server continues a stored training (the
        # previous server's workers are in their back-off). See linger_left().
        self.last_loss = time.monotonic() if restarted else -math.inf
        # Set once finished and every worker's stream has ended and every result still
        # owed (a straggler's) has arrived: a server may exit without failing a client.
        self.drained = asyncio.Event()
        # (id of the epoch's reward array, its packed little-endian float32 bytes)
        self._rewards_cache: tuple[int, bytes] | None = None
        # Prometheus children of the per-member metrics, by name (labels() costs a lock).
        self._metric_series: dict[str, tuple[Any, Any]] = {}
        self._join_token = config.join_token.encode() if config.join_token else None
        self._unary: dict[str, Callable[[bytes, str | None], bytes]] = {
            "Heartbeat": self._heartbeat,
            "FinishEvaluation": self._finish_evaluation,
            "FinishOptimization": self._finish_optimization,
            "FinishInitialization": self._finish_initialization,
            "FinishShareState": self._finish_share_state,
        }
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

    def linger_left(self, linger: float) -> float:
        """After the finish: seconds left until ``linger`` seconds have passed since a worker
        may last have started reconnecting (see ``last_loss``). A worker in its reconnect
        back-off then learns the training has finished (hello + stop) instead of finding no
        server; one that retries at least this often cannot miss it."""
        return max(0.0, self.last_loss + linger - time.monotonic())

    async def wait_drained(self, timeout: float | None = None) -> bool:
        """After the finish, waits until no worker is still owed an answer (see
        ``drained``), at most ``timeout`` seconds; returns whether it drained."""
        self._check_drained()
        try:
            await asyncio.wait_for(self.drained.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _check_drained(self) -> None:
        if (
            self.finished.is_set()
            and not self.drained.is_set()
            and not self._streams
            and self.core.outstanding_results(time.monotonic()) == 0
        ):
            self.drained.set()

    async def close(self, reason: str = "server stopping") -> None:
        """End every stream (UNAVAILABLE: the worker may reconnect) and the background tasks."""
        for stream in list(self._streams.values()):
            stream.close("UNAVAILABLE", reason)
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

    # ------------------------------------------------------------------ RPCs

    def admit(self, method: str, bearer: str | None) -> None:
        """Raises CoreError unless ``bearer`` may call ``method`` at all: lets a transport
        refuse a call from its headers, before buffering any of its request."""
        try:
            if method == "Subscribe":
                self._check_join_token(bearer)
            else:
                self._authenticate(bearer, removed=method == "FinishEvaluation")
        except core.CoreError as err:
            self._rejected(method, err)
            raise

    def _check_join_token(self, bearer: str | None) -> None:
        if self._join_token is not None and (
            bearer is None or not hmac.compare_digest(bearer.encode(), self._join_token)
        ):
            raise core.Unauthenticated("this server requires a join token")

    def subscribe(self, request: bytes, bearer: str | None, stream: WorkerStream) -> str:
        """Registers a worker whose events go to ``stream``; returns its id.

        The transport calls :meth:`stream_ended` once the stream is over, however it ends.
        """
        try:
            req = self._decode(pb.SubscribeRequest, request)
            self._check_join_token(bearer)
            worker_id, commands = self.core.join(req.cores, time.monotonic())
        except core.CoreError as err:
            self._rejected("Subscribe", err)
            raise
        self._streams[worker_id] = stream
        try:
            self._execute(commands)
        except BaseException:
            self.stream_ended(worker_id)  # the transport fails the call: nothing may linger
            raise
        return worker_id

    def stream_ended(self, worker_id: str) -> None:
        """The worker's stream is gone (closed by us, cancelled or disconnected)."""
        self._streams.pop(worker_id, None)
        if worker_id in self.core.workers:
            self._execute(self.core.leave(worker_id, time.monotonic(), "left"))
        self._check_drained()

    def unary(self, method: str, request: bytes, bearer: str | None) -> bytes:
        """The serialized response of a unary call; raises CoreError when rejected."""
        handler = self._unary.get(method)
        if handler is None:
            raise KeyError(method)
        try:
            response = handler(request, bearer)
        except core.CoreError as err:
            self._rejected(method, err)
            raise
        if self.finished.is_set():
            self._check_drained()  # a straggler's late result may be the last one owed
        return response

    def _heartbeat(self, request: bytes, bearer: str | None) -> bytes:
        worker_id = self._authenticate(bearer)
        req = self._decode(pb.HeartbeatRequest, request)
        # The first heartbeat proves the worker reads its stream: it may get work now.
        self._execute(self.core.heartbeat(worker_id, req.seq_id, time.monotonic()))
        return _OK

    def _finish_evaluation(self, request: bytes, bearer: str | None) -> bytes:
        # Before looking at what a stranger sent; a removed worker may still deliver the
        # evaluation it held.
        worker_id = self._authenticate(bearer, removed=True)
        req = self._decode(pb.FinishEvaluationRequest, request)
        evaluations = [
            (e.slice.start, e.slice.end, e.rewards, e.metrics and _metric_pairs(e.metrics))
            for e in req.evaluations
        ]
        self._execute(
            self.core.finish_evaluation(worker_id, req.task_id, evaluations, time.monotonic())
        )
        return _OK

    def _finish_optimization(self, request: bytes, bearer: str | None) -> bytes:
        worker_id = self._authenticate(bearer)  # before looking at what a stranger sent
        req = self._decode(pb.FinishOptimizationRequest, request)
        self._execute(
            self.core.finish_optimization(
                worker_id, req.task_id, time.monotonic(), req.state_digest
            )
        )
        return _OK

    def _finish_initialization(self, request: bytes, bearer: str | None) -> bytes:
        worker_id = self._authenticate(bearer)  # before looking at what a stranger sent
        req = self._decode(pb.FinishInitializationRequest, request)
        self._execute(
            self.core.finish_initialization(
                worker_id, req.task_id, req.state, time.monotonic(), req.state_digest
            )
        )
        return _OK

    def _finish_share_state(self, request: bytes, bearer: str | None) -> bytes:
        worker_id = self._authenticate(bearer)  # before looking at what a stranger sent
        req = self._decode(pb.FinishShareStateRequest, request)
        self._execute(
            self.core.finish_share_state(
                worker_id, req.task_id, req.state, time.monotonic(), req.state_digest
            )
        )
        return _OK

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _decode(cls: Any, data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError, TypeError) as err:
            raise core.InvalidArgument(f"malformed {cls.__name__}: {err}") from None

    def _authenticate(self, bearer: str | None, *, removed: bool = False) -> str:
        if bearer is None:
            raise core.Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        return self.core.authenticate(bearer, removed=removed)

    def _rejected(self, method: str, err: core.CoreError) -> None:
        self.metrics.rejected.labels(method, err.code).inc()
        log.debug("%s rejected: %s %s", method, err.code, err.message)

    def _to_message(self, event: core.Event) -> bytes:
        message = self._event_proto(event)
        return message if type(message) is bytes else message.SerializeToString()

    def _event_proto(self, event: core.Event) -> pb.SubscribeResponse | bytes:
        kind = type(event)
        if kind is core.Evaluate:
            evaluate = pb.EvaluateEvent(
                task_id=event.task_id,
                epoch=event.epoch,
                slices=[pb.Slice(start=s, end=e) for s, e in event.slices],
            )
            if event.state is not None:
                evaluate.state = event.state
            return pb.SubscribeResponse(type=pb.EVENT_TYPE_EVALUATE, evaluate=evaluate)
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
        state = event.state
        optimize = b"".join(
            (
                b"\x0a", _varint(len(task_id)), task_id,  # task_id = 1
                b"\x10", _varint(event.epoch),  # epoch = 2
                b"\x1a" if packed else b"", _varint(len(packed)) if packed else b"", packed,
                # state = 4 (extension), only for a worker that drifted
                b"" if state is None else b"\x22" + _varint(len(state)) + state,
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
                stream = self._streams.get(command.worker_id)
                if stream is not None:
                    stream.send(self._to_message(command.event))
            elif kind is core.TaskFinished:
                metrics.task_seconds_by_kind[command.kind].observe(command.seconds)
            elif kind is core.Close:
                stream = self._streams.get(command.worker_id)
                if stream is not None:
                    code, reason = command.code, command.reason
                    if code is None or code == "CANCELLED":
                        stream.close("OK", reason)
                    elif code == "UNAVAILABLE":
                        stream.close(code, reason)
                    else:
                        stream.close(code, f"removed from the training: {reason}")
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
                metrics.leave(command.cause)
                if command.cause != "training finished":
                    self.last_loss = time.monotonic()
                if command.returned_members:
                    metrics.reassignments.labels("evaluate").inc()
                if command.reassigned_task:
                    metrics.reassignments.labels(command.reassigned_task).inc()
                # A deadline shorter than one task drops the worker, which rejoins and gets
                # the same work: the server stretches that kind's deadline (up to 16x), and
                # the warning names the setting that avoids the loss.
                hint = (
                    f"; the {command.missed_kind} task outlasted its deadline (worker_timeout="
                    f"{self.config.worker_timeout:g}s), the next ones get "
                    f"{command.next_deadline_s:g}s; raise --worker-timeout if this repeats"
                    if command.missed_kind is not None
                    else ""
                )
                log.log(logging.WARNING if command.cause == "timeout" else logging.INFO,
                        "worker left id=%s reason=%r workers=%d returned_members=%d%s",
                        command.worker_id, command.reason, command.workers,
                        command.returned_members, hint)  # fmt: skip
            elif kind is core.Reissued:
                metrics.reissued_members.inc(command.members)
                log.info("re-issued %d members of a straggling evaluate task", command.members)
            elif kind is core.LateEvaluation:
                metrics.late_members.inc(command.members)
                log.info("recorded %d members of epoch %d from the late result of removed "
                         "worker %s", command.members, command.epoch,
                         command.worker_id)  # fmt: skip
            elif kind is core.StateDrift:
                metrics.state_repairs.labels(command.worker_id).inc()
                log.warning(
                    "worker %s computed other bits than the shared state for the start of "
                    "epoch %d (digest %s, the training's %s: another CPU, BLAS or GPU "
                    "rounding); its next task carries the training's state",
                    command.worker_id, command.epoch, command.digest.hex()[:12],
                    command.expected.hex()[:12],
                )  # fmt: skip
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
        for name, total in summary.metrics.items():
            series = self._metric_series.get(name)
            if series is None:  # at most MAX_METRICS names per training
                series = self._metric_series[name] = (
                    metrics.member_metric_sum.labels(name),
                    metrics.member_metric_members.labels(name),
                )
            series[0].inc(total)
            series[1].inc(summary.metric_members[name])
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
                self._check_drained()
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
                self._check_drained()  # owed results past their deadline are given up
            except Exception:
                log.exception("tick failed")
