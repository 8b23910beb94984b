"""Per-member metrics, the protocol extension ``Evaluation.metrics`` (field 3).

A worker may report, next to each member's reward, auxiliary values such as the number of
environment steps the member took. These rules are shared by the client (which checks
before sending) and the server (which checks what it receives), so a bad metric is
reported where it was produced. See docs/protocol.md.
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
