"""Run the server inside an asyncio program: tests, examples, benchmarks and the CLI."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import TracebackType

from evochi.server.config import INT32_MAX, ServerConfig
from evochi.server.core import TrainingSnapshot
from evochi.server.grpcio import GrpcioTransport
from evochi.server.http2 import Http2Transport
from evochi.server.metrics import ServerMetrics
from evochi.server.service import EpochCallback, EvochiService
from evochi.server.store import CheckpointError, CheckpointStore, CheckpointWriter

__all__ = ["EmbeddedServer"]

log = logging.getLogger("evochi.server")


class EmbeddedServer:
    """An Evochi server on this event loop.

    ``port=0`` picks a free port; ``address`` and ``port`` are known after ``start()``.
    ``on_epoch`` (sync or async) is called once per completed epoch, in order, with an
    :class:`EpochSummary` (its ``rewards`` array is read-only); its exceptions are logged
    and never stop the server.

    ``initial_state`` and ``start_epoch`` resume a training: the server starts at epoch
    ``start_epoch`` (default 1) from ``initial_state`` (the state bytes as the workers'
    codec wrote them, e.g. ``EpochSummary.state`` of epoch ``start_epoch - 1``). No
    initialize task is issued: the first worker receives that state in hello, and epochs
    are numbered on from ``start_epoch``. With ``max_epochs`` below ``start_epoch`` the
    training counts as finished. A checkpoint in ``config.state_dir``, when there is one,
    wins over ``initial_state``: a restarted server continues where it was.
    ``config.initial_state_file``/``config.start_epoch`` (``evochi-server --initial-state
    FILE --start-epoch N``) do the same from a file.
    """

    def __init__(
        self,
        config: ServerConfig,
        host: str = "127.0.0.1",
        port: int = 0,
        on_epoch: EpochCallback | None = None,
        *,
        metrics: ServerMetrics | None = None,
        initial_state: bytes | None = None,
        start_epoch: int = 1,
    ) -> None:
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int):
            raise TypeError(f"start_epoch must be an int, got {start_epoch!r}")
        if not 1 <= start_epoch <= INT32_MAX:
            raise ValueError(f"start_epoch must be between 1 and {INT32_MAX}, got {start_epoch}")
        if initial_state is None:
            if start_epoch != 1:
                raise ValueError(
                    f"start_epoch={start_epoch} needs the initial_state that epoch starts from"
                )
        elif not isinstance(initial_state, bytes | bytearray | memoryview):
            raise TypeError(
                f"initial_state must be bytes (the encoded state), got "
                f"{type(initial_state).__name__}"
            )
        elif len(initial_state) == 0:
            raise ValueError("initial_state must not be empty")
        if config.initial_state_file and (initial_state is not None or start_epoch != 1):
            raise ValueError(
                "give the resume state either as initial_state/start_epoch or as "
                "config.initial_state_file/start_epoch, not both"
            )
        self.config = config
        self.initial_state = None if initial_state is None else bytes(initial_state)
        self.start_epoch = start_epoch
        self.host = host
        self._requested_port = port
        self.on_epoch = on_epoch
        self.metrics = metrics or ServerMetrics()
        self._server: Http2Transport | GrpcioTransport | None = None
        self._service: EvochiService | None = None
        self.port: int = port

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def service(self) -> EvochiService:
        if self._service is None:
            raise RuntimeError("the server is not started")
        return self._service

    @property
    def epoch(self) -> int:
        """The epoch currently running (the last one run once the training is finished)."""
        return self.service.core.epoch

    @property
    def finished(self) -> bool:
        return self.service.finished.is_set()

    @property
    def state(self) -> bytes | None:
        """The start state of the current epoch (the final state once finished)."""
        return self.service.core.state

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the server is already started")
        config = self.config
        snapshot: TrainingSnapshot | None = None
        writer: CheckpointWriter | None = None
        # Continuing a training another server ran: its workers may be reconnecting.
        restarted = self.initial_state is not None or bool(config.initial_state_file)
        if config.state_dir is not None:
            store = CheckpointStore(Path(config.state_dir))
            checkpoint = store.load()
            restarted = restarted or checkpoint is not None
            if checkpoint is not None:  # (the configuration alone until epoch 1 starts)
                stored = checkpoint.config.get("population_size")
                if stored != config.population_size:
                    raise CheckpointError(
                        f"{store.path} holds a training with population size {stored}, "
                        f"not {config.population_size}"
                    )
            if checkpoint is not None and checkpoint.state is not None:
                snapshot = TrainingSnapshot(epoch=checkpoint.epoch, state=checkpoint.state)
                log.info("continuing the training in %s at epoch %d", store.path,
                         checkpoint.epoch)  # fmt: skip
            # Stored before serving: a server killed before epoch 1 restarts from the
            # directory alone.
            await asyncio.to_thread(store.store_config, checkpoint, config.stored_fields())
            writer = CheckpointWriter(store)
        if snapshot is None and self.initial_state is None and config.initial_state_file:
            self.initial_state = _read_state_file(config.initial_state_file)
            self.start_epoch = config.start_epoch
        if snapshot is None and self.initial_state is not None:
            snapshot = TrainingSnapshot(epoch=self.start_epoch, state=self.initial_state)
            log.info("starting the training at epoch %d from the given state (%d bytes)",
                     self.start_epoch, len(self.initial_state))  # fmt: skip
        elif snapshot is not None and self.initial_state is not None:
            log.warning("the checkpoint in %s wins over the given initial state",
                        config.state_dir)  # fmt: skip
        service = EvochiService(
            config,
            metrics=self.metrics,
            on_epoch=self.on_epoch,
            snapshot=snapshot,
            writer=writer,
            restarted=restarted,
        )
        if service.finished.is_set():
            log.info("the training has finished (epoch %d of %d); workers that join are "
                     "told so (hello + stop)", service.core.epoch,
                     config.max_epochs)  # fmt: skip
        server: Http2Transport | GrpcioTransport
        if config.transport == "grpcio":
            server = GrpcioTransport(service, config)
        else:
            server = Http2Transport(
                service,
                max_message_bytes=config.max_message_bytes,
                tls_cert=config.tls_cert,
                tls_key=config.tls_key,
            )
        port = await server.start(self.host, self._requested_port)
        self.port = port
        service.start()
        self._server, self._service = server, service

    async def wait_finished(self, timeout: float | None = None) -> None:
        """Return once max_epochs were run and stop was sent (TimeoutError after ``timeout``)."""
        await asyncio.wait_for(self.service.finished.wait(), timeout)

    async def wait_drained(self, timeout: float | None = None) -> bool:
        """After the finish: wait until every worker has its stop and every late result
        (a straggler's) was answered, at most ``timeout`` seconds; whether it drained."""
        return await self.service.wait_drained(timeout)

    async def stop_training(self) -> None:
        """Ends the training early: every worker gets stop (its `start()` returns), the
        server keeps serving (late joiners are told the training finished). `epoch` and
        `state` are those of the last completed epoch."""
        self.service.finish_training()
        await self.wait_finished()

    async def stop(self, grace: float | None = 1.0) -> None:
        """End all streams, wait up to ``grace`` seconds for RPCs in flight (and, after a
        finished training, for stragglers' late results), flush state."""
        server, service = self._server, self._service
        if server is None or service is None:
            return
        self._server = None
        if service.finished.is_set():
            # A finished training: stragglers' late results get their OK first, within the
            # grace period (wait_drained() waits longer: a worker killed after its stop
            # never sends its result, so only the task deadline ends that wait).
            await service.wait_drained(grace or 0.0)
        await service.close()
        await server.stop(grace)

    async def __aenter__(self) -> EmbeddedServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def _read_state_file(path: str) -> bytes:
    try:
        state = Path(path).read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read the initial state {path}: {err}") from err
    if not state:
        raise CheckpointError(f"the initial state file {path} is empty")
    return state
