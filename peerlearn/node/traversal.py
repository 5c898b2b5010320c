"""NAT traversal in the daemon: reachability checks, relay reservations, hole punching.

* Reachability (AutoNAT-style, ``/peerlearn/autonat/1``): we ask directly connected peers to
  dial us back on our listen ports at the IP they see us from, with a fresh TCP connection
  (py-libp2p's AutoNAT v1 reuses the existing connection, so it always says "public").
  Requests over relayed connections are refused. ``peerlearn.nat.policy.Reachability``
  turns the answers into public / private / unknown.
* Relays: unless we are known to be public, we reserve a slot on every relay among our
  peers right after bootstrap and again every ``RESERVATION_REFRESH`` seconds, and advertise
  the resulting ``/p2p-circuit`` addresses in our swarm member record.
* Hole punching: every relayed connection is upgraded with DCUtR (at most 3 attempts, then
  every 5 min), started by the pair's smaller peer ID only (``PathTracker``); the result is
  read off the connections, and status shows each peer's path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import trio

from peerlearn import wire
from peerlearn.errors import NetworkError, RemoteProtocolError
from peerlearn.nat.policy import PUBLIC, UNKNOWN, PathTracker, Reachability
from peerlearn.node.framing import Pace, receive_frame, send_frame
from peerlearn.node.host_api import Host, Stream

logger = logging.getLogger(__name__)

AUTONAT_PROTOCOL = "/peerlearn/autonat/1"
DIAL_BACK_TIMEOUT = 5.0  # seconds for the server's fresh TCP connection to us
PROBE_TIMEOUT = 15.0  # seconds for one whole request
PROBE_INTERVAL = 60.0  # seconds between reachability checks once known
PROBE_INTERVAL_UNKNOWN = 3.0  # while we do not know yet
MAX_PROBE_SERVERS = 3
MAX_PORTS = 4
RESERVATION_REFRESH = 60.0  # seconds (libp2p reservations last an hour; we renew early)
PUNCH_CHECK_INTERVAL = 1.0  # seconds between looks at relayed connections
STARTUP_BUDGET = 10.0  # seconds run() may spend before reporting started
PROBE_PACE = Pace(idle_timeout=PROBE_TIMEOUT, grace=PROBE_TIMEOUT)  # a dial-back takes a while
_LIMITS = wire.Limits(max_message_size=1024, max_array_len=MAX_PORTS, max_map_len=4)


class NatTraversal:
    """One node's NAT traversal loop; ``on_addrs_changed`` re-announces our addresses."""

    def __init__(
        self,
        host: Host,
        *,
        reserve: bool,
        hole_punch: bool,
        on_addrs_changed: Callable[[], None],
    ) -> None:
        self.host = host
        self.reserve = reserve
        self.hole_punch = hole_punch
        self.on_addrs_changed = on_addrs_changed
        self.reachability = Reachability()
        self.paths = PathTracker(local_peer=host.peer_id)
        self.circuit_addrs: list[str] = []
        self.reservation_errors = 0
        host.set_handler(AUTONAT_PROTOCOL, self._serve_dial_back)

    def status(self) -> dict[str, Any]:
        return {
            "reachability": self.reachability.status,
            "reachability_servers": self.reachability.servers,
            "circuit_addrs": list(self.circuit_addrs),
            "reservation_errors": self.reservation_errors,
            "paths": dict(self.paths.paths),
            **self.paths.summary(),
        }

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Reserve relay slots first (bounded: readiness waits for it, so our advertised
        addresses include them), then check reachability and keep everything current."""
        with trio.move_on_after(STARTUP_BUDGET):
            await self._refresh_reservations()  # status unknown: reserve, so peers reach us
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._reachability_loop)
            nursery.start_soon(self._reservation_loop)
            if self.hole_punch:
                nursery.start_soon(self._punch_loop, nursery)
            task_status.started()

    # -- reachability -------------------------------------------------------------------------

    async def _reachability_loop(self) -> None:
        while True:
            await self._check_reachability()
            known = self.reachability.status != UNKNOWN
            await trio.sleep(PROBE_INTERVAL if known else PROBE_INTERVAL_UNKNOWN)

    async def _check_reachability(self) -> None:
        paths = self.host.paths()
        servers = sorted(p for p, path in paths.items() if path == "direct")[:MAX_PROBE_SERVERS]
        for server in servers:
            verdict = await self.probe(server)
            if verdict is not None:
                self.reachability.record(server, verdict)

    async def probe(self, server: str) -> bool | None:
        """Ask ``server`` to dial us back: True reached, False not, None no answer."""
        try:
            with trio.fail_after(PROBE_TIMEOUT):
                stream = await self.host.open_stream(server, AUTONAT_PROTOCOL)
                try:
                    ports = self.host.listen_ports()[:MAX_PORTS]
                    await send_frame(stream, wire.pack({"ports": ports}))
                    reply = wire.expect_map(await _read(stream), {"reached"}, "autonat reply")
                finally:
                    await stream.close()
        except (NetworkError, RemoteProtocolError, trio.TooSlowError) as exc:
            logger.debug("reachability probe via %s failed: %s", server, exc)
            return None
        reached = reply["reached"]
        return reached if isinstance(reached, bool) else None

    async def _serve_dial_back(self, stream: Stream) -> None:
        """Dial the peer back on the ports it names, at the IP its stream came from (never
        anyone else); a malformed request is raised for the host to count."""
        try:
            with trio.fail_after(PROBE_TIMEOUT):
                request = wire.expect_map(await _read(stream), {"ports"}, "autonat request")
                ports = wire.expect(request["ports"], list, "autonat request.ports")
                ports = [p for p in ports if isinstance(p, int) and 0 < p < 65536]
                ip = stream.remote_ip  # None over a relay: we only dial what we saw directly
                reached = None if ip is None else await _dial_back(ip, ports[:MAX_PORTS])
                await send_frame(stream, wire.pack({"reached": reached}))
        except (NetworkError, trio.TooSlowError) as exc:
            logger.debug("dial-back request from %s failed: %s", stream.remote_peer_id, exc)
        finally:
            await stream.close()

    # -- relay reservations -------------------------------------------------------------------

    async def _reservation_loop(self) -> None:
        while True:
            await trio.sleep(RESERVATION_REFRESH)
            await self._refresh_reservations()

    async def _refresh_reservations(self) -> None:
        if not self.reserve or self.reachability.status == PUBLIC:
            addrs: list[str] = []
        else:
            try:
                addrs = await self.host.reserve_relays()
            except NetworkError as exc:
                self.reservation_errors += 1
                logger.warning("relay reservation failed (retrying): %s", exc)
                return
        if addrs != self.circuit_addrs:
            logger.info("relay addresses: %s", ", ".join(addrs) or "none")
            self.circuit_addrs = addrs
            self.on_addrs_changed()

    # -- hole punching ------------------------------------------------------------------------

    async def _punch_loop(self, nursery: trio.Nursery) -> None:
        while True:
            for peer in self.paths.observe(self.host.paths(), trio.current_time()):
                nursery.start_soon(self._punch, peer)
            await trio.sleep(PUNCH_CHECK_INTERVAL)

    async def _punch(self, peer: str) -> None:
        direct = await self.host.hole_punch(peer)
        self.paths.punched(peer, direct, trio.current_time())
        if direct:
            logger.info("hole punch to %s: direct connection", peer)
        else:
            logger.info("hole punch to %s failed; staying on the relay", peer)


async def _read(stream: Stream) -> Any:
    return wire.unpack(await receive_frame(stream, _LIMITS.max_message_size, PROBE_PACE), _LIMITS)


async def _dial_back(ip: str, ports: list[int]) -> bool:
    """A fresh TCP connection to ``ip`` on any of ``ports`` (closed right away)."""
    for port in ports:
        with trio.move_on_after(DIAL_BACK_TIMEOUT):
            try:
                stream = await trio.open_tcp_stream(ip, port)
            except OSError:
                continue
            await stream.aclose()
            return True
    return False
