"""Prometheus metrics from a learning daemon, and the log formats."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from peerlearn.node.config import NodeConfig
from peerlearn.node.daemon import Daemon, run_daemon
from peerlearn.node.logs import configure_logging


async def _get(url: str) -> tuple[str, str]:
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.rpartition(":")
    response = b""
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(f"GET /{path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        while data := await stream.receive_some(65536):
            response += data
    head, _, body = response.decode().partition("\r\n\r\n")
    return head.split("\r\n")[0], body


@pytest.mark.integration
def test_a_learning_daemon_serves_its_metrics_to_prometheus(tmp_path: Path) -> None:
    config = NodeConfig(
        data_dir=tmp_path / "n",
        listen=("/ip4/127.0.0.1/tcp/0",),
        swarm="metrics",
        algo="gossip",
        round_interval=0.2,
        max_rounds=2,
        mdns=False,
        metrics_listen="127.0.0.1:0",
    )

    async def main() -> None:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                daemon: Daemon = await nursery.start(
                    lambda task_status: run_daemon(
                        config, handle_signals=False, task_status=task_status
                    )
                )
                assert daemon.metrics_url is not None
                while daemon.status()["learning"]["round"] < 2:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                line, body = await _get(daemon.metrics_url)
                missing, _ = await _get(daemon.metrics_url.replace("/metrics", "/nope"))
                daemon.stop.set()
        assert line == "HTTP/1.1 200 OK"
        assert missing == "HTTP/1.1 404 Not Found"
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }
        assert samples[("peerlearn_round", ())] == 2
        accuracy = samples[("peerlearn_task_metric", (("name", "accuracy"), ("task", "digits")))]
        assert accuracy > 0
        assert samples[("peerlearn_connected_peers", ())] == 0
        assert ("peerlearn_loop_lag_max_seconds", ()) in samples
        assert ("peerlearn_sent_bytes_total", ()) in samples

    trio.run(main)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


@pytest.mark.usefixtures("restore_logging")
def test_json_logs_are_one_object_per_line_with_a_utc_time(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("info", "json")
    logging.getLogger("peerlearn.test").info("round %d: accuracy %.2f", 3, 0.91)
    entry = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert entry["message"] == "round 3: accuracy 0.91"
    assert (entry["level"], entry["logger"]) == ("info", "peerlearn.test")
    assert entry["time"].endswith("Z")
    assert entry["time"][4] == "-"


@pytest.mark.usefixtures("restore_logging")
def test_text_logs_carry_the_date(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "text")
    logging.getLogger("peerlearn.test").warning("hello")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    date, clock = line.split()[:2]
    assert len(date) == 10, line
    assert date[4] == date[7] == "-", line
    assert clock.count(":") == 2, line
