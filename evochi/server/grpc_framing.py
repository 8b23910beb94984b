"""gRPC's length-prefixed messages, request decompression and status encoding, without I/O.

A gRPC message on the wire is a compressed-flag byte, a 4-byte big-endian length and the
message. evochi's calls carry exactly one request message; a compressed one (gzip or
deflate, named by ``grpc-encoding``) is inflated at most to the call's limit, so a
decompression bomb stops there. Responses are never compressed. Errors a call's peer caused
are :class:`CallError`, carrying the gRPC status to answer with.
"""

from __future__ import annotations

import zlib

import grpc

from evochi.errors import EvochiError

__all__ = [
    "PREFIX",
    "CallError",
    "decode_request",
    "frame_message",
    "percent_encode",
    "status_code",
]

PREFIX = 5  # compressed-flag byte and length


class CallError(EvochiError):
    """Ends one call with a gRPC status (the connection lives on)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def frame_message(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def decode_request(body: bytes | bytearray, encoding: bytes | None, limit: int) -> bytes:
    """The one message of a request's body, inflated if compressed (to at most ``limit``
    bytes). Raises :class:`CallError`."""
    if len(body) < PREFIX:
        raise CallError("INVALID_ARGUMENT", "expected one request message, got none")
    length = int.from_bytes(body[1:PREFIX], "big")
    if len(body) != PREFIX + length:
        raise CallError("INVALID_ARGUMENT", "expected exactly one request message")
    message = bytes(body[PREFIX:])
    flag = body[0]
    if flag == 0:
        return message
    if flag != 1:
        raise CallError("INTERNAL", f"invalid compressed-flag byte {flag}")
    name = (encoding or b"identity").decode("latin-1")
    if name in ("gzip", "deflate"):
        return _inflate(message, name, limit)
    if name == "identity":
        raise CallError("INTERNAL", "compressed message without grpc-encoding")
    raise CallError("UNIMPLEMENTED", f"unsupported grpc-encoding {name}")


def _inflate(message: bytes, encoding: str, limit: int) -> bytes:
    inflater = zlib.decompressobj(31 if encoding == "gzip" else 15)
    try:
        plain = inflater.decompress(message, limit + 1)
    except zlib.error as err:
        raise CallError("INTERNAL", f"cannot decompress the request: {err}") from None
    if len(plain) > limit:
        raise CallError(
            "RESOURCE_EXHAUSTED", f"decompressed request over the limit of {limit} bytes"
        )
    if not inflater.eof or inflater.unused_data:
        raise CallError("INTERNAL", f"truncated or trailing {encoding} data")
    return plain


def status_code(name: str) -> int:
    """The number of a gRPC status, by name ("OK", "UNAVAILABLE", ...)."""
    return grpc.StatusCode[name].value[0]


def percent_encode(message: str) -> bytes:
    """grpc-message: UTF-8, percent-encoding everything outside printable ASCII and '%'."""
    out = bytearray()
    for byte in message.encode("utf-8", "replace")[:4096]:
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)
