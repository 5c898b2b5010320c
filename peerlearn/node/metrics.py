"""Prometheus metrics: what ``status`` reports, scraped at ``http://<metrics_listen>/metrics``.

The values are read from the daemon's status on the event loop when Prometheus scrapes (a
collector of our own in a registry of the daemon's own, never the process-wide one), and
served by a small trio HTTP responder: no thread reads the daemon's state while it changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from peerlearn.errors import ConfigError
from peerlearn.node.config import parse_host_port

logger = logging.getLogger(__name__)

MAX_REQUEST = 8192  # bytes of an HTTP request head we read
REQUEST_TIMEOUT = 5.0  # seconds a scraper has to send its request
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        yield GaugeMetricFamily(name, doc, value=float(value))


def _counter(name: str, doc: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        yield CounterMetricFamily(name, doc, value=float(value))


class StatusCollector(Collector):
    """Turns one ``status`` dict into metric families."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        s = self.status()
        boundary = s["boundary"]
        yield from _gauge(
            "peerlearn_uptime_seconds", "Seconds since the node started.", s["uptime_s"]
        )
        yield from _gauge("peerlearn_connected_peers", "Peers connected now.", s["connected_peers"])
        yield from _gauge("peerlearn_open_streams", "Streams open now.", s["open_streams"])
        yield from _gauge(
            "peerlearn_loop_lag_max_seconds",
            "Worst event-loop lag seen.",
            s["loop_lag_max_ms"] / 1000,
        )
        yield from _gauge(
            "peerlearn_loop_lag_recent_seconds",
            "Worst event-loop lag in the last 10 s.",
            s["loop_lag_recent_ms"] / 1000,
        )
        yield from _counter("peerlearn_sent_bytes", "Bytes of models sent.", s["bytes_out"])
        yield from _counter("peerlearn_received_bytes", "Bytes of models received.", s["bytes_in"])
        rejected = CounterMetricFamily(
            "peerlearn_rejected_inputs", "Inputs from peers rejected, by reason.", labels=["reason"]
        )
        for reason, count in sorted(boundary.get("rejected", {}).items()):
            rejected.add_metric([reason], float(count))
        yield rejected
        yield from _gauge(
            "peerlearn_banned_peers", "Peers banned now.", len(boundary["banned_now"])
        )
        yield from _gauge(
            "peerlearn_blob_memory_held_bytes",
            "Memory reserved for blobs being received.",
            boundary["blob_memory_held"],
        )
        yield from _counter(
            "peerlearn_library_faults",
            "Failures inside the networking library.",
            boundary["library_faults"],
        )
        swarm = s.get("swarm_state") or {}
        yield from _gauge(
            "peerlearn_swarm_members", "Members in the swarm state.", swarm.get("members")
        )
        learning = s.get("learning")
        if learning:
            yield from _gauge("peerlearn_round", "The learner's current round.", learning["round"])
            yield from _counter(
                "peerlearn_models_sent", "Models the learner sent.", learning["models_sent"]
            )
            yield from _counter(
                "peerlearn_models_received",
                "Models the learner received.",
                learning["models_received"],
            )
            yield from _counter(
                "peerlearn_models_clipped",
                "Received models scaled back to the update bound.",
                learning.get("updates_clipped"),
            )
            contribution = learning.get("contribution") or {}
            yield from _counter(
                "peerlearn_models_excluded",
                "Received models left out for their sender's contribution score.",
                contribution.get("models_excluded"),
            )
            scores = GaugeMetricFamily(
                "peerlearn_contribution_score",
                "Each peer's contribution score (how its models do on our data; 0: as ours).",
                labels=["peer"],
            )
            for peer, value in sorted((contribution.get("scores") or {}).items()):
                scores.add_metric([peer], float(value))
            yield scores
            task_metrics = GaugeMetricFamily(
                "peerlearn_task_metric",
                "The task's metrics after the last round.",
                labels=["task", "name"],
            )
            for name, value in sorted((learning.get("metrics") or {}).items()):
                task_metrics.add_metric([str(learning["task"]), name], float(value))
            yield task_metrics


async def _respond(stream: trio.SocketStream, registry: CollectorRegistry) -> None:
    head = b""
    with trio.move_on_after(REQUEST_TIMEOUT):
        while b"\r\n\r\n" not in head and len(head) < MAX_REQUEST:
            data = await stream.receive_some(MAX_REQUEST)
            if not data:
                break
            head += data
    request_line = head.split(b"\r\n", 1)[0].split()
    if (
        len(request_line) >= 2
        and request_line[0] == b"GET"
        and request_line[1]
        in (
            b"/metrics",
            b"/",
        )
    ):
        status, content_type, body = b"200 OK", CONTENT_TYPE.encode(), generate_latest(registry)
    else:
        status, content_type, body = b"404 Not Found", b"text/plain", b"try GET /metrics\n"
    response = (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: " + content_type
        + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
        + body
    )  # fmt: skip
    try:
        await stream.send_all(response)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()


async def serve_metrics(
    listen: str,
    status: Callable[[], dict[str, Any]],
    *,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``/metrics`` on ``listen`` (host:port); ``task_status.started`` gets the URL."""
    host, port = parse_host_port(listen, "metrics_listen", "127.0.0.1:9464")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(status))
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {listen}: {exc.strerror}") from None
    bound_host, bound_port = listeners[0].socket.getsockname()[:2]
    url = f"http://{bound_host}:{bound_port}/metrics"
    logger.info("metrics at %s", url)

    async def handler(stream: trio.SocketStream) -> None:
        try:
            await _respond(stream, registry)
        except Exception:
            logger.exception("serving metrics failed")

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(url)
