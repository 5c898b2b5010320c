"""What a daemon takes from its surroundings: its host, its wall clock, its worker threads.

The daemon's timers all read trio's clock (``trio.current_time``), so a test that runs trio
with ``MockClock`` runs the daemon in virtual time. Three more things are injected here:

* ``open_host``: the libp2p host on real sockets by default; tests pass an in-process one;
* ``wall_clock``: the time signed into messages and records and checked on arrival;
* ``offload``: where CPU-heavy or blocking work runs (``peerlearn.node.offload``);
* ``bulk_path``: the sealed bulk path for large models on real sockets, or None (in-process hosts).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from peerlearn.errors import ConfigError
from peerlearn.identity import Identity
from peerlearn.node.bulk_path import BulkPath
from peerlearn.node.config import NodeConfig, parse_listen_address
from peerlearn.node.host import RelaySettings, all_loopback, open_host
from peerlearn.node.host_api import Host, PeerGate
from peerlearn.node.offload import Offload, in_thread

OpenHost = Callable[[Identity, NodeConfig, PeerGate], AbstractAsyncContextManager[Host]]


def relay_settings(config: NodeConfig) -> RelaySettings | None:
    """Relay v2 + DCUtR unless the node only listens on loopback (nothing to traverse)."""
    if not config.relay_service and (all_loopback(config.listen) or not config.nat_traversal):
        return None
    return RelaySettings(
        service=config.relay_service,
        hole_punch=config.nat_traversal,
        circuit_seconds=config.relay_circuit_seconds,
        circuit_bytes=config.relay_circuit_bytes,
    )


def open_libp2p_host(
    identity: Identity, config: NodeConfig, gate: PeerGate
) -> AbstractAsyncContextManager[Host]:
    """The daemon's libp2p host, configured from its settings."""
    return open_host(
        identity,
        config.listen,
        max_connections=config.max_connections,
        swarm_services=bool(config.swarm),
        mdns=config.mdns and bool(config.swarm),
        relay=relay_settings(config),
        upnp=config.upnp,
        gate=gate,
    )


def open_bulk_path(config: NodeConfig) -> BulkPath | None:
    """The bulk path on the IP the node listens on (every interface if it listens on
    several), unless ``bulk_port`` is -1."""
    if config.bulk_port < 0:
        return None
    ips = {parse_listen_address(address)[0] for address in config.listen}
    ip = ips.pop() if len(ips) == 1 else "0.0.0.0"
    try:
        return BulkPath(ip, config.bulk_port)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on bulk_port {config.bulk_port} at {ip}: {exc.strerror} "
            "(choose another port, 0 for any, or -1 to turn the bulk path off)"
        ) from None


@dataclass(frozen=True)
class Runtime:
    """The daemon's surroundings; the defaults are a real node's."""

    open_host: OpenHost = open_libp2p_host
    wall_clock: Callable[[], float] = time.time
    offload: Offload = in_thread
    bulk_path: Callable[[NodeConfig], BulkPath | None] = open_bulk_path
