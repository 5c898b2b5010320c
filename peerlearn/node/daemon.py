"""The node daemon: host + control API + blob exchange, with readiness and graceful shutdown."""

from __future__ import annotations

import collections
import logging
import math
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from peerlearn import __version__, wire
from peerlearn.buffers import Body
from peerlearn.errors import (
    ConfigError,
    LocalProtocolError,
    NetworkError,
    Offence,
    PeerlearnError,
    RemoteProtocolError,
    unwrap_group,
)
from peerlearn.gossip.admission import Admission, AdmissionMode, invite_from_token
from peerlearn.gossip.crdt import SwarmState
from peerlearn.gossip.joins import JoinLimiter, JoinSettings
from peerlearn.identity import Identity, load_or_create_identity, peer_id_from_public_key
from peerlearn.learning.hygiene import check_finite
from peerlearn.learning.task import TaskFactory
from peerlearn.node import blob
from peerlearn.node.boundary import Boundary
from peerlearn.node.checkpoints import CheckpointStore
from peerlearn.node.config import NodeConfig, admission_rule
from peerlearn.node.control import serve_control
from peerlearn.node.datadir import DataDir, atomic_write_bytes, atomic_write_json
from peerlearn.node.framing import Pace
from peerlearn.node.host_api import Host, Stream
from peerlearn.node.learner import Learner
from peerlearn.node.learning_transport import MODEL_KIND, MODEST_KIND, MSG_PROTOCOL
from peerlearn.node.metrics import serve_metrics
from peerlearn.node.runtime import Runtime
from peerlearn.node.swarm import STATE_FILE, SwarmService
from peerlearn.node.traversal import NatTraversal
from peerlearn.tensors import (
    load_state_dict_file,
    state_dict_from_bytes,
    state_dict_to_bytes_and_digest,
)

logger = logging.getLogger(__name__)

MODEL_UPDATE_KIND = "model_update"
LEARNER_KINDS = (MODEL_KIND, MODEST_KIND)
PAYLOAD_KIND = "payload"
EMBEDDED_KINDS = (MODEL_KIND, PAYLOAD_KIND)  # what an embedded node hands to its application
UpdateSink = Callable[[blob.ReceivedBlob], Awaitable[None]]
DEFAULT_RUNTIME = Runtime()
RECENT_EVENTS = 100  # received updates remembered for `status`
PING_TIMEOUT = 2.0  # seconds, for `peers`
LAG_PROBE_INTERVAL = 0.1  # seconds
LAG_WARNING = 1.0  # seconds of event-loop lag that get logged
LAG_WINDOW = 100  # probes in "recent" lag (10 s)


class ShutdownTimeoutError(PeerlearnError):
    """Graceful shutdown did not finish within ``shutdown_timeout``."""


@dataclass
class Counters:
    updates_sent: int = 0
    updates_received: int = 0
    updates_rejected: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    loop_lag_max: float = 0.0  # seconds the event loop was late, worst seen
    loop_lags: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=LAG_WINDOW)
    )  # the latest probes
    recent: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=RECENT_EVENTS)
    )


