from __future__ import annotations

import stat
from pathlib import Path

import pytest
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.peer.id import ID

from peerlearn.errors import ConfigError, DataDirLockedError
from peerlearn.identity import (
    KEY_FILE_NAME,
    Identity,
    load_or_create_identity,
    public_key_from_peer_id,
)
from peerlearn.node.config import NodeConfig, load_config
from peerlearn.node.datadir import DataDir, atomic_write_bytes


def test_identity_is_created_private_and_reused(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path)
    assert stat.S_IMODE((tmp_path / KEY_FILE_NAME).stat().st_mode) == 0o600
    again = load_or_create_identity(tmp_path)
    assert again.peer_id == first.peer_id


def test_identity_readable_by_others_is_refused(tmp_path: Path) -> None:
    load_or_create_identity(tmp_path)
    (tmp_path / KEY_FILE_NAME).chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_identity(tmp_path)


def test_peer_id_matches_libp2p_derivation() -> None:
    identity = Identity.from_seed(bytes(range(32)))
    key = Ed25519PrivateKey.from_bytes(identity.private_bytes)
    assert ID.from_pubkey(key.get_public_key()).to_base58() == identity.peer_id
    assert public_key_from_peer_id(identity.peer_id) == identity.public_key


def test_data_dir_lock_is_exclusive(tmp_path: Path) -> None:
    data_dir = DataDir(tmp_path)
    data_dir.create()
    with (
        data_dir.lock(),
        pytest.raises(DataDirLockedError, match="already running"),
        DataDir(tmp_path).lock(),
    ):
        pass
    with data_dir.lock():  # released after the first holder exits
        pass


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "state.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]


def test_config_layers_defaults_file_env_flags(tmp_path: Path) -> None:
    config_file = tmp_path / "node.toml"
    config_file.write_text(
        '[node]\nshutdown_timeout = 3\nlisten = ["/ip4/127.0.0.1/tcp/4001"]\nlog_level = "debug"\n'
    )
    a, b = (f"/ip4/10.0.0.{i}/tcp/4001/p2p/{Identity.generate().peer_id}" for i in (1, 2))
    env = {"PEERLEARN_SHUTDOWN_TIMEOUT": "4", "PEERLEARN_BOOTSTRAP": f"{a}, {b}", "HOME": "/x"}
    config = load_config(
        config_file=config_file, env=env, flags={"shutdown_timeout": 5.0, "listen": ()}
    )
    assert config.shutdown_timeout == 5.0  # flag beats env beats file
    assert config.listen == ("/ip4/127.0.0.1/tcp/4001",)  # empty flag = not given
    assert config.bootstrap == (a, b)
    assert config.log_level == "debug"
    assert config.blob_timeout == NodeConfig().blob_timeout
    assert load_config(env={}).shutdown_timeout == 10.0


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("shutdwn_timeout = 3", "unknown setting"),
        ("shutdown_timeout = -1", "must be positive"),
        ('shutdown_timeout = "soon"', "invalid"),
        ("listen = 5", "list of strings"),
        ("log_level = 'loud'", "log_level"),
        ("not toml [", "cannot read"),
    ],
)
def test_config_errors_are_specific(tmp_path: Path, toml: str, message: str) -> None:
    config_file = tmp_path / "bad.toml"
    config_file.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(config_file=config_file, env={})


def test_a_typo_in_an_environment_variable_is_an_error() -> None:
    with pytest.raises(ConfigError, match="did you mean PEERLEARN_ROUND_INTERVAL"):
        load_config(env={"PEERLEARN_ROUND_INTERVALL": "1"})
    for other in ("PEERLEARN_TESTNET_DIR", "PEERLEARN_FUZZ"):  # not node settings, but ours
        assert load_config(env={other: "1"}) == NodeConfig()


def test_docs_configuration_md_is_generated_from_the_settings_and_current() -> None:
    """`peerlearn node config --reference > docs/configuration.md` after changing a setting."""
    from peerlearn.node.config import configuration_reference, setting_docs

    docs = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    assert docs.read_text() == configuration_reference(), "regenerate docs/configuration.md"
    described = setting_docs()
    assert [d.name for d in described] == list(NodeConfig.__dataclass_fields__)
    assert all(d.doc for d in described), [d.name for d in described if not d.doc]


def test_node_config_prints_toml_that_reads_back_to_the_same_settings(tmp_path: Path) -> None:
    from peerlearn.node.config import config_as_toml

    config = load_config(
        env={
            "PEERLEARN_ROUND_INTERVAL": "3.5",
            "PEERLEARN_BOOTSTRAP": f"/ip4/1.2.3.4/tcp/1/p2p/{Identity.generate().peer_id}",
        },
        flags={"data_dir": tmp_path / 'odd "dir"', "mdns": False},
    )
    path = tmp_path / "node.toml"
    path.write_text(config_as_toml(config))
    assert load_config(config_file=path, env={}) == config
