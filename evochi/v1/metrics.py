"""Per-member metrics, the protocol extension ``Evaluation.metrics`` (field 3).

The rules live in :mod:`evochi.protocol`, which the server's gRPC-free core imports too;
this module keeps them importable beside the client.
"""

from __future__ import annotations

from evochi.protocol import MAX_METRIC_NAME, MAX_METRICS, metric_name_error

__all__ = ["MAX_METRICS", "MAX_METRIC_NAME", "metric_name_error"]
