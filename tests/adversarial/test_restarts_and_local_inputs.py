"""Restarts never lose progress silently; local inputs (checkpoint files, the control socket,
the received/ folder) are bounded and checked like remote ones."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from peerlearn import wire
from peerlearn.errors import LocalProtocolError
from peerlearn.node.checkpoints import MAGIC, CheckpointStore
from peerlearn.node.control import MAX_REQUEST, call, serve_control
from peerlearn.node.daemon import Daemon
from peerlearn.node.learner import CHECKPOINT_FILE
from peerlearn.tensors import load_state_dict_file, state_dict_to_bytes
from tests.adversarial.hostile import daemon, eventually, node_config, run

pytestmark = pytest.mark.integration


def learned(tmp_path: Path, rounds: int = 3) -> Path:
    """A data dir whose daemon learned ``rounds`` rounds and stopped (two checkpoints)."""
    config = node_config(tmp_path, "d", algo="gossip-vca", round_interval=0.1, max_rounds=rounds)

    async def main() -> None:
        async with daemon(config, learn=True) as node:
            await eventually(lambda: node.learner and node.learner.round >= rounds, 60)

    run(main)
    return config.data_dir


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = learned(tmp_path)
    flip_a_byte(data_dir / CHECKPOINT_FILE)  # a bit flip in a tensor: the checksum tells
    config = node_config(tmp_path, "d", algo="gossip-vca", round_interval=60)

    async def main() -> None:
        with caplog.at_level(logging.WARNING):
            async with daemon(config, learn=True) as node:
                assert node.learner is not None
                assert node.learner.resumed == 2  # the previous checkpoint's round
        assert "checksum mismatch" in caplog.text

    run(main)


def _start(data_dir: Path, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "peerlearn", "node", "start", "--data-dir", str(data_dir),
         "--listen", "/ip4/127.0.0.1/tcp/0", "--swarm", "adversarial", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def one_line_error(stderr: str) -> str:
    """The error a failed start ends with: one line, no traceback (log lines may precede)."""
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), stderr
    return last


def test_unusable_checkpoints_refuse_to_start_in_one_line_unless_fresh(tmp_path: Path) -> None:
    data_dir = learned(tmp_path)
    flip_a_byte(data_dir / CHECKPOINT_FILE)
    flip_a_byte(data_dir / f"{CHECKPOINT_FILE}.prev")
    refused = _start(data_dir)
    out, err = refused.communicate(timeout=60)
    assert refused.returncode == 2, (out, err)
    assert one_line_error(err).startswith("error: cannot resume")
    assert "--fresh" in err
    fresh = _start(data_dir, "--fresh", "--round-interval", "0.2")
    try:
        from peerlearn.node.control import call
        from tests.conftest import wait_until

        socket = data_dir / "control.sock"
        state = wait_until(lambda: call(socket, "status")["learning"]["round"] >= 1, 60)
        assert state
        assert call(socket, "status")["learning"]["resumed_from_round"] is None
    finally:
        fresh.terminate()
        fresh.communicate(timeout=30)
    assert len(list(data_dir.glob(f"{CHECKPOINT_FILE}*.discarded-*"))) == 2


def test_an_invalid_value_in_a_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    data_dir = learned(tmp_path, rounds=1)
    store = CheckpointStore(data_dir / CHECKPOINT_FILE)
    payload = wire.unpack(
        (data_dir / CHECKPOINT_FILE).read_bytes()[len(MAGIC) + 32 :],
        wire.Limits(max_message_size=2**26),
    )
    store.save(wire.pack({**payload, "round": "seven"}))  # a valid checksum, a bad value
    store.save(wire.pack({**payload, "round": "seven"}))
    refused = _start(data_dir)
    _, err = refused.communicate(timeout=60)
    assert refused.returncode == 2
    assert "round must be a non-negative integer" in one_line_error(err)


@asynccontextmanager
async def control_server(path: Path, **options: float) -> AsyncIterator[None]:
    """A control socket at ``path`` whose one operation, ``status``, answers {"ok": True}."""

    async def status(args: dict[str, object]) -> dict[str, object]:
        return {"ok": True}

    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_control(
                path, {"status": status}, task_status=task_status, **options
            )
        )
        yield
        nursery.cancel_scope.cancel()


def test_the_control_socket_bounds_slow_and_large_requests(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def main() -> None:
        async with control_server(path, request_timeout=0.5):
            async with await trio.open_unix_socket(str(path)) as silent:
                with trio.fail_after(3):
                    assert await silent.receive_some(1) == b""  # closed after the timeout
            async with await trio.open_unix_socket(str(path)) as huge:
                await huge.send_all((MAX_REQUEST + 1).to_bytes(4, "big"))
                with trio.fail_after(3):
                    assert await huge.receive_some(1) == b""  # refused before reading a body

    run(main)


def test_the_received_folder_has_a_quota(tmp_path: Path) -> None:
    model = {"w": torch.arange(100, dtype=torch.float32)}
    saved = len(state_dict_to_bytes(model))  # the receiver keeps the safetensors bytes
    config = node_config(tmp_path, "d", swarm="", received_quota=int(saved * 2.5))

    async def main() -> None:
        async with daemon(config) as node:
            boot = (node.host.addrs()[0],)
            async with daemon(node_config(tmp_path, "s", swarm="", bootstrap=boot)) as sender:
                results = await shares(sender)
            assert [r["ok"] for r in results] == [True, True, False]
            assert "received/ folder is full" in results[2]["error"]
            assert node.received_bytes <= config.received_quota

    async def shares(sender: Daemon) -> list[dict[str, object]]:
        results = []
        for _ in range(3):
            model["w"] += 1
            torch.save(model, tmp_path / "m.pt")
            results += await sender.share_model(tmp_path / "m.pt")
        return results

    run(main)


def test_checksums_cover_the_whole_payload(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "c")
    store.save(b"payload")
    raw = (tmp_path / "c").read_bytes()
    assert raw == MAGIC + hashlib.sha256(b"payload").digest() + b"payload"


def test_idle_control_connections_do_not_keep_status_out(tmp_path: Path) -> None:
    """200 idle connections to the control socket made `status` fail until they timed
    out (10 s); now the longest idle one is closed for each newcomer."""
    path = tmp_path / "control.sock"

    async def main() -> None:
        async with control_server(path):
            idle = [await trio.open_unix_socket(str(path)) for _ in range(200)]
            with trio.fail_after(2):  # not the 10 s request timeout
                assert await trio.to_thread.run_sync(lambda: call(path, "status")) == {"ok": True}
            for stream in idle:
                await stream.aclose()

    run(main)


@settings(max_examples=50)
@given(st.binary(max_size=2000))
def test_any_file_given_to_share_is_a_one_line_local_error(data: bytes) -> None:
    """`node share /etc/passwd` answered "internal error: IndexError"."""
    with tempfile.TemporaryDirectory() as folder:
        for name in ("model.pt", "model.safetensors"):
            path = Path(folder) / name
            path.write_bytes(data)
            with contextlib.suppress(LocalProtocolError):
                load_state_dict_file(path)


def test_sharing_a_text_file_says_what_is_wrong() -> None:
    with pytest.raises(LocalProtocolError, match="is not a torch state_dict file"):
        load_state_dict_file(Path("/etc/passwd"))
