"""Run the server inside an asyncio program: tests, examples, benchmarks and the CLI."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import TracebackType

from evochi.server.config import ServerConfig
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
    """

    def __init__(
        self,
        config: ServerConfig,
        host: str = "127.0.0.1",
        port: int = 0,
        on_epoch: EpochCallback | None = None,
        *,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.config = config
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
        if config.state_dir is not None:
            store = CheckpointStore(Path(config.state_dir))
            checkpoint = store.load()
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
        service = EvochiService(
            config, metrics=self.metrics, on_epoch=self.on_epoch, snapshot=snapshot, writer=writer
        )
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
