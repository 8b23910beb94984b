"""``evochi-server``: the standalone server, configured by EVOCHI_* variables and flags."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

from evochi.server.config import ConfigError, ServerConfig, explicit_settings, resolve_config
from evochi.server.embedded import EmbeddedServer
from evochi.server.store import CheckpointError, CheckpointStore

log = logging.getLogger("evochi.server")


def load_config(argv: Sequence[str] | None = None) -> ServerConfig:
    settings = explicit_settings(argv)
    stored = None
    state_dir = settings.get("state_dir")
    if state_dir:
        checkpoint = CheckpointStore(state_dir).load()
        stored = checkpoint.config if checkpoint is not None else None
    return resolve_config(settings, stored)


async def serve(config: ServerConfig) -> None:
    server = EmbeddedServer(config, host=config.host, port=config.port)
    await server.start()
    if config.metrics_port is not None:
        server.metrics.serve(config.metrics_port, config.host)
        log.info("metrics on http://%s:%d/metrics", config.host, config.metrics_port)
    log.info(
        "evochi server listening on %s (population=%d max_epochs=%d worker_timeout=%gs%s)",
        server.address,
        config.population_size,
        config.max_epochs,
        config.worker_timeout,
        ", TLS" if config.tls_cert else "",
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    finished = loop.create_task(server.service.finished.wait())
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({finished, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not stop.is_set():
        # A clean end: keep serving until every worker has its stop and every straggler's
        # late result got its OK (at most the worker timeout), so no client sees an error.
        drained = loop.create_task(server.service.wait_drained(config.worker_timeout))
        await asyncio.wait({drained, stopping}, return_when=asyncio.FIRST_COMPLETED)
        drained.cancel()
    linger = server.service.linger_left(config.linger_seconds)
    if not stop.is_set() and linger > 0:
        # Workers in their reconnect back-off (the server restarted, or they lost their
        # connection lately) would find no server and could not tell a finished training
        # from a crash: they are told, as any joiner now is, with hello + stop.
        log.info("training finished; telling reconnecting workers so for %.0fs more "
                 "(--finish-linger)", linger)  # fmt: skip
        lingering = loop.create_task(asyncio.sleep(linger))
        await asyncio.wait({lingering, stopping}, return_when=asyncio.FIRST_COMPLETED)
        lingering.cancel()
    if stop.is_set():
        log.info("shutting down")
    finished.cancel()
    stopping.cancel()
    # A grace period lets in-flight RPCs (e.g. a FinishShareState) complete.
    await server.stop(grace=2.0)
    log.info("stopped at epoch %d", server.epoch)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except (ConfigError, CheckpointError) as err:
        print(f"evochi-server: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.logging_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(serve(config))
    except (CheckpointError, OSError) as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
