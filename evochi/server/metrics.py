"""Prometheus metrics, on a registry per server so embedded servers in one process never clash."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

__all__ = ["ServerMetrics"]

# Task durations range from milliseconds (benchmarks) to many minutes (real evaluations).
_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.workers = Gauge("evochi_workers", "Workers currently subscribed.", registry=r)
        self.epoch = Gauge("evochi_epoch", "The epoch currently running.", registry=r)
        self.epochs = Counter("evochi_epochs", "Epochs completed.", registry=r)
        self.epoch_seconds = Histogram(
            "evochi_epoch_duration_seconds", "Wall time of a completed epoch.", buckets=_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.task_seconds = Histogram(
            "evochi_task_duration_seconds",
            "Time from handing out a task to its successful completion.",
            ["kind"],
            buckets=_BUCKETS,
            registry=r,
        )
        # Bound once: labels() costs a lock and a dict lookup on every task otherwise.
        self.task_seconds_by_kind = {
            kind: self.task_seconds.labels(kind)
            for kind in ("initialize", "evaluate", "optimize", "share_state")
        }
        self.joins = Counter("evochi_worker_joins", "Workers that subscribed.", registry=r)
        self.leaves = Counter(
            "evochi_worker_leaves", "Workers removed, by reason.", ["reason"], registry=r
        )
        self.reassignments = Counter(
            "evochi_reassignments",
            "Work re-assigned after a worker was lost (kind: evaluate members returned to "
            "the stack counts 1 per lost task, initialize, share_state).",
            ["kind"],
            registry=r,
        )
        self.reissued_members = Counter(
            "evochi_reissued_members",
            "Members of straggling evaluate tasks copied to idle workers.",
            registry=r,
        )
        self.late_members = Counter(
            "evochi_late_members",
            "Members recorded from the late result of a worker removed while it evaluated "
            "them (nobody else had recorded them yet).",
            registry=r,
        )
        # One series per worker that ever drifted: a mixed fleet shows which machine
        # computes other bits (normally none, as the update is CPU-independent).
        self.state_repairs = Counter(
            "evochi_state_repairs",
            "Times a worker's state digest after an update differed from the shared state's, "
            "so its next task carried the training's state, by worker id.",
            ["worker"],
            registry=r,
        )
        self.rejected = Counter(
            "evochi_rejected_requests",
            "Requests answered with an error, by method and gRPC status code.",
            ["method", "code"],
            registry=r,
        )
        # Per-member metrics (protocol extension); at most evochi.v1.metrics.MAX_METRICS
        # names per training, so the label sets stay small. The sum is a gauge because
        # values may be negative (e.g. behaviour descriptors); for env steps it only grows.
        self.member_metric_sum = Gauge(
            "evochi_member_metric_sum",
            "Sum over all completed epochs of a per-member metric, over the members that "
            "reported it.",
            ["name"],
            registry=r,
        )
        self.member_metric_members = Counter(
            "evochi_member_metric_members",
            "Members that reported a per-member metric, over all completed epochs.",
            ["name"],
            registry=r,
        )
        self.reward_mean = Gauge(
            "evochi_reward_mean", "Mean reward of the last completed epoch.", registry=r
        )
        self._leave_reasons: set[str] = set()
        # The transport's serving status (evochi.server.health.Health), for /healthz.
        self.health: Any = None

    def leave(self, cause: str) -> None:
        # The cause, not the reason (which carries details): a small, fixed label set.
        key = (
            cause
            if cause in ("timeout", "left", "training finished", "server stopping")
            else "other"
        )
        self.leaves.labels(key).inc()

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` and ``/healthz`` over HTTP on ``port`` (in a daemon thread).

        ``/healthz``: 200 ``SERVING`` while the server serves its training, 503
        ``NOT_SERVING`` once it has finished or is stopping (see evochi.server.health).
        Returns the port (0 picks a free one)."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            if environ.get("PATH_INFO") == "/healthz":
                serving = self.health is None or self.health.serving
                body = b"SERVING\n" if serving else b"NOT_SERVING\n"
                status = "200 OK" if serving else "503 Service Unavailable"
                start_response(status, [("Content-Type", "text/plain"),
                                        ("Content-Length", str(len(body)))])  # fmt: skip
                return [body]
            return metrics_app(environ, start_response)

        server_class = _ThreadingWSGIServer6 if ":" in host else _ThreadingWSGIServer
        httpd = make_server(host, port, app, server_class=server_class,
                            handler_class=_QuietHandler)  # fmt: skip
        threading.Thread(target=httpd.serve_forever, daemon=True, name="evochi-metrics").start()
        return int(httpd.server_port)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _ThreadingWSGIServer6(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds
        pass
