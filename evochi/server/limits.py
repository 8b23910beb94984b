"""What one peer may cost the server: the limits and budgets of both transports, in one place.

docs/server.md#limits-hostile-peers explains each limit and what happens past it; this
module is the only place their values are written. Budgets are leaky buckets per connection
(:class:`Budget`); what each frame spends from the control budget is :data:`COSTS`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = [
    "BYTES_PER_TURN",
    "CLOSE_LINGER",
    "CONTROL_BUDGET",
    "COSTS",
    "FRAMES_PER_TURN",
    "HEADER_CACHE_BLOCK",
    "HEADER_CACHE_SIZE",
    "HEADER_CACHE_TOTAL",
    "JOIN_BUDGET",
    "KEEPALIVE_IDLE",
    "KEEPALIVE_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_HEADER_BLOCK",
    "MAX_SETTINGS_ENTRIES",
    "MAX_SUBSCRIBE_REQUEST",
    "OUR_MAX_FRAME",
    "OUR_MAX_HEADER_LIST",
    "OUR_MAX_STREAMS",
    "RESET_BUDGET",
    "Budget",
    "ControlCosts",
]

# A partial frame is held in memory until its last byte: 64 KiB bounds what a peer that
# stops one byte short of a frame costs (a large state is many frames; ~1 µs each).
OUR_MAX_FRAME = 64 * 1024
# Unfinished streams per connection (advertised, and refused past it): a worker needs ~3.
OUR_MAX_STREAMS = 100
OUR_MAX_HEADER_LIST = 64 * 1024
MAX_HEADER_BLOCK = 32 * 1024  # compressed; decoding a hostile block costs CPU in proportion
# Distinct blocks per connection: (method x worker) pairs, and gRPC clients share one
# connection between a process's workers. The total bounds the memory (a block of at most
# HEADER_CACHE_BLOCK decodes to at most the HPACK table's 4 KiB plus its own bytes).
HEADER_CACHE_SIZE = 256
HEADER_CACHE_TOTAL = 8192
HEADER_CACHE_BLOCK = 2048  # larger blocks are decoded every time, never kept
MAX_SUBSCRIBE_REQUEST = 64 * 1024  # a SubscribeRequest is one int32; also per connection
MAX_SETTINGS_ENTRIES = 32  # per SETTINGS frame (nghttp2's default); a client sends ~6
MAX_CONNECTIONS = 1024
# Budgets per connection, leaky buckets: (drained per second, most held). A gRPC client sends
# a few control frames per call (WINDOW_UPDATE, BDP PING); a flood sends thousands per second.
CONTROL_BUDGET = (1000.0, 2000.0)
RESET_BUDGET = (50.0, 200.0)  # streams the peer resets (CVE-2023-44487, Rapid Reset)
# Subscribe calls (each a join and a Hello) per connection, unless the server has a join
# token, which the call then presented. gRPC clients share one connection between the
# workers of a process (64 churning workers in benchmarks/load.py): past the budget a join is
# answered UNAVAILABLE, which clients retry after a backoff.
JOIN_BUDGET = (50.0, 100.0)
# Fairness: frames (or bytes) of one connection per event-loop turn.
FRAMES_PER_TURN = 200
BYTES_PER_TURN = 1 << 20
CLOSE_LINGER = 2.0  # a closed connection whose peer does not read its last bytes is aborted
# Dead peers: a connection silent this long is pinged, and dropped without an answer.
KEEPALIVE_IDLE = 60.0
KEEPALIVE_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True)
class ControlCosts:
    """The control budget's price list: what a frame or event that does no useful work
    spends, and what useful work earns back.

    Every price is 1 but a header block decoded from scratch, which costs CPU in proportion
    to its size (indexed references to a large table entry inflate up to
    OUR_MAX_HEADER_LIST). gRPC clients send ~3 WINDOW_UPDATEs per call and one per message
    they receive, so the budget grows with the calls served (never below zero).
    """

    settings: float = 1.0
    ping: float = 1.0
    window_update: float = 1.0
    rst_stream: float = 1.0
    goaway: float = 1.0
    ignored_frame: float = 1.0  # PRIORITY and unknown frame types
    continuation: float = 1.0
    unfinished_headers: float = 1.0  # HEADERS without END_HEADERS
    empty_data: float = 1.0  # DATA without payload or END_STREAM
    late_frame: float = 1.0  # DATA or HEADERS of a stream answered, reset or closed already
    refused_call: float = 1.0  # unknown method, 405/415, bad token, join over its budget
    health_call: float = 1.0  # probes ask every few seconds; nobody needs more
    decode_unit: int = 256  # a block decoded from scratch costs 1 + size / decode_unit
    call_credit: float = 8.0  # earned back per call dispatched
    message_credit: float = 2.0  # ... and per message sent

    def header_block(self, size: int) -> float:
        return 1.0 + size / self.decode_unit


COSTS = ControlCosts()


class Budget:
    """A leaky bucket: spending fails once more than ``burst`` is held, drained at ``rate``/s.

    The clock is the caller's (``now``, in seconds), so the bucket can be tested without
    waiting; ``now`` defaults to ``time.monotonic()`` at creation only.
    """

    __slots__ = ("burst", "last", "level", "rate")

    def __init__(self, rate: float, burst: float, now: float | None = None) -> None:
        self.rate, self.burst = rate, burst
        self.level = 0.0
        self.last = time.monotonic() if now is None else now

    def spend(self, now: float, cost: float = 1.0) -> bool:
        level = self.level - (now - self.last) * self.rate
        self.level = (level if level > 0.0 else 0.0) + cost
        self.last = now
        return self.level <= self.burst

    def earn(self, credit: float) -> None:
        level = self.level
        self.level = level - credit if level > credit else 0.0

    def drained(self, now: float) -> bool:
        """Empty by now: forgetting the bucket loses nothing."""
        return now - self.last > self.burst / self.rate
