"""The Evochi worker: subclass, implement the hooks, `await worker.start()`.

The API is the published evochi client's (`initialize`, `evaluate`, `optimize`,
`on_stop`, `on_state_change`, `Eval.from_flat`), with the failures it had fixed:

* hooks run in a thread (or are awaited when they are coroutines), so heartbeats keep
  flowing while an evaluation takes minutes;
* `start()` returns when the server sends stop or ends the stream, and raises a clear
  `EvochiError` when the server is unreachable, refuses the worker or the stream breaks;
  with `reconnect=` it rejoins (as a new worker that receives the state in hello), once the
  hook thread of the dropped session has returned: hooks never run beside each other. The
  result of an evaluation that outlived its session is still delivered (the server records
  the members nobody else has). A server gone for longer than `give_up_after` ends
  `start()`: normally when this worker had finished the last epoch, else with
  `ServerGoneError`;
* results are checked before they are sent, so a wrong slice or a NaN reward is reported
  where it was produced instead of as a remote INVALID_ARGUMENT;
* states received from the network are decoded with an allow-list (see `codec`).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import contextvars
import inspect
import logging
import math
import random
import threading
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, NamedTuple, TypeVar

import grpc
import grpc.aio
import numpy as np
from google.protobuf import timestamp_pb2

from evochi.v1 import evochi_pb2 as pb
from evochi.v1 import evochi_pb2_grpc as pb_grpc
from evochi.v1.channel import insecure_channel
from evochi.v1.codec import PickleZstdCodec, StateCodec
from evochi.v1.errors import (
    ProtocolError,
    ServerGoneError,
    ServerUnavailableError,
    StreamBrokenError,
    SubscriptionRejectedError,
)
from evochi.v1.metrics import MAX_METRICS, metric_name_error

S = TypeVar("S")

log = logging.getLogger("evochi.worker")

# Codes on Subscribe that mean "this worker may not join", as opposed to "try again".
_REJECTION_CODES = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
# Codes on a Finish* call meaning the server no longer wants this result (the task was
# re-assigned after a timeout, or the epoch moved on): drop it and keep serving.
_STALE_TASK_CODES = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION})
# An encoding this quick blocks heartbeats and other events less than a thread hop costs.
_INLINE_ENCODE_SECONDS = 0.001
# gRPC waits up to 2 minutes between its own connection attempts after a long outage, so a
# server that is back would go unnoticed for that long: a reconnecting worker must find a
# restarted server (or one that only briefly says its training has finished) within about
# one of its own retry delays.
_CHANNEL_OPTIONS = (("grpc.max_reconnect_backoff_ms", 1000),)
# give_up_after="auto": this many heartbeat intervals of the server (30 s, the reference
# server's, before the first hello), and never less than _MIN_GIVE_UP seconds.
_GIVE_UP_INTERVALS = 10
_MIN_GIVE_UP = 60.0
# Seconds a late evaluation result may take to reach a server that is still there.
_LATE_RESULT_TIMEOUT = 30.0


class _EvalFields(NamedTuple):
    slice: slice
    rewards: list[float]


class Eval(_EvalFields):
    """The rewards of one evaluated slice; ``len(rewards) == slice.stop - slice.start``.

    ``metrics`` optionally maps names (e.g. ``"env_steps"``) to one value per member of
    the slice; they travel in the ``Evaluation.metrics`` protocol extension and the server
    sums them per epoch (``EpochSummary.metrics``). Servers that do not know the extension
    ignore them. At most 16 names of at most 64 characters of ``[A-Za-z0-9_.:/-]``.

    Still the published two-field named tuple (``slice, rewards = ev`` works); ``metrics``
    is an attribute beside the fields.
    """

    metrics: Mapping[str, Sequence[float]] | None = None

    def __new__(
        cls,
        slice: slice,
        rewards: list[float],
        metrics: Mapping[str, Sequence[float]] | None = None,
    ) -> Eval:
        self = super().__new__(cls, slice, rewards)
        if metrics is not None:
            self.metrics = metrics
        return self

    def __repr__(self) -> str:
        base = f"Eval(slice={self.slice!r}, rewards={self.rewards!r}"
        return base + (f", metrics={self.metrics!r})" if self.metrics is not None else ")")

    @staticmethod
    def from_flat(
        slices: Sequence[slice],
        rewards: Sequence[float],
        metrics: Mapping[str, Sequence[float]] | None = None,
    ) -> list[Eval]:
        """Splits one flat reward list, in slice order, into one `Eval` per slice.

        ``metrics`` maps names to flat value lists in the same order as ``rewards``.
        """
        widths = [s.stop - s.start for s in slices]
        total = sum(widths)
        if len(rewards) != total:
            raise ValueError(f"got {len(rewards)} rewards for slices totalling {total} members")
        flat = {}
        for name, values in (metrics or {}).items():
            flat[name] = np.asarray(values, dtype=np.float64)
            if flat[name].shape != (total,):
                raise ValueError(
                    f"metric {name!r} has shape {flat[name].shape}; expected {total} values, "
                    "one per member in slice order"
                )
        evals, offset = [], 0
        for s, width in zip(slices, widths, strict=True):
            part = {name: v[offset : offset + width].tolist() for name, v in flat.items()}
            rs = [float(r) for r in rewards[offset : offset + width]]
            evals.append(Eval(s, rs, part or None))
            offset += width
        return evals


@dataclass(frozen=True)
class ReconnectPolicy:
    """Exponential backoff with jitter between reconnection attempts.

    `max_attempts` counts consecutive failures; it resets once a session gets its hello.
    None retries forever (until the worker's `give_up_after`). Once a server has said its
    heartbeat interval, the worker never waits longer than that between attempts: the server
    drops a worker silent for two intervals anyway, and a server that restarted with a
    finished training says so only for a while.
    """

    initial_delay: float = 0.5
    max_delay: float = 30.0
    multiplier: float = 2.0
    max_attempts: int | None = None

    def delay(self, attempt: int) -> float:
        base = min(self.max_delay, self.initial_delay * self.multiplier ** (attempt - 1))
        return base * random.uniform(0.8, 1.0)


@dataclass
class _InFlight:
    """A plain evaluate or optimize hook whose result is still wanted if its session ends
    first: the server may record a late evaluation, and an optimize result is the state."""

    kind: int  # pb.EVENT_TYPE_EVALUATE or pb.EVENT_TYPE_OPTIMIZE
    task_id: str
    epoch: int
    slices: list[slice]
    auth: grpc.aio.Metadata | None  # the session's token: a late result is that worker's
    result: asyncio.Future[Any]


class Worker(abc.ABC, Generic[S]):
    """A member of an Evochi training. Subclass it and implement the three hooks.

    Args:
        channel: a `grpc.aio` channel to the server, or its address ("host:port"), in
            which case a channel with message limits fit for real states is made.
        cores: how many population members this worker evaluates per task at most.
        codec: how states become bytes; defaults to the published client's
            ``zstd(pickle(state))`` with unpickling restricted to the state's own type
            (taken from ``Worker[State]``) and plain data.
        reconnect: rejoin after a lost connection; True uses the default backoff.
        connect_timeout: seconds to wait for the server before raising
            ServerUnavailableError (None waits forever).
        join_token: the server's join token, when it requires one.
        give_up_after: with `reconnect`, seconds without a server (counted from the end of
            the last session, or from `start()`) after which the worker stops trying.
            `start()` then returns normally (after `on_stop`) when this worker had applied
            the last epoch's optimize step (the training can only have finished), and
            raises ServerGoneError otherwise. "auto": 10 heartbeat intervals of the server
            (5 worker timeouts; 300 s before the first hello), at least 60 s. None: never.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel | str,
        cores: int,
        *,
        codec: StateCodec[S] | None = None,
        reconnect: bool | ReconnectPolicy = False,
        connect_timeout: float | None = 30.0,
        join_token: str | None = None,
        give_up_after: float | Literal["auto"] | None = "auto",
    ) -> None:
        if not isinstance(cores, int) or cores <= 0:
            raise ValueError(f"cores must be a positive integer, got {cores!r}")
        if give_up_after not in (None, "auto") and (
            isinstance(give_up_after, bool)
            or not isinstance(give_up_after, int | float)
            or not give_up_after > 0
        ):
            raise ValueError(
                f"give_up_after must be a positive number of seconds, 'auto' or None, "
                f"got {give_up_after!r}"
            )
        # A channel given as an address is made in start(): grpc.aio channels belong to an
        # event loop, and a worker may well be built before one runs.
        self._target = channel if isinstance(channel, str) else "the server"
        self._channel: grpc.aio.Channel | None = None if isinstance(channel, str) else channel
        self._stub: pb_grpc.EvochiServiceStub | None = (
            None if self._channel is None else pb_grpc.EvochiServiceStub(self._channel)
        )
        self._cores = cores
        self._codec: StateCodec[S] = (
            codec if codec is not None else PickleZstdCodec(_state_types(type(self)))
        )
        if reconnect is True:
            reconnect = ReconnectPolicy()
        self._reconnect: ReconnectPolicy | None = reconnect or None
        self._connect_timeout = connect_timeout
        self._join_token = join_token
        self._give_up_after = give_up_after

        self._id: str | None = None
        self._token: str | None = None
        # Built once per session: grpc.aio converts any other sequence on every call.
        self._auth: grpc.aio.Metadata | None = None
        self._population_size: int | None = None
        self._max_epochs: int | None = None
        self._heartbeat_interval = 0
        self._state: S | None = None
        self._epoch = 0
        self._closed = False
        self._session: asyncio.Task[bool] | None = None
        self._in_flight: _InFlight | None = None
        # This worker applied the optimize step of the training's last epoch (and has not
        # joined a training since): its state is final, the training can only have finished.
        self._at_end = False
        # Encoding a small state takes microseconds, a thread hop (and the GIL hand-back
        # under load) milliseconds on the epoch's critical path: encode on the event loop
        # while the last encoding was this quick.
        self._encode_inline = False
        # The digest of the current state, once computed: a sharer sends the digest of the
        # state it just reported after its update, and hashing a large state twice costs
        # real time. Cleared whenever the state is replaced.
        self._digested: tuple[Any, bytes] | None = None
        # Held by the thread of a plain hook while it runs; see _call_hook.
        self._hook_lock = threading.Lock()

    # ----------------------------------------------------------------- properties
    @property
    def id(self) -> str:
        """The id the server gave this worker in hello."""
        if self._id is None:
            raise RuntimeError("the worker has not joined a training yet")
        return self._id

    @property
    def cores(self) -> int:
        return self._cores

    @property
    def population_size(self) -> int:
        if self._population_size is None:
            raise RuntimeError("the worker has not joined a training yet")
        return self._population_size

    @property
    def max_epochs(self) -> int:
        """The training's epoch limit; 0 means none."""
        if self._max_epochs is None:
            raise RuntimeError("the worker has not joined a training yet")
        return self._max_epochs

    @property
    def state(self) -> S:
        if self._state is None:
            raise RuntimeError("the worker has no state yet")
        return self._state

    @property
    def ready(self) -> bool:
        """True once the worker has joined (received hello)."""
        return self._token is not None

    @property
    def heartbeat_interval(self) -> int:
        return self._heartbeat_interval

    @property
    def epoch(self) -> int:
        """The last epoch this worker received a task for (0 before any)."""
        return self._epoch

    @property
    def codec(self) -> StateCodec[S]:
        return self._codec

    # ---------------------------------------------------------------------- hooks
    @abc.abstractmethod
    def initialize(self) -> S:
        """Builds the initial state. Called on the first worker of a training only."""

    @abc.abstractmethod
    def evaluate(self, epoch: int, slices: list[slice]) -> list[Eval]:
        """Evaluates the population members in `slices`; one `Eval` per slice."""

    @abc.abstractmethod
    def optimize(self, epoch: int, rewards: list[float]) -> S:
        """Updates the state from the whole population's rewards (index = member)."""

    def on_stop(self, cancel: Callable[[], None]) -> None:
        """Called when the server ends the training. `start()` returns after it.

        `cancel` closes the stream at once; calling it is optional.
        """

    def on_state_change(self, state: S) -> None:
        """Called whenever `self.state` is replaced (hello, initialize, optimize, and the
        training's state adopted after a drift)."""

    def adopt_state(self, state: S) -> None:
        """Hold `state` as if the server had sent it: sets `self.state` and calls
        `on_state_change`. For using a worker without a server (evaluating a checkpoint,
        stepping a training by hand, tests); a connected worker's state is the server's."""
        self._state = state
        self._digested = None
        self.on_state_change(state)

    def state_digest(self, state: S) -> bytes | None:
        """A digest of what decides this worker's next evaluations (e.g. a hash of the
        center), or None (the default) to send none.

        Sent with each update's result; when it differs from the digest of the state the
        training shares (another CPU, BLAS or GPU rounded differently), the server sends
        the shared state with this worker's next task, and the worker adopts it before
        working on it. Servers without the extension ignore it."""
        return None

    def on_hello(self) -> None:
        """Called once joined, before the hello state is decoded: `id`, `population_size`
        and `max_epochs` are known. Raise to refuse the training (e.g. a mismatch)."""

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Joins the training and serves it until the server says stop.

        Raises ServerUnavailableError (ServerGoneError once `give_up_after` has passed),
        SubscriptionRejectedError, StreamBrokenError or ProtocolError; any exception from a
        hook propagates unchanged.
        """
        if self._closed:
            raise RuntimeError("the worker is closed")
        if self._channel is None:
            self._channel = insecure_channel(self._target, options=_CHANNEL_OPTIONS)
            self._stub = pb_grpc.EvochiServiceStub(self._channel)
        self._in_flight = None
        attempt = 0
        gone_since = time.monotonic()
        while True:
            try:
                await self._wait_for_idle_hooks()
                await self._wait_for_server(self._give_up_seconds(gone_since))
                self._session = asyncio.ensure_future(self._run_session())
                await self._session
                return
            except (ServerUnavailableError, StreamBrokenError) as exc:
                if self._reconnect is None or self._closed:
                    raise
                joined = self.ready
                attempt = 1 if joined else attempt + 1
                self._forget_session()
                await self._settle_in_flight()
                if self._closed:
                    raise
                if joined:
                    # Counted from here: while its hook ran, the worker did not look.
                    gone_since = time.monotonic()
                limit = self._reconnect.max_attempts
                if limit is not None and attempt > limit:
                    raise
                left = self._give_up_seconds(gone_since)
                if left is not None and left <= 0:
                    await self._give_up(exc, time.monotonic() - gone_since)
                    return
                delay = self._reconnect.delay(attempt)
                if self._heartbeat_interval > 0:
                    delay = min(delay, float(self._heartbeat_interval))
                if left is not None:
                    delay = min(delay, left)
                log.warning("%s; reconnecting in %.1fs (attempt %d)", exc, delay, attempt)
                await asyncio.sleep(delay)
            finally:
                self._session = None

    async def close(self) -> None:
        """Leaves the training (the server re-assigns this worker's work) and closes
        the channel. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        session = self._session
        if session is not None and not session.done():
            # Let the session unwind (stop heartbeats, cancel the stream) before the
            # channel goes away under it.
            session.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await session
        if self._channel is not None:
            await self._channel.close()

    async def __aenter__(self) -> Worker[S]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----------------------------------------------------------------- internals
    @property
    def _rpc(self) -> pb_grpc.EvochiServiceStub:
        if self._stub is None:
            raise RuntimeError("the worker is not started")
        return self._stub

    def _forget_session(self) -> None:
        self._id = self._token = self._auth = None

    def _give_up_bound(self) -> float | None:
        """Seconds without a server after which a reconnecting worker gives up; None: never."""
        if self._reconnect is None or self._give_up_after is None:
            return None
        if self._give_up_after == "auto":
            interval = self._heartbeat_interval or 30
            return max(_MIN_GIVE_UP, float(_GIVE_UP_INTERVALS * interval))
        return float(self._give_up_after)

    def _give_up_seconds(self, gone_since: float) -> float | None:
        """Seconds left before a reconnecting worker gives up; None: never."""
        bound = self._give_up_bound()
        return None if bound is None else gone_since + bound - time.monotonic()

    async def _give_up(self, exc: Exception, waited: float) -> None:
        """No server for `give_up_after`: a normal end if this worker had reached the end of
        the training (the server finished and exited, or died at the very end), else
        ServerGoneError."""
        last = f"epoch {self._epoch}" + (f" of {self._max_epochs}" if self._max_epochs else "")
        bound = self._give_up_bound()
        if self._at_end:
            log.warning(
                "no evochi server at %s for %.0fs; this worker had finished the last epoch "
                "(%s), so the training has finished: stopping",
                self._target, waited, last,
            )  # fmt: skip
            await self._call_hook(self.on_stop, lambda: None)
            return
        seen = (
            "it never joined a training"
            if self._max_epochs is None
            else f"the training had not finished when it was last seen ({last})"
        )
        message = (
            f"gave up on the evochi server at {self._target}: unreachable for {waited:.1f}s "
            f"(give_up_after={bound:g}s), and {seen}; last error: {exc}"
        )
        log.error("%s", message)
        raise ServerGoneError(message) from exc

    async def _wait_for_idle_hooks(self) -> None:
        """Rejoins only once the hook thread of the dropped session returned: the server would
        hand the new session tasks whose deadlines pass while that thread still runs."""
        if not self._hook_lock.locked():
            return
        log.warning("waiting for the dropped session's hook to return before rejoining")

        def wait() -> None:
            with self._hook_lock:
                pass

        await asyncio.to_thread(wait)

    async def _wait_for_server(self, give_up_in: float | None = None) -> None:
        timeout = self._connect_timeout
        if give_up_in is not None:
            shorter = max(give_up_in, 0.5)  # a last try still needs a moment to connect
            timeout = shorter if timeout is None else min(timeout, shorter)
        try:
            assert self._channel is not None
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            raise ServerUnavailableError(
                f"could not connect to {self._target} within {timeout:.3g}s; "
                "is the evochi server running and reachable?"
            ) from None

    async def _run_session(self) -> bool:
        metadata = (("authorization", f"Bearer {self._join_token}"),) if self._join_token else None
        call = self._rpc.Subscribe(pb.SubscribeRequest(cores=self._cores), metadata=metadata)
        tasks: list[asyncio.Task[Any]] = []
        try:
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as exc:
                raise _subscribe_error(exc, self._target) from exc
            if first is grpc.aio.EOF:
                raise StreamBrokenError("the server closed the stream before sending hello")
            if first.type != pb.EVENT_TYPE_HELLO:
                raise ProtocolError(f"expected hello as first event, got {_event_name(first)}")
            await self._on_hello(first.hello)

            heartbeats = asyncio.create_task(self._heartbeat_loop())
            events = asyncio.create_task(self._event_loop(call))
            tasks = [heartbeats, events]
            done, _ = await asyncio.wait(tasks, return_when="FIRST_COMPLETED")
            if events not in done:  # heartbeats only end by failing
                heartbeats.result()
            return events.result()
        finally:
            # Whatever ended the session (stop, failure, close()), nothing of it may outlive
            # it: a task still finishing a result would call into a closed channel.
            for task in tasks:
                task.cancel()
                task.add_done_callback(_consume_outcome)
            call.cancel()

    async def _event_loop(self, call: Any) -> bool:
        """Serves events until stop (returns True) or the server ends the stream (False)."""
        while True:
            try:
                event = await call.read()
            except grpc.aio.AioRpcError as exc:
                raise StreamBrokenError(
                    f"the event stream broke: {exc.code().name}: {exc.details()}", exc.code()
                ) from exc
            if event is grpc.aio.EOF:
                log.info("the server ended the event stream")
                return False
            if await self._dispatch(event, call):
                return True

    async def _dispatch(self, event: pb.SubscribeResponse, call: Any) -> bool:
        kind = event.type
        if kind == pb.EVENT_TYPE_EVALUATE:
            ev = event.evaluate
            self._epoch = ev.epoch
            if ev.HasField("state"):
                await self._adopt(ev.state, ev.epoch)
            slices = [slice(s.start, s.end) for s in ev.slices]
            evals = await self._call_kept(
                kind, ev.task_id, ev.epoch, slices, self.evaluate, ev.epoch, slices
            )
            request = pb.FinishEvaluationRequest(
                task_id=ev.task_id, evaluations=_to_evaluations(slices, evals)
            )
            await self._finish(self._rpc.FinishEvaluation, request)
            self._in_flight = None  # only now: cut off mid-call, it is sent again late
        elif kind == pb.EVENT_TYPE_OPTIMIZE:
            ev = event.optimize
            self._epoch = ev.epoch
            if ev.HasField("state"):
                await self._adopt(ev.state, ev.epoch)
            # numpy turns the repeated field into floats faster than list() (same values).
            rewards = np.asarray(ev.rewards).tolist()
            state = await self._call_kept(
                kind, ev.task_id, ev.epoch, [], self.optimize, ev.epoch, rewards
            )
            self._in_flight = None
            await self._optimized(ev.epoch, state)
            request = pb.FinishOptimizationRequest(
                task_id=ev.task_id, state_digest=await self._digest(state)
            )
            await self._finish(self._rpc.FinishOptimization, request)
        elif kind == pb.EVENT_TYPE_SHARE_STATE:
            state = self.state
            request = pb.FinishShareStateRequest(
                task_id=event.share_state.task_id,
                state=await self._encode(state),
                state_digest=await self._digest(state),
            )
            await self._finish(self._rpc.FinishShareState, request)
        elif kind == pb.EVENT_TYPE_INITIALIZE:
            state = await self._call_hook(self.initialize)
            await self._set_state(state)
            request = pb.FinishInitializationRequest(
                task_id=event.initialize.task_id,
                state=await self._encode(state),
                state_digest=await self._digest(state),
            )
            await self._finish(self._rpc.FinishInitialization, request)
        elif kind == pb.EVENT_TYPE_STOP:
            log.info("the server stopped the training")
            await self._call_hook(self.on_stop, call.cancel)
            return True
        else:
            # Newer servers may add events; ignoring unknown ones keeps old workers useful.
            log.warning("ignoring unknown event %s", _event_name(event))
        return False

    async def _call_kept(
        self,
        kind: int,
        task_id: str,
        epoch: int,
        slices: list[slice],
        hook: Callable[..., Any],
        *args: Any,
    ) -> Any:
        """`_call_hook` for evaluate and optimize: a plain hook's thread goes on when its
        session ends (nothing can stop it), and its result is kept in `_in_flight` for
        `_settle_in_flight`. A coroutine hook is cancelled with its session."""
        if inspect.iscoroutinefunction(hook):
            return await hook(*args)
        result = self._start_hook(hook, *args)
        result.add_done_callback(_consume_outcome)  # nobody may await it after a close()
        self._in_flight = _InFlight(kind, task_id, epoch, slices, self._auth, result)
        value = await asyncio.shield(result)
        if inspect.isawaitable(value):
            value = await value
        return value

    def _start_hook(self, hook: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """A plain hook in a thread, holding the hook lock (see _call_hook)."""

        def locked() -> Any:
            with self._hook_lock:
                return hook(*args)

        context = contextvars.copy_context()
        return asyncio.get_running_loop().run_in_executor(None, context.run, locked)

    async def _settle_in_flight(self) -> None:
        """After a session ended in the middle of a plain evaluate or optimize hook: waits for
        it, then sends the evaluation with the dropped session's token (the server records
        the members nobody else has) or keeps the optimized state (final if that was the
        last epoch). Exceptions of the hook propagate, as in a session."""
        flight, self._in_flight = self._in_flight, None
        if flight is None or self._closed:
            return
        if not flight.result.done():
            log.warning("the session ended during the %s of epoch %d; waiting for it to return",
                        "evaluation" if flight.kind == pb.EVENT_TYPE_EVALUATE else "optimize "
                        "step", flight.epoch)  # fmt: skip
        value = await flight.result
        if inspect.isawaitable(value):
            value = await value
        if self._closed:
            return
        if flight.kind == pb.EVENT_TYPE_OPTIMIZE:
            await self._optimized(flight.epoch, value)
            return
        request = pb.FinishEvaluationRequest(
            task_id=flight.task_id, evaluations=_to_evaluations(flight.slices, value)
        )
        try:
            await self._rpc.FinishEvaluation(
                request, metadata=flight.auth, timeout=_LATE_RESULT_TIMEOUT
            )
        except grpc.aio.AioRpcError as exc:
            log.info("the late result of task %s was not taken: %s: %s", flight.task_id,
                     exc.code().name, exc.details())  # fmt: skip
        else:
            log.info("the late result of task %s was taken", flight.task_id)

    async def _optimized(self, epoch: int, state: S) -> None:
        if self._max_epochs and epoch >= self._max_epochs:
            self._at_end = True
        await self._set_state(state)

    async def _on_hello(self, hello: pb.HelloEvent) -> None:
        self._at_end = False
        self._id = hello.id
        self._token = hello.token
        self._auth = grpc.aio.Metadata(("authorization", f"Bearer {hello.token}"))
        self._population_size = hello.population_size
        self._max_epochs = hello.max_epochs
        self._heartbeat_interval = hello.heartbeat_interval
        log.info(
            "joined as worker %s (population %d, heartbeat every %ds)",
            hello.id,
            hello.population_size,
            hello.heartbeat_interval,
        )
        if type(self).on_hello is not Worker.on_hello:
            await self._call_hook(self.on_hello)
        if hello.HasField("state"):
            state = await asyncio.to_thread(self._codec.decode, hello.state)
            await self._set_state(state)

    async def _digest(self, state: S) -> bytes:
        if type(self).state_digest is Worker.state_digest:
            return b""
        cached = self._digested
        if cached is not None and cached[0] is state:
            return cached[1]
        digest = bytes(await asyncio.to_thread(self.state_digest, state) or b"")
        self._digested = (state, digest)
        return digest

    async def _adopt(self, blob: bytes, epoch: int) -> None:
        """Replaces this worker's state by the training's, which the server sent because
        this worker's digest after the last update differed from it."""
        state = await asyncio.to_thread(self._codec.decode, blob)
        log.warning(
            "this worker's state differed from the training's at the start of epoch %d "
            "(its CPU, BLAS or GPU rounded differently); adopting the training's state",
            epoch,
        )
        await self._set_state(state)

    async def _set_state(self, state: S) -> None:
        self._state = state
        self._digested = None  # a hook may have changed a state object in place
        if type(self).on_state_change is not Worker.on_state_change:
            await self._call_hook(self.on_state_change, state)

    def _metadata(self) -> grpc.aio.Metadata:
        if self._auth is None:
            raise RuntimeError("the worker has no token yet")
        return self._auth

    async def _encode(self, state: S) -> bytes:
        def timed() -> bytes:
            started = time.perf_counter()
            blob = self._codec.encode(state)
            self._encode_inline = time.perf_counter() - started < _INLINE_ENCODE_SECONDS
            return blob

        return timed() if self._encode_inline else await asyncio.to_thread(timed)

    async def _finish(self, method: Any, request: Any) -> None:
        try:
            await method(request, metadata=self._metadata())
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in _STALE_TASK_CODES:
                # Normal operation (a re-issued copy won, or the training just ended): no alarm.
                log.info("the server dropped a late result (%s): %s", code.name, exc.details())
                return
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise ProtocolError(f"the server refused a result: {exc.details()}") from exc
            raise StreamBrokenError(
                f"{type(request).__name__} failed: {code.name}: {exc.details()}", code
            ) from exc

    async def _call_hook(self, hook: Callable[..., Any], *args: Any) -> Any:
        """Awaits coroutine hooks; runs plain ones in a thread so the event loop (and with it
        the heartbeats) keeps running. One plain hook at a time: a session that ends (the
        server dropped this worker for a missed deadline) cannot stop its hook's thread, so
        the rejoined session's hooks wait for it instead of running beside it on the same
        objects (environments, the state; MuJoCo crashed on that)."""
        if inspect.iscoroutinefunction(hook):
            return await hook(*args)
        result = await self._start_hook(hook, *args)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _heartbeat_loop(self) -> None:
        interval = max(1, self._heartbeat_interval)
        seq_id = 0
        while True:
            seq_id += 1
            timestamp = timestamp_pb2.Timestamp()
            timestamp.GetCurrentTime()
            try:
                response = await self._rpc.Heartbeat(
                    pb.HeartbeatRequest(seq_id=seq_id, timestamp=timestamp),
                    metadata=self._metadata(),
                    timeout=max(2.0 * interval, 10.0),
                )
            except grpc.aio.AioRpcError as exc:
                raise StreamBrokenError(
                    f"heartbeat {seq_id} failed: {exc.code().name}: {exc.details()}", exc.code()
                ) from exc
            if not response.ok:
                raise StreamBrokenError(f"the server refused heartbeat {seq_id}")
            await asyncio.sleep(interval)


def _consume_outcome(task: asyncio.Future[Any]) -> None:
    """Marks a cancelled session task's outcome as seen (the session already reported)."""
    if not task.cancelled():
        task.exception()


def _to_evaluations(slices: list[slice], evals: Sequence[Eval]) -> list[pb.Evaluation]:
    """Checks that `evals` answer exactly the assigned slices with finite rewards."""
    if not isinstance(evals, Sequence) or isinstance(evals, str | bytes):
        raise TypeError(f"evaluate() must return a list of Eval, got {type(evals).__name__}")
    assigned = {(s.start, s.stop) for s in slices}
    seen: set[tuple[int, int]] = set()
    non_finite: list[int] = []
    names: set[str] = set()  # over the whole result: the server bounds names per training
    out = []
    for ev in evals:
        sl, rewards = ev[0], ev[1]
        key = (sl.start, sl.stop)
        if key not in assigned:
            raise ValueError(
                f"evaluate() returned slice [{sl.start}, {sl.stop}) which was not assigned; "
                f"assigned: {', '.join(f'[{a}, {b})' for a, b in sorted(assigned))}"
            )
        if key in seen:
            raise ValueError(f"evaluate() returned slice [{sl.start}, {sl.stop}) twice")
        seen.add(key)
        values = list(map(float, rewards))
        if len(values) != sl.stop - sl.start:
            raise ValueError(
                f"evaluate() returned {len(values)} rewards for slice [{sl.start}, {sl.stop}) "
                f"of {sl.stop - sl.start} members"
            )
        if not all(map(math.isfinite, values)):  # the index scan only when one is bad
            non_finite += [sl.start + i for i, r in enumerate(values) if not math.isfinite(r)]
        message = pb.Evaluation(slice=pb.Slice(start=sl.start, end=sl.stop), rewards=values)
        metrics = getattr(ev, "metrics", None)
        if metrics:
            message.metrics.extend(_to_metrics(sl, metrics, names))
        out.append(message)
    missing = assigned - seen
    if missing:
        raise ValueError(
            "evaluate() returned no rewards for slices "
            + ", ".join(f"[{a}, {b})" for a, b in sorted(missing))
        )
    if non_finite:
        raise ValueError(f"non-finite rewards for members {sorted(non_finite)[:20]}")
    return out


def _to_metrics(
    sl: slice, metrics: Mapping[str, Sequence[float]], names: set[str]
) -> list[pb.Metric]:
    """Checks one slice's metrics as the server will (see `evochi.v1.metrics`)."""
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"Eval.metrics must map names to values, got {type(metrics).__name__} "
            f"for slice [{sl.start}, {sl.stop})"
        )
    width = sl.stop - sl.start
    out = []
    for name, values in metrics.items():
        error = metric_name_error(name)
        if error is not None:
            raise ValueError(f"evaluate() returned a bad metric for slice "
                             f"[{sl.start}, {sl.stop}): {error}")  # fmt: skip
        names.add(name)
        if len(names) > MAX_METRICS:
            raise ValueError(
                f"evaluate() returned more than {MAX_METRICS} metric names: "
                f"{', '.join(sorted(names))}"
            )
        arr = np.asarray(values, dtype=np.float64)
        if arr.shape != (width,):
            raise ValueError(
                f"evaluate() returned {arr.size} values of metric {name!r} for slice "
                f"[{sl.start}, {sl.stop}) of {width} members"
            )
        if not np.isfinite(arr).all():
            bad = (np.flatnonzero(~np.isfinite(arr)) + sl.start).tolist()
            raise ValueError(f"non-finite values of metric {name!r} for members {bad[:20]}")
        out.append(pb.Metric(name=name, values=arr.tolist()))
    return out


def _subscribe_error(exc: grpc.aio.AioRpcError, target: str) -> Exception:
    code = exc.code()
    if code in _REJECTION_CODES:
        return SubscriptionRejectedError(code, exc.details() or "")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ServerUnavailableError(f"could not subscribe to {target}: {exc.details()}")
    return StreamBrokenError(f"subscribe failed: {code.name}: {exc.details()}", code)


def _event_name(event: pb.SubscribeResponse) -> str:
    try:
        return pb.EventType.Name(event.type)
    except ValueError:
        return f"event type {event.type}"


def _state_types(worker_type: type) -> list[type]:
    """The S of ``class MyWorker(Worker[S])``, when it is a class, for the allow-list."""
    for klass in worker_type.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            if typing.get_origin(base) is Worker:
                (arg,) = typing.get_args(base)
                if isinstance(arg, type):
                    return [arg]
    return []
