"""Rules of the Evochi protocol shared by the client and the server, without gRPC.

The server's core state machine checks what it receives with these, and the client checks
what it sends with the same rules, so a bad value is reported where it was produced.
Importing this module imports no grpc (the `evochi.v1` package does). See
docs/protocol.md.

Per-member metrics are the protocol extension ``Evaluation.metrics`` (field 3): next to
each member's reward a worker may report auxiliary values, such as the number of
environment steps the member took.
"""

from __future__ import annotations

import re

__all__ = ["MAX_METRICS", "MAX_METRIC_NAME", "metric_name_error"]

# The server keeps one array per metric name for the epoch and one Prometheus series per
# name for the training: a bounded number of names keeps both bounded.
MAX_METRICS = 16
MAX_METRIC_NAME = 64
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:/-]*")


def metric_name_error(name: object) -> str | None:
    """Why ``name`` cannot name a metric, or None when it can."""
    if not isinstance(name, str):
        return f"metric names must be strings, got {type(name).__name__}"
    if not 0 < len(name) <= MAX_METRIC_NAME:
        return f"metric names must be 1 to {MAX_METRIC_NAME} characters, got {len(name)}"
    if _NAME.fullmatch(name) is None:
        return (
            f"metric name {name[:MAX_METRIC_NAME]!r} must start with a letter or '_' and "
            "hold only letters, digits and '_.:/-'"
        )
    return None
