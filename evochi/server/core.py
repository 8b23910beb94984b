"""The training as a pure, synchronous state machine.

No gRPC, no asyncio, no clock, no I/O: every method takes the current time as ``now`` (any
monotonic clock, in seconds) and returns a list of commands for the adapter to carry out
(send an event to a worker, close a worker's stream, log/measure something). Invalid
requests raise a :class:`CoreError` carrying the gRPC status code name, and change nothing.

Vocabulary:
- *epoch E* starts from ``state`` (the start state of E, ``None`` before initialization);
  its members' rewards are evaluated, every worker optimizes with the whole reward vector,
  one worker shares its new state, which is the start state of E + 1.
- a worker's ``state_epoch`` is the epoch whose start state it holds (0 = no state yet).
  Only workers at the current epoch evaluate; a worker behind (a late joiner, a straggler)
  is first given the optimize steps it missed, so its copy never falls behind.
- each member is *recorded* at most once per epoch (a boolean mask); ``cover`` counts the
  open evaluate tasks holding a member, so that a lost task returns exactly the members
  nobody else holds or has recorded to the stack of unassigned slices.
- a worker removed while it evaluated (missed deadline or heartbeat, lost stream) may still
  deliver that one task's result late: the members nobody has recorded yet are recorded
  from it (and taken off the stack); the rest is refused.
"""

from __future__ import annotations

import enum
import itertools
import math
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from evochi.errors import EvochiError
from evochi.protocol import MAX_METRICS, metric_name_error

__all__ = [
    "Close",
    "CoreConfig",
    "CoreError",
    "EpochCompleted",
    "EpochSummary",
    "Evaluate",
    "FailedPrecondition",
    "Hello",
    "Initialize",
    "InvalidArgument",
    "LateEvaluation",
    "LeaveCause",
    "NotFound",
    "Optimize",
    "Reissued",
    "ResourceExhausted",
    "Send",
    "ShareState",
    "Stage",
    "StateChanged",
    "Stop",
    "TaskFinished",
    "Training",
    "TrainingFinished",
    "TrainingSnapshot",
    "Unauthenticated",
    "WorkerJoined",
    "WorkerLeft",
]

# How many past epochs' reward vectors are kept for workers catching up on missed optimize
# steps; a worker further behind is dropped (it rejoins and receives the state in hello).
REWARD_HISTORY = 4
# Tokens of workers that saw the training finish stay valid for their late heartbeats and
# results (accepted and discarded); beyond this many, the oldest are forgotten.
RETIRED_LIMIT = 4096
# Evaluate tasks of removed workers whose late result may still come (one per worker);
# beyond this many, the oldest are forgotten (their results are then refused).
DROPPED_LIMIT = 1024
# A task that misses its deadline makes the next tasks of its kind get twice the time, up to
# 2**MAX_DEADLINE_STRETCH x worker_timeout: a worker too slow for the deadline rejoins and
# would otherwise get the same slice with the same deadline and miss it again, forever
# (one worker, or a population every worker needs longer for).
MAX_DEADLINE_STRETCH = 4


# --------------------------------------------------------------------------- errors


class CoreError(EvochiError):
    """A rejected request; ``code`` is the name of a ``grpc.StatusCode`` member."""

    code = "UNKNOWN"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CoreError):
    code = "INVALID_ARGUMENT"


class FailedPrecondition(CoreError):
    code = "FAILED_PRECONDITION"


class NotFound(CoreError):
    code = "NOT_FOUND"


class Unauthenticated(CoreError):
    code = "UNAUTHENTICATED"


class ResourceExhausted(CoreError):
    code = "RESOURCE_EXHAUSTED"


# --------------------------------------------------------------------------- events


@dataclass(slots=True, frozen=True)
class Hello:
    worker_id: str
    token: str
    state: bytes | None
    population_size: int
    heartbeat_interval: int
    max_epochs: int


@dataclass(slots=True, frozen=True)
class Evaluate:
    task_id: str
    epoch: int
    slices: tuple[tuple[int, int], ...]
    # The training's state, for a worker whose state digest differed from it (extension).
    state: bytes | None = None


@dataclass(slots=True, frozen=True)
class Optimize:
    task_id: str
    epoch: int
    # Shared, read-only: the same array object goes to every worker of an epoch.
    rewards: np.ndarray
    # As Evaluate.state.
    state: bytes | None = None


@dataclass(slots=True, frozen=True)
class Initialize:
    task_id: str


@dataclass(slots=True, frozen=True)
class ShareState:
    task_id: str
    epoch: int


@dataclass(slots=True, frozen=True)
class Stop:
    task_id: str


Event = Hello | Evaluate | Optimize | Initialize | ShareState | Stop


# --------------------------------------------------------------------------- commands


@dataclass(slots=True, frozen=True)
class Send:
    """Send ``event`` on the Subscribe stream of ``worker_id``."""

    worker_id: str
    event: Event


@dataclass(slots=True, frozen=True)
class Close:
    """End the Subscribe stream of ``worker_id`` (after what was sent before).

    ``code`` is None for a normal end (training finished), else the name of the gRPC status
    the stream ends with, so that the worker knows it was removed and may rejoin.
    """

    worker_id: str
    reason: str
    code: str | None = None


@dataclass(slots=True, frozen=True)
class EpochSummary:
    """One completed epoch, as handed to ``on_epoch`` callbacks."""

    epoch: int
    seconds: float
    workers: int
    rewards: np.ndarray
    # The start state of the next epoch, as sent by the sharing worker.
    state: bytes
    # Per-member metrics (the ``Evaluation.metrics`` protocol extension), by name: the sum
    # over the members that reported the metric, and how many did. Fewer members than the
    # population means the sum is partial: workers that do not report it (e.g. the
    # published client) took part. ``member_metrics`` holds each member's value (float64,
    # NaN where not reported; read-only).
    metrics: Mapping[str, float] = field(default_factory=dict)
    metric_members: Mapping[str, int] = field(default_factory=dict)
    member_metrics: Mapping[str, np.ndarray] = field(default_factory=dict)

    def metric_exact(self, name: str) -> bool:
        """True when every member of the epoch reported ``name``: its sum is exact."""
        return self.metric_members.get(name, 0) == len(self.rewards)


@dataclass(slots=True, frozen=True)
class EpochCompleted:
    summary: EpochSummary


@dataclass(slots=True, frozen=True)
class StateChanged:
    """A new start state exists (after initialization or an epoch): persist it."""

    epoch: int
    state: bytes


