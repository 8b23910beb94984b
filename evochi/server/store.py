"""The checkpoint in ``--state-dir``: the epoch to run next, its start state, the configuration.

The configuration is stored when the server starts, before any state exists (a checkpoint
without state), so that a server killed at any moment restarts from the directory alone.

One file, replaced atomically (temp file, fsync, rename, fsync of the directory), so a crash
at any moment leaves either the previous or the new checkpoint, never a torn one. Layout:
magic line, 8-byte big-endian header length, JSON header, state bytes (checked by SHA-256;
none before the first state: a state is never empty).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evochi.errors import EvochiError

__all__ = ["Checkpoint", "CheckpointError", "CheckpointStore", "CheckpointWriter"]

MAGIC = b"EVOCHI-CHECKPOINT 1\n"
FILENAME = "checkpoint.evochi"
log = logging.getLogger("evochi.server")


class CheckpointError(EvochiError, RuntimeError):
    """The checkpoint exists but cannot be used (corrupt, another training)."""


@dataclass(frozen=True)
class Checkpoint:
    epoch: int  # the epoch this state starts
    state: bytes | None  # None: no state yet (the configuration alone)
    config: dict[str, Any]


class CheckpointStore:
    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.path = self.directory / FILENAME

    def load(self) -> Checkpoint | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 8:
            raise CheckpointError(f"{self.path} is not an evochi checkpoint")
        pos = len(MAGIC)
        size = int.from_bytes(data[pos : pos + 8], "big")
        pos += 8
        try:
            header = json.loads(data[pos : pos + size])
            epoch = int(header["epoch"])
            length = int(header["state_bytes"])
            digest = str(header["state_sha256"])
            config = dict(header["config"])
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{self.path}: unreadable header ({err})") from None
        state = data[pos + size :]
        if len(state) != length or hashlib.sha256(state).hexdigest() != digest:
            raise CheckpointError(f"{self.path}: the state is truncated or corrupt")
        return Checkpoint(epoch=epoch, state=state or None, config=config)

    def store_config(self, checkpoint: Checkpoint | None, config: dict[str, Any]) -> None:
        """Writes ``config`` next to ``checkpoint`` (the loaded one, None if there is none)
        unless it is already stored: called when a server starts."""
        if checkpoint is None:
            self.save(Checkpoint(epoch=1, state=None, config=config))
        elif checkpoint.config != config:
            self.save(Checkpoint(checkpoint.epoch, checkpoint.state, config))

    def save(self, checkpoint: Checkpoint) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        state = checkpoint.state or b""
        header = json.dumps(
            {
                "format": 1,
                "epoch": checkpoint.epoch,
                "state_bytes": len(state),
                "state_sha256": hashlib.sha256(state).hexdigest(),
                "config": checkpoint.config,
                "saved_at": time.time(),
            },
            sort_keys=True,
        ).encode()
        tmp = self.path.with_name(f"{FILENAME}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(MAGIC)
            f.write(len(header).to_bytes(8, "big"))
            f.write(header)
            f.write(state)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        # The rename itself is only durable once the directory entry is on disk.
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CheckpointWriter:
    """Writes checkpoints off the event loop, newest first: a slow disk skips epochs, never
    blocks heartbeats, and never writes an older checkpoint over a newer one."""

    def __init__(self, store: CheckpointStore) -> None:
        self.store = store
        self._pending: Checkpoint | None = None
        self._task: asyncio.Task[None] | None = None
        self.written = 0

    def submit(self, checkpoint: Checkpoint) -> None:
        self._pending = checkpoint
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._pending is not None:
            checkpoint, self._pending = self._pending, None
            try:
                await asyncio.to_thread(self.store.save, checkpoint)
                self.written += 1
            except OSError:
                log.exception("could not write the checkpoint to %s", self.store.path)

    async def flush(self) -> None:
        while self._task is not None and not self._task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)
