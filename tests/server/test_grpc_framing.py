"""gRPC message framing and request decompression, without sockets."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable

import pytest

from evochi.server.grpc_framing import (
    PREFIX,
    CallError,
    decode_request,
    frame_message,
    percent_encode,
    status_code,
)


def compressed(message: bytes) -> bytes:
    return b"\x01" + len(message).to_bytes(4, "big") + message


def code_of(body: bytes, encoding: bytes | None = None, limit: int = 1024) -> str:
    with pytest.raises(CallError) as caught:
        decode_request(body, encoding, limit)
    return caught.value.code


def test_framing_round_trip() -> None:
    for message in (b"", b"x", bytes(range(256)) * 300):
        framed = frame_message(message)
        assert framed[:PREFIX] == b"\x00" + len(message).to_bytes(4, "big")
        assert decode_request(framed, None, 0) == message  # uncompressed: no inflation limit
        assert decode_request(bytearray(framed), b"gzip", 0) == message


def test_exactly_one_message() -> None:
    assert code_of(b"") == "INVALID_ARGUMENT"
    assert code_of(b"\x00\x00\x00") == "INVALID_ARGUMENT"
    assert code_of(frame_message(b"abc")[:-1]) == "INVALID_ARGUMENT"
    assert code_of(frame_message(b"a") + frame_message(b"b")) == "INVALID_ARGUMENT"
    assert code_of(b"\x02" + frame_message(b"abc")[1:]) == "INTERNAL"


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [(b"gzip", gzip.compress), (b"deflate", zlib.compress)],
)
def test_compressed_requests_are_inflated_up_to_the_limit(
    encoding: bytes, compress: Callable[[bytes], bytes]
) -> None:
    plain = b"hello " * 100
    body = compressed(compress(plain))
    assert decode_request(body, encoding, len(plain)) == plain
    # A bomb stops at the limit: a megabyte of zeros in a kilobyte, against a limit of 1000.
    bomb = compressed(compress(bytes(1 << 20)))
    assert len(bomb) < 2048
    assert code_of(bomb, encoding, 1000) == "RESOURCE_EXHAUSTED"
    assert code_of(compressed(compress(plain)[:-3]), encoding) == "INTERNAL"  # truncated
    assert code_of(compressed(compress(plain) + b"junk"), encoding) == "INTERNAL"
    assert code_of(compressed(b"not compressed at all"), encoding) == "INTERNAL"


def test_encodings_other_than_gzip_and_deflate() -> None:
    body = compressed(gzip.compress(b"x"))
    assert code_of(body, None) == "INTERNAL"  # compressed, but grpc-encoding is missing
    assert code_of(body, b"identity") == "INTERNAL"
    assert code_of(body, b"snappy") == "UNIMPLEMENTED"


def test_status_and_message_encoding() -> None:
    assert status_code("OK") == 0
    assert status_code("UNAVAILABLE") == 14
    assert percent_encode("plain text") == b"plain text"
    assert percent_encode("100% ü\n") == b"100%25 %C3%BC%0A"
    assert len(percent_encode("é" * 10_000)) == 3 * 4096