@dataclass(slots=True, frozen=True)
class TrainingFinished:
    epoch: int


@dataclass(slots=True, frozen=True)
class WorkerJoined:
    worker_id: str
    cores: int
    workers: int


LeaveCause = Literal["timeout", "left", "training finished", "server stopping", "behind", "other"]


@dataclass(slots=True, frozen=True)
class WorkerLeft:
    worker_id: str
    reason: str
    workers: int
    # Members whose evaluation went back on the stack, and whether an initialize or
    # share-state task has to be re-assigned.
    returned_members: int
    reassigned_task: str | None
    # The reason's class, for metrics and log levels (the reason carries details).
    cause: LeaveCause = "other"
    # A missed task deadline: that task's kind, and the seconds its next tasks get.
    missed_kind: str | None = None
    next_deadline_s: float | None = None


@dataclass(slots=True, frozen=True)
class TaskFinished:
    kind: str
    seconds: float


@dataclass(slots=True, frozen=True)
class Reissued:
    """Members of a straggling evaluate task handed to an idle worker as well."""

    members: int


@dataclass(slots=True, frozen=True)
class StateDrift:
    """A worker's state digest after an update differs from the shared state's: its next
    task carries the shared state, which it adopts before working on it."""

    worker_id: str
    epoch: int  # the epoch whose start state the digests describe
    digest: bytes
    expected: bytes


@dataclass(slots=True, frozen=True)
class LateEvaluation:
    """A removed worker's late evaluation result: ``members`` were recorded from it."""

    worker_id: str
    members: int
    epoch: int


Command = (
    Send
    | Close
    | EpochCompleted
    | StateChanged
    | TrainingFinished
    | WorkerJoined
    | WorkerLeft
    | TaskFinished
    | Reissued
    | LateEvaluation
    | StateDrift
)


# --------------------------------------------------------------------------- internals


class Stage(enum.Enum):
    INIT = "init"  # no state yet: one worker initializes
    EVALUATE = "evaluate"  # members are being evaluated
    OPTIMIZE = "optimize"  # every worker applies the reward vector
    SHARE = "share"  # one worker sends the next epoch's start state
    DONE = "done"  # max epochs reached, stop was broadcast


INITIALIZE = "initialize"
EVALUATE = "evaluate"
OPTIMIZE = "optimize"
SHARE_STATE = "share_state"


@dataclass(slots=True, eq=False)
class Task:
    id: str
    kind: str
    worker_id: str
    epoch: int
    assigned_at: float
    deadline: float
    slices: tuple[tuple[int, int], ...] = ()
    # Optimize tasks handed out during the OPTIMIZE stage gate the share-state election;
    # catch-up ones (a worker that fell behind) do not.
    waited: bool = False
    # Evaluate tasks: a copy went to an idle worker (each task is re-issued at most once).
    duplicated: bool = False
    # The deadline stretch it was given (deadline = assigned_at + 2**stretch x timeout).
    stretch: int = 0


@dataclass(slots=True, eq=False)
class WorkerInfo:
    id: str
    token: str
    cores: int
    joined_at: float
    hello_sent: bool = False
    # Has called back with the token from its hello (see CoreConfig.heartbeat_before_work).
    proven: bool = False
    state_epoch: int = 0
    next_seq: int = 1
    heartbeat_deadline: float = math.inf
    task: Task | None = None
    # Digest of the worker's state at the start of epoch ``digest_epoch`` (extension; empty
    # for workers that send none), and whether its next task must carry the shared state.
    digest: bytes = b""
    digest_epoch: int = 0
    needs_state: bool = False


@dataclass(slots=True)
class TrainingSnapshot:
    """What survives a server restart: the epoch to run next and its start state."""

    epoch: int
    state: bytes | None


@dataclass
class CoreConfig:
    population_size: int
    max_epochs: int = 0
    max_workers: int = 0
    worker_timeout: float = 60.0
    max_slices_per_eval: int = 0
    straggler_reissue: bool = True
    straggler_factor: float = 2.0
    straggler_min_seconds: float = 1.0
    # Work (initialize, evaluate, optimize, share state) goes only to workers that have sent
    # a heartbeat with the token from their hello: a peer that subscribes and never reads
    # its stream would otherwise hold slices until the worker timeout. Honest clients send
    # heartbeat 1 right after hello, so this costs them one round trip.
    heartbeat_before_work: bool = True


def _ranges(mask: np.ndarray, offset: int) -> list[tuple[int, int]]:
    """The half-open runs of True in ``mask``, shifted by ``offset``."""
    if mask.all():
        return [(offset, offset + len(mask))]
    if not mask.any():
        return []
    edges = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    starts = np.flatnonzero(edges == 1) + offset
    ends = np.flatnonzero(edges == -1) + offset
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


@dataclass
class _Ids:
    """Unique ids; injectable so property tests are reproducible."""

    prefix: str = field(default_factory=lambda: secrets.token_hex(4))
    counter: int = 0

    def next(self, kind: str) -> str:
        self.counter += 1
        return f"{kind}-{self.prefix}-{self.counter}"


# --------------------------------------------------------------------------- the core


