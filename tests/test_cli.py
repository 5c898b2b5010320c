from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from peerlearn.cli.main import cli
from tests.conftest import wait_until

STOP_TIMEOUT = 15  # seconds: shutdown deadline (10 s) plus process exit


def test_status_without_daemon_is_a_clear_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["node", "status", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "no peerlearn daemon is running" in result.output


def test_stale_socket_is_reported(tmp_path: Path) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "control.sock"))  # bound but never listening, like a crash
    result = CliRunner().invoke(cli, ["node", "peers", "--data-dir", str(tmp_path), "--json"])
    assert result.exit_code == 1
    assert "stale socket" in result.output


def test_invalid_config_exits_with_usage_error(tmp_path: Path) -> None:
    config_file = tmp_path / "c.toml"
    config_file.write_text("listen = 5\n")
    result = CliRunner().invoke(
        cli, ["node", "start", "--config", str(config_file), "--data-dir", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "list of strings" in result.output


def test_invalid_bootstrap_address_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "node",
            "start",
            "--data-dir",
            str(tmp_path),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--bootstrap",
            "/ip4/127.0.0.1/tcp/1",
        ],
    )
    assert result.exit_code == 2
    assert "invalid peer address" in result.output


def _start(data_dir: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "peerlearn",
            "node",
            "start",
            "--data-dir",
            str(data_dir),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peerlearn", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--log-level", "loud"], {}, "'loud' is not one of 'debug', 'info'"),
        ([], {"PEERLEARN_LOG_LEVEL": "loud"}, "log_level must be"),
        (["--metrics-listen", "9464"], {}, "metrics_listen must look like 127.0.0.1:9464"),
        (["--bootstrap", "/ip4/1.2.3.4/tcp/1"], {}, "invalid peer address"),
        (["--listen", "/ip4/0.0.0.0/udp/1"], {}, "invalid listen address"),
        (["--swarm", "s", "--task", "digts"], {}, "did you mean digits"),
        ([], {"PEERLEARN_ROUND_INTERVALL": "1"}, "did you mean PEERLEARN_ROUND_INTERVAL"),
    ],
)
def test_start_mistakes_are_reported_before_torch_is_imported(
    tmp_path: Path, args: list[str], env: dict[str, str], message: str
) -> None:
    probe = (
        "import sys, runpy\n"
        "sys.argv = ['peerlearn', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('peerlearn', run_name='__main__')\n"
        "finally:\n    print('torch imported:', 'torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, "node", "start", "--data-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
    )
    assert result.returncode == 2, result
    assert message in result.stderr
    assert "torch imported: False" in result.stdout


@pytest.mark.integration
def test_real_daemon_status_stop_and_lock(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    daemon = _start(data_dir)
    try:
        addrs = wait_until(lambda: json.loads((data_dir / "addrs.json").read_text()), 60)
        status = json.loads(_cli("node", "status", "--json", "--data-dir", str(data_dir)).stdout)
        assert status["peer_id"] == addrs["peer_id"]
        assert status["phase"] == "running"
        assert status["addrs"][0].startswith("/ip4/127.0.0.1/tcp/")
        assert json.loads(_cli("node", "peers", "--json", "--data-dir", str(data_dir)).stdout) == []

        second = _start(data_dir)
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2
        assert "already running" in err

        assert _cli("node", "stop", "--data-dir", str(data_dir)).returncode == 0
        out, err = daemon.communicate(timeout=STOP_TIMEOUT)
    finally:
        daemon.kill()
    assert daemon.returncode == 0, err
    assert "ready: peer id " + addrs["peer_id"] in out
    assert "stopped" in out
    assert not (data_dir / "control.sock").exists()
    assert not (data_dir / "addrs.json").exists()
    # restart reuses the identity
    restarted = _start(data_dir)
    try:
        again = wait_until(lambda: json.loads((data_dir / "addrs.json").read_text()), 60)
        assert again["peer_id"] == addrs["peer_id"]
    finally:
        restarted.send_signal(signal.SIGINT)
        restarted.communicate(timeout=STOP_TIMEOUT)
    assert restarted.returncode == 0


@pytest.mark.integration
def test_sigterm_shuts_down_gracefully(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    daemon = _start(data_dir)
    try:
        wait_until(lambda: (data_dir / "addrs.json").exists(), 60)
        os.kill(daemon.pid, signal.SIGTERM)
        _, err = daemon.communicate(timeout=STOP_TIMEOUT)
    finally:
        daemon.kill()
    assert daemon.returncode == 0, err
    assert "SIGTERM received" in err
    assert "Traceback" not in err


def test_status_tells_shared_models_from_the_learners_models() -> None:
    from peerlearn.cli.main import _render_status

    status = {
        "peer_id": "12D3KooW",
        "phase": "running",
        "uptime_s": 5.0,
        "connected_peers": 3,
        "updates_sent": 0,
        "updates_received": 0,
        "updates_rejected": 0,
        "bytes_out": 10_000_000,
        "bytes_in": 9_000_000,
        "addrs": [],
        "swarm": "lab",
        "learning": {
            "task": "textlm",
            "metric": "accuracy",
            "algo": "modest",
            "filter": "none",
            "phase": "learning",
            "round": 7,
            "accuracy": 0.41,
            "members": 4,
            "join_seconds": 0.2,
            "models_sent": 12,
            "models_received": 11,
        },
    }
    text = _render_status(status)
    assert "shared models    0 sent, 0 received, 0 rejected (`node share`" in text
    assert "learner models   12 sent, 11 received" in text
    assert "textlm with modest/none learning, round 7, accuracy 0.410" in text


def test_node_config_prints_the_settings_in_effect(tmp_path: Path) -> None:
    import tomllib

    toml = tmp_path / "node.toml"
    toml.write_text("round_interval = 4.0\n")
    result = CliRunner().invoke(
        cli,
        ["node", "config", "--config", str(toml), "--data-dir", str(tmp_path)],
        env={"PEERLEARN_FANOUT": "7"},
    )
    assert result.exit_code == 0, result.output
    settings = tomllib.loads(result.output)["node"]
    assert (settings["round_interval"], settings["fanout"]) == (4.0, 7)
    assert settings["data_dir"] == str(tmp_path)
    typo = CliRunner().invoke(cli, ["node", "config"], env={"PEERLEARN_FANOUTT": "7"})
    assert typo.exit_code == 2
    assert "did you mean PEERLEARN_FANOUT" in typo.output
