"""A bare HTTP/2 client on a socket, for sending the server what no gRPC library would."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
END_STREAM = ACK = 0x1
END_HEADERS = 0x4


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">BHBBI", n >> 16, n & 0xFFFF, kind, flags, stream_id) + payload


def grpc_message(body: bytes, compressed: bool = False) -> bytes:
    return bytes((1 if compressed else 0,)) + len(body).to_bytes(4, "big") + body


@dataclass
class Frame:
    kind: int
    flags: int
    stream_id: int
    payload: bytes


@dataclass
class Response:
    headers: list[dict[str, str]] = field(default_factory=list)  # headers, then trailers
    data: bytearray = field(default_factory=bytearray)
    reset: int | None = None

    @property
    def status(self) -> dict[str, str]:
        merged: dict[str, str] = {}
        for block in self.headers:
            merged.update(block)
        return merged


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.next_stream = 1

    @classmethod
    async def connect(cls, port: int, *, preface: bool = True, settings: bytes = b"") -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        if preface:
            client.send(PREFACE + frame(SETTINGS, 0, 0, settings))
        return client

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def read_frame(self, timeout: float = 5.0) -> Frame | None:
        """The next frame, or None at EOF."""
        try:
            header = await asyncio.wait_for(self.reader.readexactly(9), timeout)
            high, low, kind, flags, stream_id = struct.unpack(">BHBBI", header)
            payload = await asyncio.wait_for(self.reader.readexactly((high << 16) | low), timeout)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        return Frame(kind, flags, stream_id & 0x7FFFFFFF, payload)

    async def until_closed(self, timeout: float = 5.0) -> list[Frame]:
        """Every frame until the server closes the connection."""
        frames = []
        while (f := await self.read_frame(timeout)) is not None:
            frames.append(f)
        return frames

    def request(
        self,
        path: str,
        body: bytes | None,
        *,
        content_type: str = "application/grpc",
        extra: list[tuple[str, str]] | None = None,
        keep_open: bool = False,
        method: str = "POST",
    ) -> int:
        """Send a call's headers and, unless ``body`` is None, its data ending the stream
        (``keep_open``: headers only, the stream left open for DATA frames)."""
        stream_id = self.next_stream
        self.next_stream += 2
        headers = [
            (":method", method),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", content_type),
            ("te", "trailers"),
            *(extra or []),
        ]
        block = self.encoder.encode(headers)
        end = END_STREAM if body is None and not keep_open else 0
        self.send(frame(HEADERS, END_HEADERS | end, stream_id, block))
        if body is not None:
            self.send(frame(DATA, END_STREAM, stream_id, body))
        return stream_id

    async def response(self, stream_id: int, *, window_updates: bool = True) -> Response:
        """Read frames until ``stream_id`` ends; answers SETTINGS and PING on the way."""
        result = Response()
        while True:
            f = await self.read_frame()
            if f is None:
                raise ConnectionError("connection closed before the response ended")
            if f.kind == SETTINGS and not f.flags & ACK:
                self.send(frame(SETTINGS, ACK, 0))
            elif f.kind == PING and not f.flags & ACK:
                self.send(frame(PING, ACK, 0, f.payload))
            elif f.stream_id != stream_id:
                continue
            elif f.kind == HEADERS:
                fields = self.decoder.decode(f.payload)
                result.headers.append(dict(fields))
                if f.flags & END_STREAM:
                    return result
            elif f.kind == DATA:
                result.data += f.payload
                if window_updates and f.payload:
                    inc = struct.pack(">I", len(f.payload))
                    self.send(frame(WINDOW_UPDATE, 0, 0, inc))
                    self.send(frame(WINDOW_UPDATE, 0, stream_id, inc))
                if f.flags & END_STREAM:
                    return result
            elif f.kind == RST_STREAM:
                result.reset = struct.unpack(">I", f.payload)[0]
                return result

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