class Daemon:
    """State and operations of one running node (used by the control API)."""

    def __init__(
        self,
        config: NodeConfig,
        data_dir: DataDir,
        host: Host,
        stop: trio.Event,
        boundary: Boundary,
        *,
        learn: bool = True,
        on_update: UpdateSink | None = None,
        task: TaskFactory | str | None = None,
        runtime: Runtime = DEFAULT_RUNTIME,
    ) -> None:
        """``learn``: run the built-in learner (needs a swarm), with ``task`` if given, else
        ``config.task``. ``on_update``: an embedding application's sink for the payloads
        peers push to us, and the models too when the learner does not run."""
        self.config = config
        self.data_dir = data_dir
        self.host = host
        self.identity: Identity = host.identity
        self.stop = stop
        self.boundary = boundary
        self.runtime = runtime
        self.phase = "starting"
        self.metrics_url: str | None = None
        self.started = trio.current_time()
        self.counters = Counters()
        self.sequence = wire.SequenceCounter(runtime.wall_clock())
        self.replay_guard = wire.ReplayGuard()
        self.pace = Pace(
            idle_timeout=config.stream_idle_timeout,
            min_rate=config.stream_min_rate,
            grace=config.stream_idle_timeout,
        )
        self.blob_budget = blob.BlobBudget(config.blob_memory, config.blob_memory_per_peer)
        self.bulk = runtime.bulk_path(config)
        self.received_bytes = _folder_bytes(data_dir.received_dir)
        self.swarm: SwarmService | None = None
        self.learner: Learner | None = None
        self._on_update = on_update
        admission = admission_rule(config)
        if config.swarm:
            joins = JoinSettings(config.member_join_burst, config.member_joins_per_second)
            state = SwarmState(
                config.swarm,
                admission=admission,
                max_owners=config.max_members,
                protect=self.identity.public_key,
                joins=JoinLimiter(joins),
            )
            self.swarm = SwarmService(
                host,
                state,
                self.sequence,
                max_peers=config.max_connections,
                invite=_own_invite(config, admission, self.identity),
                pace=self.pace,
                store=CheckpointStore(data_dir.root / STATE_FILE),
                wall_clock=runtime.wall_clock,
                offload=runtime.offload,
            )
            boundary.is_member = self.swarm.is_member
            boundary.introduce = self.swarm.sync_with
            boundary.members_only = frozenset({blob.PROTOCOL, MSG_PROTOCOL})
            if learn:
                self.learner = Learner(
                    config,
                    host,
                    self.swarm,
                    data_dir.root,
                    self._count_bytes,
                    self.sequence,
                    self.replay_guard,
                    runtime.wall_clock,
                    runtime.offload,
                    task,
                    self.bulk,
                )

        elif admission.mode is AdmissionMode.ALLOWLIST:
            allowed = {peer_id_from_public_key(pk) for pk in admission.allowlist}
            boundary.is_member = allowed.__contains__
            boundary.members_only = frozenset({blob.PROTOCOL})

        self.nat: NatTraversal | None = None
        if host.relaying:
            self.nat = NatTraversal(
                host,
                reserve=config.nat_traversal,
                hole_punch=config.nat_traversal,
                on_addrs_changed=self._addrs_changed,
            )
        host.set_handler(blob.PROTOCOL, self._serve_blob)

    def _addrs_changed(self) -> None:
        if self.swarm is not None:
            self.swarm.announce_addrs()
        if self.phase == "running":
            self.write_addrs()

    def write_addrs(self) -> None:
        """Readiness for supervisors: our peer id and addresses in the data dir."""
        addrs = {"peer_id": self.identity.peer_id, "addrs": self.host.addrs()}
        atomic_write_json(self.data_dir.addrs_file, addrs)

    def _count_bytes(self, sent: int, received: int) -> None:
        self.counters.bytes_out += sent
        self.counters.bytes_in += received

    # --- blobs ----------------------------------------------------------------------------

    async def _serve_blob(self, stream: Stream) -> None:
        try:
            with trio.fail_after(self.config.blob_timeout):
                await blob.receive_blob(
                    stream,
                    max_size=self.config.max_blob_size,
                    replay_guard=self.replay_guard,
                    admit=self._admit_blob,
                    accept=self._accept_blob,
                    pace=self.pace,
                    wall_clock=self.runtime.wall_clock,
                    bulk=self.bulk,
                )
        except trio.TooSlowError:
            self.counters.updates_rejected += 1
            logger.warning(
                "blob from %s took longer than %.0f s",
                stream.remote_peer_id,
                self.config.blob_timeout,
            )
        except PeerlearnError:
            self.counters.updates_rejected += 1
            raise
        finally:
            await stream.close()

    def _admit_blob(self, offer: blob.BlobOffer, sender: str) -> Any:
        """Decide on a signed offer before its body is read: the kind must be one this node
        takes, the size within that kind's limit and the budgets; returns the budget
        reservation held while the body is in memory."""
        kind, size, unsolicited = offer.kind, offer.size, False
        if kind in LEARNER_KINDS and self.learner is not None:
            limit = self.learner.max_model_bytes
            if size > limit:
                raise RemoteProtocolError(
                    f"a {kind} blob of {size} bytes; our model takes {limit}", Offence.OVERSIZED
                )
        elif kind in EMBEDDED_KINDS and self._on_update is not None:
            pass  # bounded by max_blob_size
        elif kind == MODEL_UPDATE_KIND:
            if self.received_bytes + size > self.config.received_quota:
                raise blob.BlobBusy(self._quota_full())
            unsolicited = True
        else:
            raise RemoteProtocolError(f"unexpected blob kind {kind[:40]!r}")
        return self.blob_budget.reserve(sender, size, unsolicited=unsolicited)

    def _quota_full(self) -> str:
        return (
            f"the received/ folder is full ({self.received_bytes} of "
            f"{self.config.received_quota} bytes)"
        )

    async def _accept_blob(self, received: blob.ReceivedBlob) -> None:
        if received.offer.kind in LEARNER_KINDS and self.learner is not None:
            await self.learner.accept_blob(received)
            return
        if received.offer.kind in EMBEDDED_KINDS and self._on_update is not None:
            await self._on_update(received)
            self.counters.updates_received += 1
            self.counters.bytes_in += received.offer.size
            return

        def decode_and_check() -> dict[str, Any]:
            state = state_dict_from_bytes(received.data, self.config.max_blob_size)
            check_finite(state)
            return state

        state = await self.runtime.offload(decode_and_check)  # off the loop: any size
        digest = received.offer.sha256.hex()
        name = f"{received.sender_id[-12:]}-{digest[:16]}.safetensors"
        path = self.data_dir.received_dir / name
        if self.received_bytes + len(received.data) > self.config.received_quota:
            raise blob.BlobBusy(self._quota_full())
        await self.runtime.offload(atomic_write_bytes, path, received.data)
        self.received_bytes = _folder_bytes(self.data_dir.received_dir)
        self.counters.updates_received += 1
        self.counters.bytes_in += received.offer.size
        event = {
            "from": received.sender_id,
            "sha256": digest,
            "bytes": received.offer.size,
            "tensors": len(state),
            "path": str(path),
            "at": self.runtime.wall_clock(),
        }
        self.counters.recent.append(event)
        logger.info(
            "verified model update from %s: %d tensors, %d bytes, sha256 %s",
            received.sender_id,
            len(state),
            received.offer.size,
            digest[:16],
        )

    async def share_model(self, path: Path) -> list[dict[str, Any]]:
        """Send the state_dict saved at ``path`` to every connected peer."""
        state = await self.runtime.offload(load_state_dict_file, path)
        data, sha256 = await self.runtime.offload(state_dict_to_bytes_and_digest, state)
        return await self.push_to_peers(
            data, MODEL_UPDATE_KIND, {"tensors": len(state)}, sha256=sha256
        )

    async def push_to_peers(
        self,
        data: Body,
        kind: str,
        meta: dict[str, Any],
        peers: list[str] | None = None,
        sha256: bytes | None = None,
    ) -> list[dict[str, Any]]:
        """Push a blob to ``peers`` (default: all connected); one result per peer, none
        dropped. ``sha256``: ``data``'s digest, if the caller has it already."""
        if peers is None:
            peers = [p.peer_id for p in self.host.connected_peers()]
        if not peers:
            raise LocalProtocolError("no connected peers to send to")
        results: list[dict[str, Any]] = []
        if sha256 is None:
            sha256 = await blob.digest_of(data)  # once for every peer

        async def push(peer_id: str) -> None:
            started = trio.current_time()
            error = await blob.deliver(
                self.host,
                self.sequence,
                peer_id,
                data,
                kind=kind,
                meta=meta,
                config=self.config,
                wall_clock=self.runtime.wall_clock,
                bulk=self.bulk,
                sha256=sha256,
            )
            if error is not None:
                logger.warning("%s to %s not delivered: %s", kind, peer_id, error)
                results.append({"peer_id": peer_id, "ok": False, "error": error})
                return
            self.counters.updates_sent += 1
            self.counters.bytes_out += len(data)
            seconds = trio.current_time() - started
            results.append({"peer_id": peer_id, "ok": True, "bytes": len(data), "seconds": seconds})

        async with trio.open_nursery() as nursery:
            for peer_id in peers:
                nursery.start_soon(push, peer_id)
        return sorted(results, key=lambda r: str(r["peer_id"]))

    # --- what an embedding application asks ---------------------------------------------

    def addrs(self) -> list[str]:
        return self.host.addrs()

    def connected_peer_ids(self) -> list[str]:
        return sorted(p.peer_id for p in self.host.connected_peers())

    async def connect(self, address: str) -> str:
        """Dial ``address``; returns the peer ID (``NetworkError`` or ``ConfigError``)."""
        return await self.host.connect(address)

    def members(self) -> list[str]:
        """Peer IDs of every swarm member known through the shared state."""
        return self.swarm.members() if self.swarm is not None else []

    def announce_round(self, round_: int) -> None:
        """Write our current round into the swarm state."""
        if self.swarm is None:
            raise LocalProtocolError("announcing a round needs a swarm (NodeConfig.swarm)")
        self.swarm.write("round", {"round": round_})

    def swarm_rounds(self) -> dict[str, int]:
        """Every member's announced round, by peer ID."""
        if self.swarm is None:
            return {}
        return {
            peer_id_from_public_key(owner): value["round"]
            for owner, value in self.swarm.state.records("round").items()
            if isinstance(value, dict) and isinstance(value.get("round"), int)
        }

    def swarm_metrics(self) -> dict[str, float]:
        """Every learning member's last announced metric, by peer ID."""
        if self.swarm is None:
            return {}
        return {
            peer_id_from_public_key(owner): float(value["accuracy"])
            for owner, value in self.swarm.state.records("metrics").items()
            if isinstance(value, dict) and isinstance(value.get("accuracy"), int | float)
        }

    # --- bootstrap ------------------------------------------------------------------------

    async def bootstrap(self) -> None:
        """Connect to the configured bootstrap peers, retrying until ``bootstrap_timeout``.

        Succeeds once at least one is connected; otherwise raises ``NetworkError``
        naming every address and its last error.
        """
        if not self.config.bootstrap:
            return
        self.phase = "bootstrapping"
        errors: dict[str, str] = {}
        connected: list[str] = []
        deadline = trio.current_time() + self.config.bootstrap_timeout

        async def attempt(address: str) -> None:
            delay = 0.2
            while True:
                try:
                    await self.host.connect(address)
                except NetworkError as exc:
                    errors[address] = str(exc)
                    if trio.current_time() + delay > deadline:
                        return
                    await trio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                else:
                    connected.append(address)
                    return

        with trio.move_on_at(deadline):
            async with trio.open_nursery() as nursery:
                for address in self.config.bootstrap:
                    nursery.start_soon(attempt, address)
        if not connected:
            details = "; ".join(f"{a}: {errors.get(a, 'timed out')}" for a in self.config.bootstrap)
            raise NetworkError(
                f"none of the {len(self.config.bootstrap)} bootstrap peers was reachable within "
                f"{self.config.bootstrap_timeout:.0f} s: {details}"
            )
        for address in self.config.bootstrap:
            if address not in connected:
                logger.warning("bootstrap peer %s unreachable: %s", address, errors.get(address))
        logger.info("bootstrapped via %d of %d peers", len(connected), len(self.config.bootstrap))

    # --- control API ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        c = self.counters
        connected = self.connected_peer_ids()
        return {
            "version": __version__,
            "peer_id": self.identity.peer_id,
            "phase": self.phase,
            "addrs": self.host.addrs(),
            "data_dir": str(self.data_dir.root),
            "uptime_s": round(trio.current_time() - self.started, 3),
            "metrics_url": self.metrics_url,
            "connected_peers": len(connected),
            "connected_peer_ids": connected,
            "paths": self.host.paths(),
            "open_streams": self.host.open_streams(),
            "loop_lag_max_ms": round(c.loop_lag_max * 1000, 1),
            "loop_lag_recent_ms": round(max(c.loop_lags, default=0.0) * 1000, 1),
            "updates_sent": c.updates_sent,
            "updates_received": c.updates_received,
            "updates_rejected": c.updates_rejected,
            "bytes_out": c.bytes_out,
            "bytes_in": c.bytes_in,
            "recent_updates": list(c.recent),
            "boundary": {
                **self.boundary.status(),
                "blob_memory_held": self.blob_budget.held,
                "blob_memory_held_unsolicited": self.blob_budget.unsolicited_held,
                "blobs_refused_busy": self.blob_budget.refused,
                "received_bytes": self.received_bytes,
                "library_faults": self.host.library_faults,
                "dht_records_rejected": self.host.dht_records_rejected,
            },
            "swarm": self.config.swarm or None,
            "swarm_state": self.swarm.status() if self.swarm is not None else None,
            "learning": self.learner.status() if self.learner is not None else None,
            "nat": self.nat.status() if self.nat is not None else None,
            "bulk": self.bulk.status() if self.bulk is not None else None,
        }

    async def peers(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []

        async def probe(peer_id: str, addrs: list[str]) -> None:
            rtt: float | None = None
            with trio.move_on_after(PING_TIMEOUT):
                try:
                    rtt = await self.host.ping(peer_id)
                except NetworkError as exc:
                    logger.debug("ping %s: %s", peer_id, exc)
            rows.append({"peer_id": peer_id, "addrs": addrs, "rtt_ms": rtt})

        async with trio.open_nursery() as nursery:
            for peer in self.host.connected_peers():
                nursery.start_soon(probe, peer.peer_id, peer.addrs)
        return sorted(rows, key=lambda r: str(r["peer_id"]))

    def control_handlers(self) -> dict[str, Any]:
        async def status(args: dict[str, Any]) -> dict[str, Any]:
            return self.status()

        async def peers(args: dict[str, Any]) -> list[dict[str, Any]]:
            return await self.peers()

        async def stop(args: dict[str, Any]) -> dict[str, Any]:
            logger.info("stop requested through the control API")
            self.stop.set()
            return {"stopping": True}

        async def connect(args: dict[str, Any]) -> dict[str, Any]:
            return {"peer_id": await self.connect(str(args.get("address", "")))}

        async def share(args: dict[str, Any]) -> list[dict[str, Any]]:
            return await self.share_model(Path(str(args.get("path", ""))))

        async def crdt_versions(args: dict[str, Any]) -> list[list[Any]]:
            return self.swarm.versions() if self.swarm is not None else []

        return {
            "status": status,
            "peers": peers,
            "stop": stop,
            "connect": connect,
            "share": share,
            "crdt_versions": crdt_versions,
        }


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _own_invite(config: NodeConfig, admission: Admission, identity: Identity) -> bytes | None:
    """Token admission: our invite (checked to be ours), for our member record."""
    if admission.mode is not AdmissionMode.TOKEN:
        return None
    invite = invite_from_token(config.invite)
    if invite.member != identity.public_key:
        raise ConfigError(
            f"the invite was issued for {peer_id_from_public_key(invite.member)}, but this "
            f"node is {identity.peer_id}; ask for an invite for {identity.peer_id}"
        )
    return invite.to_wire()


async def _watch_signals(stop: trio.Event, force: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if stop.is_set():
                logger.warning("second %s: stopping now", signal.Signals(signum).name)
                force.cancel()
                return
            logger.info("%s received: shutting down", signal.Signals(signum).name)
            stop.set()


async def _watch_loop_lag(counters: Counters) -> None:
    """Measures how late the event loop wakes up; a stalled loop means missed deadlines."""
    while True:
        before = trio.current_time()
        await trio.sleep(LAG_PROBE_INTERVAL)
        lag = trio.current_time() - before - LAG_PROBE_INTERVAL
        counters.loop_lag_max = max(counters.loop_lag_max, lag)
        counters.loop_lags.append(lag)
        if lag > LAG_WARNING:
            logger.warning("event loop was blocked for %.2f s", lag)


async def run_daemon(
    config: NodeConfig,
    *,
    handle_signals: bool = True,
    learn: bool = True,
    on_update: UpdateSink | None = None,
    task: TaskFactory | str | None = None,
    runtime: Runtime = DEFAULT_RUNTIME,
    task_status: Any = trio.TASK_STATUS_IGNORED,  # trio.TaskStatus; trio-stubs hide it
) -> None:
    """Run a node until SIGINT/SIGTERM or a `stop` request, then shut down within the deadline.

    With ``learn=False`` the swarm services run but the built-in learner does not; embedded
    use passes ``on_update`` to receive what peers push, and ``task`` (a factory it holds)
    when the built-in learner should train it. ``runtime`` supplies the host, the wall
    clock and where blocking work runs (tests run whole swarms in virtual time with it).

    ``task_status.started`` receives the ``Daemon`` once it is listening and bootstrapped.
    Raises ``ShutdownTimeoutError`` if the graceful shutdown overran ``shutdown_timeout``.
    """
    data_dir = DataDir(config.data_dir)
    data_dir.create()
    with data_dir.lock():
        identity = load_or_create_identity(data_dir.root)
        stop = trio.Event()
        shutdown = trio.CancelScope()
        boundary = Boundary(trio.current_time)
        try:
            with shutdown:
                async with (
                    runtime.open_host(identity, config, boundary) as host,
                    trio.open_nursery() as nursery,
                ):
                    daemon = Daemon(
                        config,
                        data_dir,
                        host,
                        stop,
                        boundary,
                        learn=learn,
                        on_update=on_update,
                        task=task,
                        runtime=runtime,
                    )
                    if daemon.bulk is not None:
                        await nursery.start(daemon.bulk.serve)
                    if handle_signals:
                        nursery.start_soon(_watch_signals, stop, shutdown)
                    nursery.start_soon(_watch_loop_lag, daemon.counters)
                    await nursery.start(
                        serve_control, data_dir.control_socket, daemon.control_handlers()
                    )
                    if config.metrics_listen:
                        daemon.metrics_url = await nursery.start(
                            serve_metrics, config.metrics_listen, daemon.status
                        )
                    await daemon.bootstrap()
                    if daemon.nat is not None:
                        await nursery.start(daemon.nat.run)
                    if daemon.swarm is not None:
                        await nursery.start(daemon.swarm.run)
                    if daemon.learner is not None:
                        await nursery.start(daemon.learner.run)

                    daemon.phase = "running"
                    daemon.write_addrs()
                    task_status.started(daemon)
                    await stop.wait()
                    daemon.phase = "stopping"
                    shutdown.deadline = trio.current_time() + config.shutdown_timeout
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            error = unwrap_group(group)
            if error is group:
                raise
            raise error from None
        finally:
            data_dir.addrs_file.unlink(missing_ok=True)
        if shutdown.cancelled_caught:
            overran = stop.is_set() and math.isfinite(shutdown.deadline)
            reason = f"within {config.shutdown_timeout:.0f} s" if overran else "(forced)"
            raise ShutdownTimeoutError(f"graceful shutdown did not finish {reason}")
