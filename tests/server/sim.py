"""A simulated fleet driving the pure core directly: workers with inboxes and their own
copy of the state, and a record of every accepted reward, to check the core's promises."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from evochi.server import core
from evochi.server.core import CoreConfig, Stage, Training, _Ids


def state_of(epoch: int) -> bytes:
    """The start state of ``epoch`` in the simulation (workers derive it, like seeded ES)."""
    return b"S%d" % epoch


@dataclass
class SimWorker:
    id: str
    cores: int
    inbox: list[core.Event] = field(default_factory=list)
    token: str | None = None
    state: bytes | None = None
    seq: int = 0
    closed: bool = False
    hung: bool = False  # stops heartbeating and answering, like a frozen process
    # Reads its hello and sends heartbeat 1 at once, as real clients do; False: a peer that
    # subscribes and never reads its stream (never learns its token, never heartbeats).
    reads: bool = True
    # Its updates round differently (another CPU): its state after an update differs from
    # the other workers'. It reports its state as its digest unless `digests` is False (a
    # peer without the extension).
    drifts: bool = False
    digests: bool = True
    repairs: int = 0  # shared states adopted from an evaluate / optimize event

    def digest(self) -> bytes:
        return (self.state or b"") if self.digests else b""


class Sim:
    def __init__(self, **config: object) -> None:
        config.setdefault("worker_timeout", 10.0)
        self.t = Training(CoreConfig(**config), ids=_Ids(prefix="sim"))  # type: ignore[arg-type]
        self.pop = self.t.config.population_size
        self.now = 0.0
        self.workers: dict[str, SimWorker] = {}
        self.epochs: list[core.EpochSummary] = []
        self.optimize_vectors: dict[int, np.ndarray] = {}
        # The first accepted value of each member in each epoch: what the optimize vector must
        # hold (first result wins, nothing lost, nothing counted twice).
        self.first: dict[int, dict[int, float]] = {}
        self.submissions = 0
        self.finished = False
        self.left: list[core.WorkerLeft] = []
        # The start state of each epoch as the core shares it (StateChanged).
        self.starts: dict[int, bytes] = {}
        self.history: list[core.Command] = []  # every command the core gave (with track)
        self.track = True  # record every accepted value (check_vectors needs it)
        self.check = True  # check the core's invariants after every call

    # ------------------------------------------------------------------ plumbing

    def apply(self, commands: list[core.Command]) -> list[core.Command]:
        greeted: list[SimWorker] = []
        if self.track:
            self.history.extend(commands)
        for c in commands:
            if isinstance(c, core.Send):
                w = self.workers.get(c.worker_id)
                if w is not None and not w.closed:
                    w.inbox.append(c.event)
                    if isinstance(c.event, core.Hello) and w.reads and not w.hung:
                        greeted.append(w)
            elif isinstance(c, core.Close):
                if c.worker_id in self.workers:
                    self.workers[c.worker_id].closed = True
            elif isinstance(c, core.EpochCompleted):
                self.epochs.append(c.summary)
            elif isinstance(c, core.TrainingFinished):
                self.finished = True
            elif isinstance(c, core.StateChanged):
                self.starts[c.epoch] = c.state
            elif isinstance(c, core.WorkerLeft):
                self.left.append(c)
        if self.check:
            self.t.check_invariants()
        for w in greeted:
            # Heartbeat 1 right after hello (what proves the worker reads its stream).
            if not w.closed and w.seq == 0:
                w.seq = 1
                self.apply(self.t.heartbeat(w.id, 1, self.now))
        return commands

    def join(self, cores: int, reads: bool = True) -> SimWorker:
        worker_id, commands = self.t.join(cores, self.now)
        w = SimWorker(worker_id, cores, reads=reads)
        self.workers[worker_id] = w
        self.apply(commands)
        return w

    def leave(self, w: SimWorker) -> None:
        w.closed = True
        self.apply(self.t.leave(w.id, self.now))

    def live(self) -> list[SimWorker]:
        return [w for w in self.workers.values() if not w.closed]

    def advance(self, dt: float, heartbeat: bool = True) -> None:
        self.now += dt
        if heartbeat:
            for w in self.live():
                if w.token is not None and not w.hung and w.seq > 0:
                    w.seq += 1
                    self.apply(self.t.heartbeat(w.id, w.seq, self.now))
        self.apply(self.t.tick(self.now))

    # ------------------------------------------------------------------ a correct worker

    def start(self, epoch: int) -> bytes:
        return self.starts.get(epoch, state_of(epoch))

    def value(self, epoch: int, member: int) -> float:
        # Exact in float32; differs per submission so that a double count would show.
        return float(epoch * 100_000 + member * 10 + self.submissions % 7)

    def step(self, w: SimWorker) -> bool:
        """Handle the oldest event in ``w``'s inbox like a correct worker would."""
        if w.closed or w.hung or not w.reads or not w.inbox:
            return False
        event = w.inbox.pop(0)
        t, now = self.t, self.now
        if isinstance(event, core.Hello):
            w.token = event.token
            w.state = event.state
            assert event.population_size == self.pop
        elif isinstance(event, core.Initialize):
            assert w.state is None
            w.state = state_of(1)
            self.apply(t.finish_initialization(w.id, event.task_id, w.state, now, w.digest()))
        elif isinstance(event, core.Evaluate):
            if event.state is not None:
                w.state, w.repairs = event.state, w.repairs + 1
            # A worker evaluates only with the start state of that epoch (nothing can hold a
            # peer without digests to it once another worker drifted: it is not checked).
            assert w.state == self.start(event.epoch) or not w.digests, (w.state, event)
            self.submissions += 1
            evaluations = []
            for s, e in event.slices:
                if self.track:
                    evaluations.append((s, e, [self.value(event.epoch, m) for m in range(s, e)]))
                else:  # fast path for long runs: the same values, no per-member records
                    offset = event.epoch * 100_000 + self.submissions % 7
                    evaluations.append((s, e, np.arange(s, e) * 10.0 + offset))
            before_epoch, before_stage = t.epoch, t.stage
            self.apply(t.finish_evaluation(w.id, event.task_id, evaluations, now))
            if self.track and event.epoch == before_epoch and before_stage is Stage.EVALUATE:
                first = self.first.setdefault(event.epoch, {})
                for s, e, values in evaluations:
                    for m, v in zip(range(s, e), values, strict=True):
                        first.setdefault(m, v)
        elif isinstance(event, core.Optimize):
            if event.state is not None:
                w.state, w.repairs = event.state, w.repairs + 1
            # Optimize steps arrive in order from the worker's own state: never skips one.
            assert w.state == self.start(event.epoch) or not w.digests, (w.state, event.epoch)
            if self.track:
                vector = np.array(event.rewards)
                seen = self.optimize_vectors.setdefault(event.epoch, vector)
                assert np.array_equal(seen, vector), "workers got different reward vectors"
            w.state = state_of(event.epoch + 1) + (b"~%s" % w.id.encode() if w.drifts else b"")
            self.apply(t.finish_optimization(w.id, event.task_id, now, w.digest()))
        elif isinstance(event, core.ShareState):
            assert w.state.startswith(state_of(event.epoch + 1))
            self.apply(t.finish_share_state(w.id, event.task_id, w.state, now, w.digest()))
        elif isinstance(event, core.Stop):
            pass
        return True

    def deliver_late(self, w: SimWorker, evaluations: list | None = None) -> list[core.Command]:
        """``w`` (removed, or hung) answers the oldest evaluate task in its inbox at last, with
        a correct result unless ``evaluations`` says otherwise; CoreError when refused."""
        event = next(e for e in w.inbox if isinstance(e, core.Evaluate))
        t = self.t
        self.submissions += 1
        if evaluations is None:
            evaluations = [
                (s, e, [self.value(event.epoch, m) for m in range(s, e)]) for s, e in event.slices
            ]
        before_epoch, before_stage = t.epoch, t.stage
        commands = self.apply(t.finish_evaluation(w.id, event.task_id, evaluations, self.now))
        w.inbox.remove(event)
        if self.track and event.epoch == before_epoch and before_stage is Stage.EVALUATE:
            first = self.first.setdefault(event.epoch, {})
            for s, e, values, *_ in evaluations:
                for m, v in zip(range(s, e), values, strict=True):
                    first.setdefault(m, v)
        return commands

    def run(self, max_steps: int = 100_000, dt: float = 0.01, until_epochs: int = 0) -> None:
        """Let every live, non-hung worker work until nothing is left to do (or until
        ``until_epochs`` epochs completed)."""
        for _ in range(max_steps):
            if until_epochs and len(self.epochs) >= until_epochs:
                return
            progressed = False
            for w in list(self.live()):
                progressed |= self.step(w)
            if not progressed:
                return
            self.advance(dt)
        raise AssertionError("the simulation did not settle")

    def check_vectors(self) -> None:
        for epoch, vector in self.optimize_vectors.items():
            first = self.first.get(epoch, {})
            assert len(first) == self.pop, f"epoch {epoch}: {self.pop - len(first)} lost"
            expected = np.array([first[m] for m in range(self.pop)], dtype=np.float32)
            assert np.array_equal(vector, expected), f"epoch {epoch}: wrong rewards"
