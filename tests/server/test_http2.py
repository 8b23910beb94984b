"""The server's own HTTP/2 transport, probed below gRPC: what a broken or hostile peer sends
gets a GOAWAY or a gRPC status, flow control holds for large states and small windows, idle
dead peers are dropped; the server keeps serving its honest workers throughout."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import os
import struct

import grpc
import grpc.aio
import hpack
import pytest

from evochi.server import EmbeddedServer, ServerConfig
from evochi.server import http2 as transport
from evochi.v1 import evochi_pb2 as pb
from evochi.v1 import evochi_pb2_grpc as pb_grpc
from tests.server import h2raw
from tests.server.h2raw import RawClient, frame, grpc_message
from tests.server.helpers import OPTIONS, StubWorker, play, run

pytestmark = pytest.mark.timeout(60)

SERVICE = "/evochi.v1.EvochiService/"
SUBSCRIBE_1 = grpc_message(pb.SubscribeRequest(cores=1).SerializeToString())
SUBSCRIBE_2 = grpc_message(pb.SubscribeRequest(cores=2).SerializeToString())


def goaway_code(frames: list[h2raw.Frame]) -> int | None:
    codes = [struct.unpack(">II", f.payload[:8])[1] for f in frames if f.kind == h2raw.GOAWAY]
    return codes[-1] if codes else None


async def initialized(
    server: EmbeddedServer, state: bytes, metadata: list[tuple[str, str]] | None = None
) -> StubWorker:
    """A first worker that has initialized the training with ``state`` (it has sent
    heartbeat 1: its next is 2)."""
    worker = StubWorker(server.address, cores=1, metadata=metadata or ())
    await worker.subscribe()
    task = (await worker.expect(pb.EVENT_TYPE_INITIALIZE)).initialize.task_id
    assert (await worker.finish_initialization(task, state)).ok
    return worker


def test_broken_connections_get_goaway_and_the_server_keeps_serving() -> None:
    async def scenario() -> None:
        async with EmbeddedServer(ServerConfig(population_size=8, worker_timeout=30)) as server:
            honest = await initialized(server, b"s")
            cases = [
                # (what the peer sends after connecting, expected GOAWAY error code or None)
                (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", transport.PROTOCOL_ERROR),
                (os.urandom(64), transport.PROTOCOL_ERROR),
                (h2raw.PREFACE + frame(h2raw.SETTINGS, 0, 0)
                 + b"\xff\xff\xff\x00\x00\x00\x00\x00\x01", transport.FRAME_SIZE_ERROR),
                (h2raw.PREFACE + frame(h2raw.HEADERS, 5, 1, b"\xff\xff\xff\xff\xff\xff"),
                 transport.COMPRESSION_ERROR),
                (h2raw.PREFACE + frame(h2raw.DATA, 0, 0, b"x"), transport.PROTOCOL_ERROR),
                (h2raw.PREFACE + frame(h2raw.HEADERS, 5, 2, b"\x82"), transport.PROTOCOL_ERROR),
                (h2raw.PREFACE + frame(h2raw.PING, 0, 0, b"short"), transport.PROTOCOL_ERROR),
                (h2raw.PREFACE + frame(h2raw.SETTINGS, 0, 0, b"\x00\x04\xff\xff\xff\xff"),
                 transport.FLOW_CONTROL_ERROR),
                (h2raw.PREFACE + frame(h2raw.WINDOW_UPDATE, 0, 0, b"\x00\x00\x00\x00"),
                 transport.PROTOCOL_ERROR),
            ]  # fmt: skip
            for sent, code in cases:
                client = await RawClient.connect(server.port, preface=False)
                client.send(sent)
                frames = await client.until_closed()
                assert goaway_code(frames) == code, (sent[:40], frames)
                await client.close()
            # A peer vanishing mid-frame, and one vanishing mid-call, cost nothing.
            client = await RawClient.connect(server.port)
            client.send(frame(h2raw.DATA, 0, 1, b"x" * 100)[:50])
            await client.close()
            client = await RawClient.connect(server.port)
            client.request(SERVICE + "Heartbeat", None)
            await client.close()
            for seq in range(2, 5):
                assert (await honest.heartbeat(seq)).ok
            await asyncio.sleep(0.1)
            assert len(server._server.connections) == 1  # only the honest worker's
            await honest.close()

    run(scenario())


def test_bad_calls_end_with_a_grpc_status_on_a_connection_that_lives_on() -> None:
    async def scenario() -> None:
        async with EmbeddedServer(ServerConfig(population_size=8, worker_timeout=30)) as server:
            honest = await initialized(server, b"s")
            auth = [("authorization", f"Bearer {honest.token}")]
            client = await RawClient.connect(server.port)
            beat = pb.HeartbeatRequest(seq_id=2).SerializeToString()

            async def call(path: str, body: bytes | None, **kw: object) -> dict[str, str]:
                kw["extra"] = [*auth, *kw.get("extra", [])]  # type: ignore[list-item]
                stream_id = client.request(path, body, **kw)  # type: ignore[arg-type]
                return (await client.response(stream_id)).status

            assert (await call(SERVICE + "Nope", grpc_message(b"")))["grpc-status"] == "12"
            status = await call("/other.Service/Heartbeat", grpc_message(beat))
            assert status["grpc-status"] == "12"
            for content_type in ("text/plain", "application/grpc-web"):
                status = await call(
                    SERVICE + "Heartbeat", grpc_message(beat), content_type=content_type
                )
                assert status == {":status": "415"}
            status = await call(SERVICE + "Heartbeat", grpc_message(beat), method="GET")
            assert status == {":status": "405"}
            # Framing: two messages, none, a cut prefix, a bad flag byte.
            two = grpc_message(beat) + grpc_message(beat)
            assert (await call(SERVICE + "Heartbeat", two))["grpc-status"] == "3"
            assert (await call(SERVICE + "Heartbeat", None))["grpc-status"] == "3"
            assert (await call(SERVICE + "Heartbeat", b"\x00\x00"))["grpc-status"] == "3"
            flag7 = b"\x07" + grpc_message(beat)[1:]
            status = await call(SERVICE + "Heartbeat", flag7)
            assert status["grpc-status"] == "13" and "flag" in status["grpc-message"]
            # Compression: an unknown encoding, junk, truncated gzip; then real gzip.
            snappy = [("grpc-encoding", "snappy")]
            status = await call(SERVICE + "Heartbeat", grpc_message(beat, True), extra=snappy)
            assert status["grpc-status"] == "12"
            gz = [("grpc-encoding", "gzip")]
            status = await call(SERVICE + "Heartbeat", grpc_message(b"junk", True), extra=gz)
            assert status["grpc-status"] == "13"
            cut = gzip.compress(beat)[:-6]
            status = await call(SERVICE + "Heartbeat", grpc_message(cut, True), extra=gz)
            assert status["grpc-status"] == "13" and "truncated" in status["grpc-message"]
            zipped = grpc_message(gzip.compress(beat), True)
            status = await call(SERVICE + "Heartbeat", zipped, extra=gz)
            assert status["grpc-status"] == "0", status  # decompressed: heartbeat 1 accepted
            # A stranger (a token nobody holds) is refused; grpc-message is percent-encoded.
            stranger = [("authorization", "Bearer \u00e9t\u00e9")]
            stream_id = client.request(SERVICE + "Heartbeat", grpc_message(beat), extra=stranger)
            status = (await client.response(stream_id)).status
            assert status["grpc-status"] == "16"
            # The connection still serves a real call: Subscribe gets hello.
            stream_id = client.request(SERVICE + "Subscribe", SUBSCRIBE_2)
            header = None
            while header is None:
                f = await client.read_frame()
                assert f is not None
                if f.kind == h2raw.DATA and f.stream_id == stream_id:
                    header = f.payload
            event = pb.SubscribeResponse.FromString(bytes(header[5:]))
            assert event.type == pb.EVENT_TYPE_HELLO and event.hello.population_size == 8
            await client.close()
            await honest.close()

    run(scenario())


def test_strangers_are_refused_from_their_headers_and_oversized_uploads_are_cut() -> None:
    async def scenario() -> None:
        config = ServerConfig(
            population_size=8, worker_timeout=30, max_message_bytes=4096, join_token="j"
        )
        async with EmbeddedServer(config) as server:
            join = [("authorization", "Bearer j")]
            honest = await initialized(server, b"s", metadata=join)
            auth = [("authorization", f"Bearer {honest.token}")]
            client = await RawClient.connect(server.port)
            # Strangers are answered from their headers alone: no DATA was ever sent.
            for method in ("FinishShareState", "Subscribe"):
                stream_id = client.request(SERVICE + method, None, keep_open=True)
                assert (await client.response(stream_id)).status["grpc-status"] == "16", method
            # A worker's oversized message: RESOURCE_EXHAUSTED, the upload reset.
            stream_id = client.request(
                SERVICE + "FinishShareState", None, keep_open=True, extra=auth
            )
            client.send(frame(h2raw.DATA, 0, stream_id, grpc_message(b"\x00" * 10_000)))
            response = await client.response(stream_id)
            assert response.status["grpc-status"] == "8"
            assert "limit of 4096 bytes" in response.status["grpc-message"]
            # What was still in flight for that stream is ignored.
            client.send(frame(h2raw.DATA, h2raw.END_STREAM, stream_id, b"\x00" * 1000))
            # A join uploads at most 64 KiB (a SubscribeRequest is one int).
            stream_id = client.request(SERVICE + "Subscribe", None, keep_open=True, extra=join)
            for _ in range(2):  # frames are at most 64 KiB (OUR_MAX_FRAME)
                client.send(frame(h2raw.DATA, 0, stream_id, b"\x00" * 35_000))
            assert (await client.response(stream_id)).status["grpc-status"] == "8"
            beat = grpc_message(pb.HeartbeatRequest(seq_id=2).SerializeToString())
            stream_id = client.request(SERVICE + "Heartbeat", beat, extra=auth)
            assert (await client.response(stream_id)).status["grpc-status"] == "0"
            await client.close()
            await honest.close()

    run(scenario())


def test_unfinished_uploads_on_one_connection_are_capped() -> None:
    async def scenario() -> None:
        config = ServerConfig(population_size=8, worker_timeout=30, max_message_bytes=100_000)
        async with EmbeddedServer(config) as server:
            honest = await initialized(server, b"s")
            auth = [("authorization", f"Bearer {honest.token}")]
            client = await RawClient.connect(server.port)
            ids = [
                client.request(SERVICE + "FinishShareState", None, keep_open=True, extra=auth)
                for _ in range(4)
            ]
            # 4 x 60,000 bytes: each within the limit, together over limit + 64 KiB.
            for sid in ids:
                client.send(frame(h2raw.DATA, 0, sid, b"\x00" * 60_000))
            for sid in ids[2:]:
                status = (await client.response(sid)).status
                assert status["grpc-status"] == "8" and "one at a time" in status["grpc-message"]
            for sid in ids[:2]:  # within bounds: they go on, and are answered when complete
                client.send(frame(h2raw.DATA, h2raw.END_STREAM, sid, b""))
                assert (await client.response(sid)).status["grpc-status"] == "3"
            await client.close()
            await honest.close()

    run(scenario())


def test_a_join_after_the_training_finished_leaves_nothing_behind() -> None:
    async def scenario() -> None:
        config = ServerConfig(population_size=8, max_epochs=1, worker_timeout=30)
        async with EmbeddedServer(config) as server:
            worker = StubWorker(server.address, cores=8)
            await play(worker)
            await server.wait_finished(timeout=10)
            for _ in range(5):
                late = StubWorker(server.address, cores=1)
                await late.subscribe()
                await late.expect(pb.EVENT_TYPE_STOP)
                assert await late.read() is grpc.aio.EOF
                await late.close()
            await asyncio.sleep(0.05)
            assert server.service._streams == {}
            await worker.close()

    run(scenario())


def test_hostile_header_blocks_and_ping_floods_cost_little() -> None:
    async def scenario() -> None:
        async with EmbeddedServer(ServerConfig(population_size=8, worker_timeout=30)) as server:
            honest = await initialized(server, b"s")
            # A 40 KiB header block (HPACK table-size updates, decoding to nothing).
            client = await RawClient.connect(server.port)
            client.send(frame(h2raw.HEADERS, h2raw.END_HEADERS, 1, b"\x20" * 40_000))
            assert goaway_code(await client.until_closed()) == transport.PROTOCOL_ERROR
            await client.close()
            # A peer that floods PINGs: answered up to its budget, then GOAWAY(ENHANCE_YOUR_CALM).
            flooder = await RawClient.connect(server.port)
            flooder.send(frame(h2raw.PING, 0, 0, b"12345678") * 5000)
            frames = await flooder.until_closed()
            assert goaway_code(frames) == transport.ENHANCE_YOUR_CALM
            acks = sum(1 for f in frames if f.kind == h2raw.PING)
            assert acks < 1.5 * transport.CONTROL_BUDGET[1], acks  # (it drains meanwhile)
            for seq in range(2, 5):  # the honest worker is served all along
                assert (await honest.heartbeat(seq)).ok
            await flooder.close()
            await honest.close()

    run(scenario())


def test_large_states_cross_both_ways_intact() -> None:
    state = os.urandom(40 * 1024 * 1024)

    async def scenario() -> None:
        async with EmbeddedServer(ServerConfig(population_size=8, worker_timeout=30)) as server:
            first = await initialized(server, state)
            late = StubWorker(server.address, cores=1)
            hello = await late.subscribe()
            assert hello.state == state
            await late.close()
            await first.close()

    run(scenario(), timeout=120)


def test_a_small_receive_window_is_respected() -> None:
    state = os.urandom(5000)

    async def scenario() -> None:
        async with EmbeddedServer(ServerConfig(population_size=8, worker_timeout=30)) as server:
            first = await initialized(server, state)
            # The client allows 100 bytes per stream until it says otherwise.
            client = await RawClient.connect(server.port, settings=struct.pack(">HI", 4, 100))
            stream_id = client.request(SERVICE + "Subscribe", SUBSCRIBE_1)
            received = bytearray()
            while True:
                try:
                    f = await client.read_frame(timeout=0.5)
                except TimeoutError:
                    break  # the server waits for a WINDOW_UPDATE
                assert f is not None
                if f.kind == h2raw.DATA and f.stream_id == stream_id:
                    received += f.payload
            assert len(received) == 100
            client.send(frame(h2raw.WINDOW_UPDATE, 0, stream_id, struct.pack(">I", 1 << 20)))
            while len(received) < 5 + int.from_bytes(received[1:5], "big"):
                f = await client.read_frame()
                assert f is not None
                if f.kind == h2raw.DATA and f.stream_id == stream_id:
                    received += f.payload
            event = pb.SubscribeResponse.FromString(bytes(received[5:]))
            assert event.hello.state == state
            await client.close()
            await first.close()

    run(scenario())


def test_gzip_compressing_grpc_clients_are_served() -> None:
    state = b"compressible " * 100_000

    async def scenario() -> None:
        async with EmbeddedServer(ServerConfig(population_size=8, worker_timeout=30)) as server:
            channel = grpc.aio.insecure_channel(
                server.address, options=OPTIONS, compression=grpc.Compression.Gzip
            )
            stub = pb_grpc.EvochiServiceStub(channel)
            call = stub.Subscribe(pb.SubscribeRequest(cores=1))
            hello = (await call.read()).hello
            auth = (("authorization", f"Bearer {hello.token}"),)
            # Work (here: initialize) comes after the first heartbeat.
            assert (await stub.Heartbeat(pb.HeartbeatRequest(seq_id=1), metadata=auth)).ok
            task = (await call.read()).initialize.task_id
            request = pb.FinishInitializationRequest(task_id=task, state=state)
            assert (await stub.FinishInitialization(request, metadata=auth)).ok
            late = StubWorker(server.address, cores=1)
            assert (await late.subscribe()).state == state
            await late.close()
            call.cancel()
            await channel.close()

    run(scenario())


def test_silent_peers_are_pinged_then_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "KEEPALIVE_IDLE", 0.3)
    monkeypatch.setattr(transport, "KEEPALIVE_TIMEOUT", 0.6)

    async def scenario() -> None:
        async with EmbeddedServer(ServerConfig(population_size=8, worker_timeout=30)) as server:
            silent = await RawClient.connect(server.port)
            alive = await RawClient.connect(server.port)

            async def answer_pings(client: RawClient, seconds: float) -> int:
                pings = 0
                loop = asyncio.get_running_loop()
                end = loop.time() + seconds
                while loop.time() < end:
                    try:
                        f = await client.read_frame(timeout=end - loop.time())
                    except TimeoutError:
                        break
                    if f is None:
                        break
                    if f.kind == h2raw.PING and not f.flags & h2raw.ACK:
                        pings += 1
                        client.send(frame(h2raw.PING, h2raw.ACK, 0, f.payload))
                    elif f.kind == h2raw.SETTINGS and not f.flags & h2raw.ACK:
                        client.send(frame(h2raw.SETTINGS, h2raw.ACK, 0))
                return pings

            pinger = asyncio.ensure_future(answer_pings(alive, 3.0))
            frames = await silent.until_closed(timeout=5.0)
            assert any(f.kind == h2raw.PING for f in frames)
            assert await pinger >= 2
            alive.send(frame(h2raw.PING, 0, 0, b"12345678"))
            f = await alive.read_frame()
            while f is not None and f.kind != h2raw.PING:
                f = await alive.read_frame()
            assert f is not None and f.flags & h2raw.ACK and f.payload == b"12345678"
            await silent.close()
            await alive.close()

    run(scenario())


def test_stop_sends_goaway_and_ends_streams_with_unavailable() -> None:
    async def scenario() -> None:
        server = EmbeddedServer(ServerConfig(population_size=8, worker_timeout=30))
        await server.start()
        worker = await initialized(server, b"s")
        await server.stop()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                event = await worker.read()
                assert event.type == pb.EVENT_TYPE_EVALUATE  # sent before the stop
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert ended.value.details() == "server stopping"
        await worker.close()

    run(scenario())


# --------------------------------------------------------------------------- hostile peers
# The limits of docs/server.md#limits, each checked by what the server sends back; what the
# attacks cost honest training is measured in test_adversarial.py.


async def calm_after(client: RawClient, data: bytes) -> list[h2raw.Frame]:
    """Send ``data``; every frame until the server closes the connection."""
    client.send(data)
    return await client.until_closed(timeout=10)


def test_control_frame_floods_end_with_enhance_your_calm() -> None:
    floods = {
        "SETTINGS": frame(h2raw.SETTINGS, 0, 0),
        "PRIORITY": frame(2, 0, 1, b"\x00\x00\x00\x00\x10"),
        "unknown type": frame(0xFA, 0, 0, b"????"),
        "connection WINDOW_UPDATE": frame(h2raw.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)),
        "RST_STREAM of a closed stream": frame(h2raw.RST_STREAM, 0, 1, struct.pack(">I", 8)),
    }

    async def scenario() -> None:
        async with EmbeddedServer(ServerConfig(population_size=8, worker_timeout=30)) as server:
            honest = await initialized(server, b"s")
            for name, one in floods.items():
                client = await RawClient.connect(server.port)
                frames = await calm_after(client, one * 5000)
                assert goaway_code(frames) == transport.ENHANCE_YOUR_CALM, name
                await client.close()
            # CONTINUATION frames that add nothing to a header block, forever.
            client = await RawClient.connect(server.port)
            start = frame(h2raw.HEADERS, 0, 1, client.encoder.encode([(":method", "POST")]))
            frames = await calm_after(client, start + frame(9, 0, 1) * 5000)
            assert goaway_code(frames) == transport.ENHANCE_YOUR_CALM
            await client.close()
            assert (await honest.heartbeat(2)).ok  # served all along
            await honest.close()

    run(scenario())


def test_rapid_reset_and_settings_with_many_entries_end_the_connection() -> None:
    async def scenario() -> None:
        async with EmbeddedServer(ServerConfig(population_size=8, worker_timeout=30)) as server:
            honest = await initialized(server, b"s")
            client = await RawClient.connect(server.port)
            burst = b""
            for _ in range(400):  # Subscribe, then reset at once (CVE-2023-44487)
                stream_id = client.next_stream
                client.request(SERVICE + "Subscribe", grpc_message(b"\x08\x01"))
                burst += frame(h2raw.RST_STREAM, 0, stream_id, struct.pack(">I", 8))
            frames = await calm_after(client, burst)
            assert goaway_code(frames) == transport.ENHANCE_YOUR_CALM
            await client.close()
            # No join outlived its reset.
            assert len(server.service.core.workers) == 1
            entries = struct.pack(">HI", 4, 65_535) * (transport.MAX_SETTINGS_ENTRIES + 1)
            client = await RawClient.connect(server.port)
            frames = await calm_after(client, frame(h2raw.SETTINGS, 0, 0, entries))
            assert goaway_code(frames) == transport.ENHANCE_YOUR_CALM
            await client.close()
            assert (await honest.heartbeat(2)).ok
            await honest.close()

    run(scenario())


def test_streams_joins_and_the_header_cache_are_capped_per_connection() -> None:
    async def scenario() -> None:
        async with EmbeddedServer(ServerConfig(population_size=8, worker_timeout=30)) as server:
            honest = await initialized(server, b"s")
            # Unfinished streams: MAX_CONCURRENT_STREAMS is advertised and enforced.
            client = await RawClient.connect(server.port)
            settings = await client.read_frame()
            assert settings is not None and settings.kind == h2raw.SETTINGS
            advertised = dict(
                struct.unpack_from(">HI", settings.payload, i)
                for i in range(0, len(settings.payload), 6)
            )
            assert advertised[3] == transport.OUR_MAX_STREAMS
            beat = grpc_message(pb.HeartbeatRequest(seq_id=2).SerializeToString())
            auth = [("authorization", f"Bearer {honest.token}")]
            ids = [
                client.request(SERVICE + "Heartbeat", None, keep_open=True, extra=auth)
                for _ in range(transport.OUR_MAX_STREAMS + 1)
            ]
            refused = await client.response(ids[-1])
            assert refused.reset == transport.REFUSED_STREAM
            client.send(frame(h2raw.DATA, h2raw.END_STREAM, ids[0], beat))
            assert (await client.response(ids[0])).status["grpc-status"] == "0"
            await client.close()
            # Joins per connection: past the budget, UNAVAILABLE (clients retry later).
            client = await RawClient.connect(server.port)
            burst = int(transport.JOIN_BUDGET[1])
            codes = []
            for _ in range(burst + 10):
                stream_id = client.request(SERVICE + "Subscribe", None, keep_open=True)
                client.send(frame(h2raw.RST_STREAM, 0, stream_id, struct.pack(">I", 8)))
            probe = client.request(SERVICE + "Subscribe", None, keep_open=True)
            codes.append((await client.response(probe)).status.get("grpc-status"))
            assert codes == ["14"]  # UNAVAILABLE
            await client.close()
            # Distinct header blocks: the decoded-header cache stays capped.
            client = await RawClient.connect(server.port)
            fields = [(":method", "POST"), (":path", "/no.Such/M"),
                      ("content-type", "application/grpc")]  # fmt: skip
            for i in range(3 * transport.HEADER_CACHE_SIZE):
                unindexed = [hpack.NeverIndexedHeaderTuple(n, v) for n, v in fields]
                block = hpack.Encoder().encode(
                    [*unindexed, hpack.NeverIndexedHeaderTuple("x", str(i))]
                )
                ends = h2raw.END_HEADERS | h2raw.END_STREAM
                client.send(frame(h2raw.HEADERS, ends, client.next_stream, block))
                client.next_stream += 2
            assert (await client.response(client.next_stream - 2)).status["grpc-status"] == "12"
            (conn,) = [c for c in server._server.connections if len(c.header_cache) > 10]
            assert len(conn.header_cache) == transport.HEADER_CACHE_SIZE
            assert server._server.header_cache_entries <= transport.HEADER_CACHE_TOTAL
            await client.close()
            await honest.close()

    run(scenario())


def test_a_window_update_flood_costs_no_walk_over_stalled_streams() -> None:
    async def scenario() -> None:
        async with EmbeddedServer(ServerConfig(population_size=8, worker_timeout=30)) as server:
            honest = await initialized(server, b"s")
            # Window 0 for every stream: the Hello of each join waits in its stream.
            client = await RawClient.connect(server.port, settings=struct.pack(">HI", 4, 0))
            for _ in range(20):
                client.request(SERVICE + "Subscribe", grpc_message(b"\x08\x01"))
            await asyncio.sleep(0.5)
            (conn,) = [c for c in server._server.connections if len(c.streams) >= 20]
            # Waiting for their own window, not the connection's: a connection-level
            # WINDOW_UPDATE has nothing to walk.
            assert len(conn.stalled) == 20 and not conn.blocked
            # A larger INITIAL_WINDOW_SIZE releases them all, in one frame.
            client.send(frame(h2raw.SETTINGS, 0, 0, struct.pack(">HI", 4, 1 << 20)))
            await asyncio.sleep(0.5)
            assert not conn.stalled and not conn.blocked
            await client.close()
            await honest.close()

    run(scenario())


def test_a_peer_that_never_reads_its_answers_stops_being_read() -> None:
    async def scenario() -> None:
        async with EmbeddedServer(ServerConfig(population_size=8, worker_timeout=30)) as server:
            honest = await initialized(server, b"s")
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            encoder = hpack.Encoder()
            fields = [(":method", "POST"), (":path", "/no.Such/M"),
                      ("content-type", "application/grpc")]  # fmt: skip
            ends = h2raw.END_HEADERS | h2raw.END_STREAM
            # The first block enters the fields into the HPACK table; the rest index them.
            writer.write(h2raw.PREFACE + frame(h2raw.SETTINGS, 0, 0)
                         + frame(h2raw.HEADERS, ends, 1, encoder.encode(fields)))  # fmt: skip
            block = encoder.encode(fields)
            stream_id = 3
            with contextlib.suppress(TimeoutError, ConnectionError):
                for _ in range(200):
                    batch = b""
                    for _ in range(500):
                        batch += frame(h2raw.HEADERS, ends, stream_id, block)
                        stream_id += 2
                    writer.write(batch)
                    await asyncio.wait_for(writer.drain(), 0.5)
            backlog = [c.transport.get_write_buffer_size() for c in server._server.connections]
            assert max(backlog) < 1 << 20  # answers queued: bounded, whatever was sent
            assert (await honest.heartbeat(2)).ok
            writer.transport.abort()
            await honest.close()

    run(scenario())