class Training:
    """One training: workers, tasks, epochs, slices and rewards."""

    def __init__(
        self,
        config: CoreConfig,
        *,
        token_factory: Callable[[str], str] | None = None,
        snapshot: TrainingSnapshot | None = None,
        ids: _Ids | None = None,
    ) -> None:
        if config.population_size < 1:
            raise ValueError("population_size must be at least 1")
        self.config = config
        self._pop = config.population_size
        self._timeout = float(config.worker_timeout)
        # Task kind -> n: its tasks get 2**n x worker_timeout (see MAX_DEADLINE_STRETCH).
        self._stretch: dict[str, int] = {}
        self.heartbeat_interval = max(1, int(self._timeout / 2))
        # Below 2 s the whole-second interval reaches the timeout itself: never drop a
        # worker before it could miss two beats.
        self._heartbeat_timeout = max(self._timeout, 2.0 * self.heartbeat_interval)
        self._token_factory = token_factory or (lambda _wid: secrets.token_urlsafe(32))
        self._ids = ids or _Ids()

        self.epoch = 1
        self.state: bytes | None = None
        self.stage = Stage.INIT
        if snapshot is not None and snapshot.state is not None:
            self.epoch = snapshot.epoch
            self.state = snapshot.state
            self.stage = Stage.EVALUATE
            if 0 < config.max_epochs < snapshot.epoch:
                # Finished before the restart (raising max_epochs continues it instead).
                self.epoch = snapshot.epoch - 1
                self.stage = Stage.DONE

        self.workers: dict[str, WorkerInfo] = {}
        self._tokens: dict[str, str] = {}
        # Workers stopped when the training finished: their late calls are accepted and
        # discarded (OK, not an error) so that every client winds down cleanly at a normal
        # end. Never mutates the training.
        self._retired: dict[str, str] = {}
        self._retired_ids: set[str] = set()
        # Retired workers that held a task when the training finished: a result is still on
        # its way (a straggler still evaluating), due by the task's deadline at the latest.
        self._outstanding: dict[str, float] = {}
        # Removed workers that held an evaluate task of this epoch: worker id -> (token, that
        # task). Their token is good for nothing but that task's FinishEvaluation (see
        # _late_evaluation).
        self._dropped: dict[str, tuple[str, Task]] = {}
        self._dropped_tokens: dict[str, str] = {}
        self._tasks: dict[str, Task] = {}
        # Insertion-ordered sets (dicts) so that scheduling is deterministic.
        self._idle: dict[str, None] = {}
        self._pending: dict[str, None] = {}  # registered, hello not sent yet
        self._unproven: dict[str, None] = {}  # hello sent, no heartbeat yet: gets no work
        self._open_evals: dict[str, Task] = {}  # evaluate tasks of the current epoch
        self._waited_optimizes = 0
        self._share_task: Task | None = None
        self._init_task: Task | None = None
        # Digest of the shared state, the start of epoch _state_digest_epoch (extension).
        self._state_digest = b""
        self._state_digest_epoch = 0
        self._history: dict[int, np.ndarray] = {}
        self._frozen: np.ndarray | None = None
        self._rates: list[float] = []  # seconds per member of finished evaluate tasks
        # Every metric name reported in this training (bounded by MAX_METRICS).
        self._metric_names: dict[str, None] = {}
        self.epoch_started_at: float | None = None
        self._optimize_started_at = 0.0
        self._reset_epoch_arrays()

    # ------------------------------------------------------------------ queries

    @property
    def finished(self) -> bool:
        return self.stage is Stage.DONE

    @property
    def recorded_members(self) -> int:
        return self._n_recorded

    def snapshot(self) -> TrainingSnapshot:
        """The epoch to run next and its start state (what a restart continues from)."""
        if self.stage is Stage.DONE:
            return TrainingSnapshot(epoch=self.epoch + 1, state=self.state)
        return TrainingSnapshot(epoch=self.epoch, state=self.state)

    def outstanding_results(self, now: float) -> int:
        """After the finish: how many stopped workers may still send the result of the task
        they held (until that task's deadline). A server that exits before these arrive
        makes those clients see an error at a normal end."""
        expired = [wid for wid, deadline in self._outstanding.items() if now > deadline]
        for wid in expired:
            del self._outstanding[wid]
        return len(self._outstanding)

    def authenticate(self, token: str, *, removed: bool = False) -> str:
        """The id of the live worker holding ``token``; UNAUTHENTICATED otherwise.

        ``removed``: also a removed worker that may still deliver the evaluate task it held
        (for FinishEvaluation only: its heartbeats must keep failing, that is how it learns
        that it was removed)."""
        worker_id = self._tokens.get(token) or self._retired.get(token)
        if worker_id is None and removed:
            worker_id = self._dropped_tokens.get(token)
        if worker_id is None:
            raise Unauthenticated("unknown or expired worker token")
        return worker_id

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (used by tests)."""
        pop = self._pop
        assert self._n_recorded == int(self.recorded.sum())
        in_stack = np.zeros(pop, dtype=np.int32)
        for s, e in self._stack:
            assert 0 <= s < e <= pop, (s, e)
            in_stack[s:e] += 1
        assert (in_stack <= 1).all(), "a member is twice on the stack"
        cover = np.zeros(pop, dtype=np.int32)
        for t in self._open_evals.values():
            for s, e in t.slices:
                cover[s:e] += 1
        assert (cover == self._cover).all(), "cover out of sync"
        if self.stage is Stage.EVALUATE:
            unrecorded = ~self.recorded
            # Every member not yet recorded is either waiting on the stack or held by a
            # task, never both and never neither.
            assert ((in_stack > 0) != (cover > 0))[unrecorded].all(), "member lost or doubled"
            assert (in_stack[self.recorded] == 0).all(), "recorded member on the stack"
        for w in self.workers.values():
            if w.task is not None:
                assert self._tasks[w.task.id] is w.task
                assert w.id not in self._idle
            elif w.hello_sent and not w.proven:
                assert w.id in self._unproven and w.id not in self._idle, w
            elif w.hello_sent:
                assert w.id in self._idle, w
                if self.state is not None:
                    # An idle worker behind the training is always given its catch-up.
                    assert w.state_epoch >= self.epoch, w
        for t in self._tasks.values():
            assert self.workers[t.worker_id].proven, f"{t.kind} task for an unproven worker"
        assert all(not self.workers[wid].proven for wid in self._unproven)
        waited = sum(
            1
            for t in self._tasks.values()
            if t.kind == OPTIMIZE and t.waited and t.epoch == self.epoch
        )
        assert waited == self._waited_optimizes, (waited, self._waited_optimizes)
        for name, values in self._member_metrics.items():
            # A metric value is only ever recorded together with its member's reward.
            assert not (~np.isnan(values) & ~self.recorded).any(), f"stray {name!r} value"
        assert len(self._dropped) == len(self._dropped_tokens) <= DROPPED_LIMIT
        for wid, (token, task) in self._dropped.items():
            assert wid not in self.workers and self._dropped_tokens[token] == wid
            assert task.id not in self._tasks and task.kind == EVALUATE

    # ------------------------------------------------------------------ events in

    def join(self, cores: int, now: float) -> tuple[str, list[Command]]:
        """Register a worker; returns its id and the commands (hello, maybe a task)."""
        if cores <= 0:
            raise InvalidArgument(f"cores must be positive, got {cores}")
        if self.config.max_workers > 0 and len(self.workers) >= self.config.max_workers:
            raise ResourceExhausted(f"the server accepts at most {self.config.max_workers} workers")
        worker_id = self._ids.next("worker")
        out: list[Command] = []
        if self.stage is Stage.DONE:
            # The training is over: tell the worker so and end its stream. Its token is a
            # real, retired one: a client may send a heartbeat before it reads the stop.
            token = self._token_factory(worker_id)
            self._retire(worker_id, token)
            out.append(Send(worker_id, self._hello_event(worker_id, token)))
            out.append(Send(worker_id, Stop(self._ids.next("stop"))))
            out.append(Close(worker_id, "training finished"))
            return worker_id, out
        token = self._token_factory(worker_id)
        w = WorkerInfo(id=worker_id, token=token, cores=int(cores), joined_at=now)
        w.proven = not self.config.heartbeat_before_work
        self.workers[worker_id] = w
        self._tokens[token] = worker_id
        self._pending[worker_id] = None
        out.append(WorkerJoined(worker_id, w.cores, len(self.workers)))
        self._schedule(now, out)
        return worker_id, out

    def leave(self, worker_id: str, now: float, reason: str = "left") -> list[Command]:
        """The worker is gone (stream ended, timed out): re-assign its work."""
        out: list[Command] = []
        w = self.workers.get(worker_id)
        if w is None:
            return out
        cause: LeaveCause = "other"
        if reason == "left" or reason == "server stopping":
            cause = reason
        self._remove(w, now, reason, out, "CANCELLED", cause=cause)
        self._schedule(now, out)
        return out

    def heartbeat(self, worker_id: str, seq_id: int, now: float) -> list[Command]:
        if worker_id in self._retired_ids:
            return []  # stopped with the training: a heartbeat in flight is harmless
        w = self._worker(worker_id)
        if seq_id != w.next_seq:
            raise FailedPrecondition(f"heartbeat out of order: expected seq_id {w.next_seq}")
        w.next_seq += 1
        w.heartbeat_deadline = now + self._heartbeat_timeout
        out: list[Command] = []
        if not w.proven:
            # It read its hello: from now on it may be given work.
            w.proven = True
            if w.id in self._unproven:
                del self._unproven[w.id]
                self._idle[w.id] = None
            self._schedule(now, out)
        return out

    def finish_initialization(
        self, worker_id: str, task_id: str, state: bytes, now: float, digest: bytes = b""
    ) -> list[Command]:
        if worker_id in self._retired_ids:
            return self._late_result(worker_id)
        w = self._worker(worker_id)
        task = self._task(w, task_id, INITIALIZE)
        if not state:
            raise InvalidArgument("state must not be empty")
        out: list[Command] = []
        self._complete(w, task, now, out)
        self._init_task = None
        self.state = bytes(state)
        self.epoch = 1
        self.stage = Stage.EVALUATE
        self.epoch_started_at = now
        self._reset_epoch_arrays()
        w.state_epoch = 1
        self._state_digest, self._state_digest_epoch = bytes(digest), 1
        out.append(StateChanged(self.epoch, self.state))
        self._schedule(now, out)
        return out

    def finish_evaluation(
        self,
        worker_id: str,
        task_id: str,
        evaluations: Sequence[tuple[int, int, Iterable[float]]],
        now: float,
    ) -> list[Command]:
        """``evaluations``: (start, end, rewards) per slice, in any order."""
        if worker_id in self._retired_ids:
            return self._late_result(worker_id)
        w = self.workers.get(worker_id)
        if w is None:
            if worker_id in self._dropped:
                return self._late_evaluation(worker_id, task_id, evaluations, now)
            raise Unauthenticated("unknown or expired worker")
        task = self._task(w, task_id, EVALUATE)
        arrays, metrics = self._validate_evaluations(task, evaluations)
        out: list[Command] = []
        current = task.epoch == self.epoch and self.stage is not Stage.DONE
        if current:
            self._record(arrays, metrics)
            cover = self._cover
            for s, e in task.slices:
                cover[s:e] -= 1
            self._open_evals.pop(task.id, None)
            width = sum(e - s for s, e in task.slices)
            self._rates.append((now - task.assigned_at) / width)
        self._complete(w, task, now, out)
        self._schedule(now, out)
        return out

    def finish_optimization(
        self, worker_id: str, task_id: str, now: float, digest: bytes = b""
    ) -> list[Command]:
        """``digest``: the worker's state digest after the update (extension; empty: none).
        Compared with the shared state's once that is known (here for a catch-up update,
        else in :meth:`finish_share_state`)."""
        if worker_id in self._retired_ids:
            return self._late_result(worker_id)
        w = self._worker(worker_id)
        task = self._task(w, task_id, OPTIMIZE)
        out: list[Command] = []
        if task.waited and task.epoch == self.epoch:
            self._waited_optimizes -= 1
        w.state_epoch = task.epoch + 1
        w.digest, w.digest_epoch = bytes(digest), task.epoch + 1
        if self._state_digest and self._state_digest_epoch == w.digest_epoch:
            self._check_digest(w, out)
        self._complete(w, task, now, out)
        self._schedule(now, out)
        return out

    def finish_share_state(
        self, worker_id: str, task_id: str, state: bytes, now: float, digest: bytes = b""
    ) -> list[Command]:
        if worker_id in self._retired_ids:
            return self._late_result(worker_id)
        w = self._worker(worker_id)
        task = self._task(w, task_id, SHARE_STATE)
        if not state:
            raise InvalidArgument("state must not be empty")
        out: list[Command] = []
        self._complete(w, task, now, out)
        self._share_task = None
        finished_epoch = self.epoch
        assert self._frozen is not None
        started = self.epoch_started_at if self.epoch_started_at is not None else now
        member_metrics = self._member_metrics
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        for name, values in member_metrics.items():
            reported = ~np.isnan(values)
            counts[name] = int(np.count_nonzero(reported))
            totals[name] = float(np.sum(values, where=reported))
        summary = EpochSummary(
            epoch=finished_epoch,
            seconds=now - started,
            workers=len(self.workers),
            rewards=self._frozen,
            state=bytes(state),
            metrics=totals,
            metric_members=counts,
            member_metrics=member_metrics,
        )
        self.state = summary.state
        # The shared state is the training's from now on: whoever computed other bits (another
        # CPU, BLAS or GPU) gets it with its next task. The sharer's own digest stands in
        # when it sent none with the state.
        self._state_digest = bytes(digest) or (
            w.digest if w.digest_epoch == finished_epoch + 1 else b""
        )
        self._state_digest_epoch = finished_epoch + 1
        if self._state_digest:
            for other in self.workers.values():
                if other.digest_epoch == finished_epoch + 1:
                    self._check_digest(other, out)
        max_epochs = self.config.max_epochs
        if max_epochs > 0 and finished_epoch >= max_epochs:
            # The epoch counter stays at the last epoch run; the snapshot records the state.
            self.stage = Stage.DONE
            out.append(EpochCompleted(summary))
            out.append(StateChanged(finished_epoch + 1, self.state))
            self._catch_up_before_stop(now, out)
            self._stop_all(out)
            out.append(TrainingFinished(finished_epoch))
            return out
        self.epoch = finished_epoch + 1
        self.stage = Stage.EVALUATE
        self.epoch_started_at = now
        self._reset_epoch_arrays()
        out.append(EpochCompleted(summary))
        out.append(StateChanged(self.epoch, self.state))
        self._schedule(now, out)
        return out

    def finish_now(self) -> list[Command]:
        """Ends the training before max_epochs (e.g. the task is solved): every worker gets
        stop. The epoch in progress is abandoned; the state stays the start state of that
        epoch, i.e. the result of the last completed one."""
        out: list[Command] = []
        if self.stage is Stage.DONE:
            return out
        last_completed = self.epoch - 1 if self.state is not None else 0
        self.stage = Stage.DONE
        self._stop_all(out)
        self.epoch = max(last_completed, 0)
        self._init_task = self._share_task = None
        out.append(TrainingFinished(self.epoch))
        return out

    def tick(self, now: float) -> list[Command]:
        """Remove workers that missed a heartbeat or a task deadline; re-issue stragglers."""
        out: list[Command] = []
        for w in list(self.workers.values()):
            if w.hello_sent and now > w.heartbeat_deadline:
                reason = "missed heartbeat" if w.proven else "no heartbeat after hello"
                self._remove(w, now, reason, out, cause="timeout")
            elif w.task is not None and now > w.task.deadline:
                kind = w.task.kind
                # One step past the deadline that was missed: tasks that missed the same
                # deadline together (every worker too slow) count once, not once each.
                missed = min(w.task.stretch + 1, MAX_DEADLINE_STRETCH)
                self._stretch[kind] = max(self._stretch.get(kind, 0), missed)
                self._remove(w, now, f"{kind} task deadline missed", out, cause="timeout",
                             missed_kind=kind)  # fmt: skip
        self._schedule(now, out)
        return out

    # ------------------------------------------------------------------ internals

    def _reset_epoch_arrays(self) -> None:
        pop = self._pop
        self.rewards = np.zeros(pop, dtype=np.float32)
        self.recorded = np.zeros(pop, dtype=bool)
        self._cover = np.zeros(pop, dtype=np.int16)
        self._n_recorded = 0
        self._stack: list[tuple[int, int]] = [(0, pop)]
        self._open_evals = {}
        self._waited_optimizes = 0
        self._frozen = None
        self._rates = []
        # name -> float64 value per member, NaN until recorded; made on first report.
        self._member_metrics: dict[str, np.ndarray] = {}
        # A removed worker's result is wanted only in the epoch of its task.
        self._dropped.clear()
        self._dropped_tokens.clear()

    def _worker(self, worker_id: str) -> WorkerInfo:
        w = self.workers.get(worker_id)
        if w is None:
            raise Unauthenticated("unknown or expired worker")
        return w

    def _late_result(self, worker_id: str) -> list[Command]:
        """A result of a worker stopped with the training: accepted and discarded, so that
        its client ends normally (the training, and its state, are final)."""
        self._outstanding.pop(worker_id, None)
        return []

    def _late_evaluation(
        self,
        worker_id: str,
        task_id: str,
        evaluations: Sequence[tuple[int, int, Iterable[float]]],
        now: float,
    ) -> list[Command]:
        """The result of the evaluate task a worker held when it was removed. Its members that
        nobody has recorded yet are recorded from it, wherever they are now: back on the
        stack (taken off it) or in another worker's open task (whose result then counts for
        the others only, as for a re-issued copy). Refused (NOT_FOUND) when every member is
        recorded already or the epoch is over; accepted once."""
        token, task = self._dropped[worker_id]
        if task.id != task_id:
            raise NotFound(
                f"task {task_id!r} is not the evaluate task this worker held when it was removed"
            )
        if self.stage is not Stage.EVALUATE or task.epoch != self.epoch:
            raise NotFound(
                f"task {task_id!r} of epoch {task.epoch} came back after the epoch's "
                "evaluation was over"
            )
        recorded = self.recorded
        if all(recorded[s:e].all() for s, e in task.slices):
            raise NotFound(
                f"the members of task {task_id!r} were evaluated by another worker after "
                "this worker was removed"
            )
        arrays, metrics = self._validate_evaluations(task, evaluations)
        del self._dropped[worker_id]
        del self._dropped_tokens[token]
        members = self._record(arrays, metrics)
        self._unstack_recorded()
        out: list[Command] = [LateEvaluation(worker_id, members, task.epoch)]
        self._schedule(now, out)
        return out

    def _record(
        self,
        arrays: list[tuple[tuple[int, int], np.ndarray]],
        metrics: list[list[tuple[str, np.ndarray]] | None] | None,
    ) -> int:
        """Records the members of validated evaluations that nobody recorded before (the
        first result wins); returns how many."""
        recorded, rewards = self.recorded, self.rewards
        total = 0
        for i, ((s, e), arr) in enumerate(arrays):
            seg = recorded[s:e]
            if not seg.any():
                if metrics is not None and metrics[i]:
                    self._record_metrics(s, e, metrics[i], None)
                rewards[s:e] = arr
                seg[:] = True
                total += e - s
            else:
                # Some members were recorded from a re-issued copy: first result wins.
                fresh = ~seg
                n = int(fresh.sum())
                if n:
                    if metrics is not None and metrics[i]:
                        self._record_metrics(s, e, metrics[i], fresh)
                    rewards[s:e][fresh] = arr[fresh]
                    seg[fresh] = True
                    total += n
        self._n_recorded += total
        return total

    def _unstack_recorded(self) -> None:
        """Takes recorded members off the stack of unassigned slices."""
        recorded = self.recorded
        stack: list[tuple[int, int]] = []
        for s, e in self._stack:
            seg = recorded[s:e]
            if not seg.any():
                stack.append((s, e))
            else:
                # Lowest members on top, as the rest of the stack.
                stack.extend(reversed(_ranges(~seg, s)))
        self._stack = stack

    def _keep_dropped(self, w: WorkerInfo, task: Task) -> None:
        """Remember the evaluate task of a removed worker: its result may still come."""
        self._dropped[w.id] = (w.token, task)
        self._dropped_tokens[w.token] = w.id
        while len(self._dropped) > DROPPED_LIMIT:
            oldest = next(iter(self._dropped))
            token, _ = self._dropped.pop(oldest)
            del self._dropped_tokens[token]

    def _task(self, w: WorkerInfo, task_id: str, kind: str) -> Task:
        task = w.task
        if task is None or task.id != task_id:
            # Unknown ids, finished tasks, other workers' tasks and tasks of removed
            # workers all look the same to the caller: not one of its open tasks.
            other = self._tasks.get(task_id)
            if other is not None:
                raise NotFound(f"task {task_id!r} is not an open task of this worker")
            raise NotFound(f"task {task_id!r} is unknown or already finished")
        if task.kind != kind:
            raise FailedPrecondition(f"task {task_id!r} is a {task.kind} task, not {kind}")
        return task

    def _validate_evaluations(
        self, task: Task, evaluations: Sequence[tuple[int, int, Iterable[float]]]
    ) -> tuple[
        list[tuple[tuple[int, int], np.ndarray]],
        list[list[tuple[str, np.ndarray]] | None] | None,
    ]:
        """The rewards of each evaluation and, only when some evaluation carries metrics,
        its validated metrics (a list aligned with the rewards).

        An evaluation may be (start, end, rewards, metrics): ``metrics`` (the protocol's
        ``Evaluation.metrics`` extension) is None or a sequence of (name, values) pairs with
        one value per member of the slice."""
        if len(evaluations) != len(task.slices):
            raise InvalidArgument(
                f"expected {len(task.slices)} evaluations (one per assigned slice), "
                f"got {len(evaluations)}"
            )
        assigned = set(task.slices)
        seen: set[tuple[int, int]] = set()
        arrays = []
        metrics: list[list[tuple[str, np.ndarray]] | None] | None = None
        new_names: dict[str, None] = {}
        for index, item in enumerate(evaluations):
            start, end, rewards = item[0], item[1], item[2]
            key = (int(start), int(end))
            if key not in assigned:
                raise InvalidArgument(f"slice [{start}, {end}) was not assigned in this task")
            if key in seen:
                raise InvalidArgument(f"slice [{start}, {end}) submitted twice")
            seen.add(key)
            with np.errstate(over="ignore"):  # a float64 beyond float32 becomes inf: rejected
                arr = np.asarray(rewards, dtype=np.float32)
            width = key[1] - key[0]
            if arr.ndim != 1 or arr.shape[0] != width:
                raise InvalidArgument(
                    f"slice [{start}, {end}) needs {width} rewards, got {arr.size}"
                )
            if not np.isfinite(arr).all():
                raise InvalidArgument(f"slice [{start}, {end}) has a NaN or infinite reward")
            arrays.append((key, arr))
            if len(item) > 3 and item[3]:
                if metrics is None:
                    metrics = [None] * len(evaluations)
                metrics[index] = self._validate_metrics(key, item[3], new_names)
        if new_names:
            # Only now that the whole request is valid: a rejected one changes nothing.
            self._metric_names.update(new_names)
        return arrays, metrics

    def _validate_metrics(
        self,
        key: tuple[int, int],
        metrics: Iterable[tuple[str, Iterable[float]]],
        new_names: dict[str, None],
    ) -> list[tuple[str, np.ndarray]]:
        start, end = key
        width = end - start
        out: list[tuple[str, np.ndarray]] = []
        names: set[str] = set()
        for name, values in metrics:
            if name in names:
                raise InvalidArgument(f"slice [{start}, {end}) has metric {name!r} twice")
            names.add(name)
            if name not in self._metric_names and name not in new_names:
                # Known names were checked when first seen.
                error = metric_name_error(name)
                if error is not None:
                    raise InvalidArgument(f"slice [{start}, {end}): {error}")
                if len(self._metric_names) + len(new_names) >= MAX_METRICS:
                    raise InvalidArgument(
                        f"metric {name!r} would be this training's metric number "
                        f"{MAX_METRICS + 1}; at most {MAX_METRICS} names are accepted "
                        f"(already: {', '.join(self._metric_names)})"
                    )
                new_names[name] = None
            arr = np.asarray(values, dtype=np.float64)
            if arr.ndim != 1 or arr.shape[0] != width:
                raise InvalidArgument(
                    f"slice [{start}, {end}) needs {width} values of metric {name!r}, "
                    f"got {arr.size}"
                )
            if not np.isfinite(arr).all():
                raise InvalidArgument(
                    f"slice [{start}, {end}) has a NaN or infinite value of metric {name!r}"
                )
            out.append((name, arr))
        return out

    def _record_metrics(
        self,
        s: int,
        e: int,
        metrics: list[tuple[str, np.ndarray]],
        fresh: np.ndarray | None,
    ) -> None:
        """Writes the metrics of members [s, e) (only the ``fresh`` ones when given)."""
        table = self._member_metrics
        for name, arr in metrics:
            values = table.get(name)
            if values is None:
                values = table[name] = np.empty(self._pop)
                values.fill(np.nan)  # np.full costs several times more for this
            if fresh is None:
                values[s:e] = arr
            else:
                values[s:e][fresh] = arr[fresh]

    def task_timeout(self, kind: str) -> float:
        """Seconds a new task of ``kind`` gets: worker_timeout, stretched after misses."""
        return self._timeout * 2 ** self._stretch.get(kind, 0)

    def _new_task(self, w: WorkerInfo, kind: str, now: float, epoch: int, **kw: object) -> Task:
        task = Task(
            id=self._ids.next(kind),
            kind=kind,
            worker_id=w.id,
            epoch=epoch,
            assigned_at=now,
            deadline=now + self.task_timeout(kind),
            stretch=self._stretch.get(kind, 0),
            **kw,  # type: ignore[arg-type]
        )
        self._tasks[task.id] = task
        w.task = task
        self._idle.pop(w.id, None)
        return task

    def _complete(self, w: WorkerInfo, task: Task, now: float, out: list[Command]) -> None:
        del self._tasks[task.id]
        w.task = None
        self._idle[w.id] = None
        took = now - task.assigned_at
        # Shrink a stretched deadline back to the smallest one this task fits in half of, so
        # that one slow epoch does not keep a hung worker's slices waiting for long.
        n = self._stretch.get(task.kind, 0)
        while n and took <= self._timeout * 2 ** (n - 1) / 2:
            n -= 1
        if n:
            self._stretch[task.kind] = n
        else:
            self._stretch.pop(task.kind, None)
        out.append(TaskFinished(task.kind, took))

    def _hello_event(self, worker_id: str, token: str) -> Hello:
        return Hello(
            worker_id=worker_id,
            token=token,
            state=self.state,
            population_size=self._pop,
            heartbeat_interval=self.heartbeat_interval,
            max_epochs=self.config.max_epochs,
        )

    def _send_hello(self, w: WorkerInfo, now: float, out: list[Command]) -> None:
        self._pending.pop(w.id, None)
        w.hello_sent = True
        w.state_epoch = self.epoch if self.state is not None else 0
        w.heartbeat_deadline = now + self._heartbeat_timeout
        if w.proven:
            self._idle[w.id] = None
        else:
            # Removed by tick() at heartbeat_deadline if it never proves it reads its stream.
            self._unproven[w.id] = None
        out.append(Send(w.id, self._hello_event(w.id, w.token)))

    def _remove(
        self,
        w: WorkerInfo,
        now: float,
        reason: str,
        out: list[Command],
        code: str = "DEADLINE_EXCEEDED",
        *,
        cause: LeaveCause = "other",
        missed_kind: str | None = None,
    ) -> None:
        del self.workers[w.id]
        self._tokens.pop(w.token, None)
        self._idle.pop(w.id, None)
        self._pending.pop(w.id, None)
        self._unproven.pop(w.id, None)
        returned = 0
        reassigned: str | None = None
        task = w.task
        if task is not None:
            del self._tasks[task.id]
            w.task = None
            if task.kind == EVALUATE and self._open_evals.pop(task.id, None) is not None:
                returned = self._return_slices(task)
                self._keep_dropped(w, task)
            elif task.kind == OPTIMIZE:
                if task.waited and task.epoch == self.epoch:
                    self._waited_optimizes -= 1
            elif task.kind == INITIALIZE:
                self._init_task = None
                reassigned = INITIALIZE
            elif task.kind == SHARE_STATE:
                self._share_task = None
                reassigned = SHARE_STATE
        out.append(Close(w.id, reason, code))
        next_deadline = None if missed_kind is None else self.task_timeout(missed_kind)
        out.append(WorkerLeft(w.id, reason, len(self.workers), returned, reassigned, cause,
                              missed_kind, next_deadline))  # fmt: skip

    def _return_slices(self, task: Task) -> int:
        """Put back on the stack the members of a lost task nobody else will deliver."""
        cover, recorded = self._cover, self.recorded
        back: list[tuple[int, int]] = []
        for s, e in task.slices:
            cover[s:e] -= 1
            back.extend(_ranges(~recorded[s:e] & (cover[s:e] == 0), s))
        # Lowest members on top of the stack, so they are handed out first.
        back.sort(reverse=True)
        self._stack.extend(back)
        return sum(e - s for s, e in back)

    def _take_slices(self, cores: int) -> tuple[tuple[int, int], ...]:
        stack = self._stack
        limit = self.config.max_slices_per_eval
        taken: list[tuple[int, int]] = []
        budget = cores
        while stack and budget > 0 and (limit <= 0 or len(taken) < limit):
            s, e = stack.pop()
            if e - s > budget:
                stack.append((s + budget, e))
                e = s + budget
            taken.append((s, e))
            budget -= e - s
        return tuple(taken)

    def _assign_evaluate(
        self, w: WorkerInfo, slices: tuple[tuple[int, int], ...], now: float, out: list[Command]
    ) -> Task:
        cover = self._cover
        for s, e in slices:
            cover[s:e] += 1
        task = self._new_task(w, EVALUATE, now, self.epoch, slices=slices)
        self._open_evals[task.id] = task
        out.append(Send(w.id, Evaluate(task.id, self.epoch, slices, self._repair(w, self.epoch))))
        return task

    def _assign_optimize(
        self,
        w: WorkerInfo,
        epoch: int,
        rewards: np.ndarray,
        waited: bool,
        now: float,
        out: list[Command],
    ) -> None:
        task = self._new_task(w, OPTIMIZE, now, epoch, waited=waited)
        if waited:
            self._waited_optimizes += 1
        out.append(Send(w.id, Optimize(task.id, epoch, rewards, self._repair(w, epoch))))

    def _check_digest(self, w: WorkerInfo, out: list[Command]) -> None:
        if w.digest and w.digest != self._state_digest:
            w.needs_state = True
            out.append(StateDrift(w.id, w.digest_epoch, w.digest, self._state_digest))
        w.digest_epoch = 0  # compared once

    def _repair(self, w: WorkerInfo, epoch: int) -> bytes | None:
        """The shared state, once, for a drifted worker's first task that starts from it."""
        if not w.needs_state or epoch != self._state_digest_epoch or self.state is None:
            return None
        w.needs_state = False
        return self.state

    def _straggler(self, now: float) -> Task | None:
        """The oldest open evaluate task that is late enough to be re-issued."""
        cfg = self.config
        if not cfg.straggler_reissue or self._stack or not self._open_evals:
            return None
        # Open tasks are in assignment order: if the oldest is younger than the floor, all
        # are, and the (costlier) expected-duration estimate is not needed.
        oldest = next(iter(self._open_evals.values()))
        if now - oldest.assigned_at < cfg.straggler_min_seconds:
            return None
        rates = sorted(self._rates)
        rate = rates[len(rates) // 2] if rates else 0.0
        for task in self._open_evals.values():
            if task.duplicated:
                continue
            width = sum(e - s for s, e in task.slices)
            threshold = max(cfg.straggler_min_seconds, cfg.straggler_factor * rate * width)
            if now - task.assigned_at >= threshold:
                return task
        return None

    def _reissue(self, w: WorkerInfo, task: Task, now: float, out: list[Command]) -> bool:
        recorded, cover = self.recorded, self._cover
        limit = self.config.max_slices_per_eval
        budget = w.cores
        slices: list[tuple[int, int]] = []
        for s, e in task.slices:
            for rs, re_ in _ranges(~recorded[s:e] & (cover[s:e] == 1), s):
                if budget <= 0 or (limit > 0 and len(slices) >= limit):
                    break
                re_ = min(re_, rs + budget)
                slices.append((rs, re_))
                budget -= re_ - rs
        task.duplicated = True
        if not slices:
            return False
        dup = self._assign_evaluate(w, tuple(slices), now, out)
        dup.duplicated = True  # a copy is never copied again
        out.append(Reissued(sum(e - s for s, e in slices)))
        return True

    def _catch_up_before_stop(self, now: float, out: list[Command]) -> None:
        """Workers that hold an older state when the last epoch ends (a joiner that had not
        heartbeated yet, or joined while the state was being shared) get the optimize steps
        they missed before their stop, so that every worker ends with the final state.
        Nothing waits for these results; each one is accepted and discarded when it comes."""
        for w in self.workers.values():
            if not w.hello_sent or w.task is not None or not 0 < w.state_epoch <= self.epoch:
                continue
            for epoch in range(w.state_epoch, self.epoch + 1):
                rewards = self._history.get(epoch)
                if rewards is None:
                    break
                out.append(Send(w.id, Optimize(self._ids.next(OPTIMIZE), epoch, rewards)))
                self._outstanding[w.id] = now + self.task_timeout(OPTIMIZE)

    def _stop_all(self, out: list[Command]) -> None:
        remaining = len(self.workers)
        for w in list(self.workers.values()):
            if w.task is not None:
                self._outstanding[w.id] = w.task.deadline
            if not w.hello_sent:
                out.append(Send(w.id, self._hello_event(w.id, w.token)))
            out.append(Send(w.id, Stop(self._ids.next("stop"))))
            out.append(Close(w.id, "training finished"))
            remaining -= 1
            out.append(WorkerLeft(w.id, "training finished", remaining, 0, None,
                                  "training finished"))  # fmt: skip
        for token, worker_id in self._tokens.items():
            self._retire(worker_id, token)
        self.workers.clear()
        self._tokens.clear()
        self._idle.clear()
        self._pending.clear()
        self._unproven.clear()
        self._tasks.clear()
        self._open_evals.clear()
        self._cover[:] = 0

    def _retire(self, worker_id: str, token: str) -> None:
        """Remember a worker of a finished training; the oldest are forgotten first."""
        self._retired[token] = worker_id
        self._retired_ids.add(worker_id)
        while len(self._retired) > RETIRED_LIMIT:
            oldest = next(iter(self._retired))
            forgotten = self._retired.pop(oldest)
            self._retired_ids.discard(forgotten)
            self._outstanding.pop(forgotten, None)

    def _schedule(self, now: float, out: list[Command]) -> None:
        """Hand work to idle workers and move the training forward."""
        if self.stage is Stage.DONE:
            return
        if self.state is None:
            self._schedule_init(now, out)
            return
        if self.epoch_started_at is None:
            self.epoch_started_at = now  # restored from a snapshot
        for wid in list(self._pending):
            self._send_hello(self.workers[wid], now, out)
        self._advance(now, out)
        self._assign_idle(now, out)
        self._advance(now, out)

    def _schedule_init(self, now: float, out: list[Command]) -> None:
        if self._init_task is not None:
            return
        # Prefer a worker that already has its hello (the previous initializer is gone, so
        # only idle workers without state can be here), else the oldest pending one. A hello
        # without state cannot be taken back, so only one candidate at a time gets one: while
        # it has not proven it reads its stream, the others wait.
        candidate = next(iter(self._idle), None)
        if candidate is None:
            if self._unproven:
                return
            candidate = next(iter(self._pending), None)
            if candidate is None:
                return
        w = self.workers[candidate]
        if not w.hello_sent:
            self._send_hello(w, now, out)
            if not w.proven:
                return
        self._init_task = self._new_task(w, INITIALIZE, now, 0)
        out.append(Send(w.id, Initialize(self._init_task.id)))

    def _advance(self, now: float, out: list[Command]) -> None:
        if self.stage is Stage.EVALUATE and self._n_recorded == self._pop:
            self.stage = Stage.OPTIMIZE
            self._frozen = self.rewards.copy()
            self._frozen.setflags(write=False)
            for values in self._member_metrics.values():
                values.setflags(write=False)  # handed out in the EpochSummary
            self._history[self.epoch] = self._frozen
            self._history.pop(self.epoch - REWARD_HISTORY, None)
            self._optimize_started_at = now
        if (
            self.stage is Stage.OPTIMIZE
            and self._waited_optimizes == 0
            and not self._awaiting_last_joiners(now)
        ):
            target = self.epoch + 1
            if any(self.workers[wid].state_epoch == target for wid in self._idle):
                self.stage = Stage.SHARE
        if self.stage is Stage.SHARE and self._share_task is None:
            target = self.epoch + 1
            ready = [self.workers[wid] for wid in self._idle]
            ready = [w for w in ready if w.state_epoch == target]
            # A sharer that sent a digest lets every other digest be checked against it; a
            # peer without the extension shares only when nobody else can.
            ready.sort(key=lambda w: not (w.digest and w.digest_epoch == target))
            if ready:
                w = ready[0]
                self._share_task = self._new_task(w, SHARE_STATE, now, self.epoch)
                out.append(Send(w.id, ShareState(self._share_task.id, self.epoch)))

    def _awaiting_last_joiners(self, now: float) -> bool:
        """In the last epoch, a joiner that has not heartbeated yet would end the training
        with the previous epoch's state (no later epoch replays the step for it): the share
        waits for it, at most one heartbeat timeout (so a silent joiner delays only the end,
        and only that long)."""
        if not 0 < self.config.max_epochs <= self.epoch:
            return False
        if now >= self._optimize_started_at + self._heartbeat_timeout:
            return False
        # Idle ones have just heartbeated: their optimize task comes right after this check.
        waiting = itertools.chain(self._unproven, self._idle)
        return any(self.workers[wid].state_epoch == self.epoch for wid in waiting)

    def _assign_idle(self, now: float, out: list[Command]) -> None:
        if not self._idle:
            return
        epoch, stage = self.epoch, self.stage
        no_straggler = False
        for wid in list(self._idle):
            w = self.workers[wid]
            if w.state_epoch < epoch:
                # Behind: replay the optimize steps it missed before it may evaluate.
                rewards = self._history.get(w.state_epoch)
                if rewards is None:
                    self._remove(w, now, "too far behind the training", out, "ABORTED",
                                 cause="behind")  # fmt: skip
                else:
                    self._assign_optimize(w, w.state_epoch, rewards, False, now, out)
                continue
            if w.state_epoch != epoch:
                continue  # already optimized this epoch: waits for the next one
            if stage is Stage.EVALUATE:
                if self._stack:
                    self._assign_evaluate(w, self._take_slices(w.cores), now, out)
                elif not no_straggler:
                    task = self._straggler(now)
                    if task is None:
                        no_straggler = True  # the same answer for every other idle worker
                    else:
                        self._reissue(w, task, now, out)
            elif stage is Stage.OPTIMIZE or stage is Stage.SHARE:
                assert self._frozen is not None
                self._assign_optimize(w, epoch, self._frozen, stage is Stage.OPTIMIZE, now, out)
