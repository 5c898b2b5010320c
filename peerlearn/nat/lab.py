"""A network lab made of Linux network namespaces: public hosts, NAT routers, private LANs.

Needs root and iproute2/iptables (tc with the kernel's netem for delays). Everything lives in
namespaces the lab creates, named ``<prefix>-...``, with addresses from 198.18.0.0/15
(RFC 2544 benchmarking):

    <prefix>-inet   bridge br0: the "internet", 198.18.0.0/24
    <prefix>-pN     public host N             eth0 198.18.0.(10+N)
    <prefix>-rK     NAT router K              eth0 198.18.0.(100+K), lan bridge 198.19.K.1/24
    <prefix>-rKhJ   host J behind router K    eth0 198.19.K.(10+J), default route via router K

Routers masquerade their LAN behind their WAN address. ``cone`` keeps source ports
(endpoint-independent mapping, as Linux MASQUERADE does by default) and silently drops
unsolicited inbound packets, like a home router; ``symmetric`` adds ``--random-fully`` so
every new flow gets a random port and TCP hole punching cannot predict it. ``close()``
deletes every namespace (and with them every veth, bridge and rule) and is idempotent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

from peerlearn.errors import ConfigError, PeerlearnError

NatMode = Literal["cone", "symmetric"]
NAT_MODES: tuple[NatMode, ...] = ("cone", "symmetric")
PUBLIC_NET = "198.18.0"
COMMAND_TIMEOUT = 15.0  # seconds per ip/iptables/tc call


class LabError(PeerlearnError):
    """A lab command failed (message carries the command and its stderr)."""


def lab_unavailable_reason() -> str | None:
    """Why the lab cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces and iptables)"
    missing = [tool for tool in ("ip", "iptables", "tc") if shutil.which(tool) is None]
    if missing:
        return f"the NAT lab needs {', '.join(missing)} on PATH"
    return None


def netem_unavailable_reason() -> str | None:
    """Why ``netem`` (delays) cannot be used here, or None; probes a scratch namespace."""
    reason = lab_unavailable_reason()
    if reason:
        return reason
    probe = f"plnetem{os.getpid() % 100000}"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root",
             "netem", "delay", "1ms")  # fmt: skip
    except LabError as exc:
        return str(exc)
    finally:
        remove_namespaces([probe])
    return None


def _run(*cmd: str) -> str:
    try:
        done = subprocess.run(
            cmd, check=True, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
        )
    except subprocess.CalledProcessError as exc:
        reason = exc.stderr.strip() or str(exc)
        if "qdisc kind is unknown" in reason:
            reason += " (this kernel has no netem: sch_netem is missing)"
        raise LabError(f"{' '.join(cmd)}: {reason}") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LabError(f"{' '.join(cmd)}: {exc}") from exc
    return done.stdout


@dataclass(frozen=True)
class LabHost:
    """One namespace with one address; run programs in it with ``command``."""

    name: str
    namespace: str
    ip: str
    router: str | None = None  # namespace of its NAT router, None when public

    def command(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *argv]

    @property
    def public(self) -> bool:
        return self.router is None


@dataclass
class _Router:
    index: int
    namespace: str
    wan_ip: str
    mode: NatMode
    hosts: int = 0


@dataclass
class NatLab:
    """Build with ``add_public`` / ``add_router`` / ``add_private``; always ``close()``."""

    prefix: str = field(default_factory=lambda: f"pl{os.getpid() % 100000}")
    namespaces: list[str] = field(default_factory=list)
    hosts: list[LabHost] = field(default_factory=list)
    _routers: list[_Router] = field(default_factory=list)
    _links: int = 0

    def __post_init__(self) -> None:
        reason = lab_unavailable_reason()
        if reason:
            raise ConfigError(reason)
        stale = [ns for ns in list_namespaces() if ns.startswith(f"{self.prefix}-")]
        if stale:
            raise ConfigError(
                f"namespaces {', '.join(stale)} already exist; remove them with "
                f"`peerlearn testnet down --clean-lab` or `ip netns del NAME`"
            )
        self._inet = self._namespace("inet")
        _run("ip", "-n", self._inet, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self._inet, "link", "set", "br0", "up")

    # -- building -----------------------------------------------------------------------------

    def _namespace(self, suffix: str) -> str:
        name = f"{self.prefix}-{suffix}"
        _run("ip", "netns", "add", name)
        self.namespaces.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def _cable(self, ns: str, dev: str, hub_ns: str, bridge: str) -> None:
        """A veth from ``ns`` (named ``dev``) to ``bridge`` in ``hub_ns``."""
        self._links += 1
        peer = f"lk{self._links}"
        _run(
            "ip",
            "link",
            "add",
            dev,
            "netns",
            ns,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            hub_ns,
        )
        _run("ip", "-n", hub_ns, "link", "set", peer, "master", bridge)
        _run("ip", "-n", hub_ns, "link", "set", peer, "up")
        _run("ip", "-n", ns, "link", "set", dev, "up")

    def add_public(self, name: str) -> LabHost:
        """A host with a public address on the internet bridge."""
        index = sum(1 for h in self.hosts if h.public)
        ns = self._namespace(f"p{index}")
        ip = f"{PUBLIC_NET}.{10 + index}"
        self._cable(ns, "eth0", self._inet, "br0")
        _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        host = LabHost(name, ns, ip)
        self.hosts.append(host)
        return host

    def add_router(self, mode: NatMode = "cone") -> int:
        """A NAT router with its own private LAN; returns its index for ``add_private``."""
        if mode not in NAT_MODES:
            raise ConfigError(f"unknown NAT mode {mode!r}; known: {', '.join(NAT_MODES)}")
        index = len(self._routers)
        ns = self._namespace(f"r{index}")
        wan = f"{PUBLIC_NET}.{100 + index}"
        self._cable(ns, "eth0", self._inet, "br0")
        _run("ip", "-n", ns, "addr", "add", f"{wan}/24", "dev", "eth0")
        _run("ip", "-n", ns, "link", "add", "lan", "type", "bridge")
        _run("ip", "-n", ns, "addr", "add", f"198.19.{index}.1/24", "dev", "lan")
        _run("ip", "-n", ns, "link", "set", "lan", "up")
        _run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        iptables = ["ip", "netns", "exec", ns, "iptables", "-w"]
        masquerade = ["-t", "nat", "-A", "POSTROUTING", "-s", f"198.19.{index}.0/24"]
        masquerade += ["-o", "eth0", "-j", "MASQUERADE"]
        if mode == "symmetric":
            masquerade.append("--random-fully")
        _run(*iptables, *masquerade)
        _run(*iptables, "-P", "FORWARD", "DROP")
        _run(*iptables, "-A", "FORWARD", "-i", "lan", "-o", "eth0", "-j", "ACCEPT")
        # Hosts on one LAN reach each other, as at home (with br_netfilter on, bridged
        # frames pass this chain too and the DROP policy would cut them off).
        _run(*iptables, "-A", "FORWARD", "-i", "lan", "-o", "lan", "-j", "ACCEPT")
        _run(
            *iptables,
            "-A",
            "FORWARD",
            "-i",
            "eth0",
            "-o",
            "lan",
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED,RELATED",
            "-j",
            "ACCEPT",
        )
        # Unsolicited packets to the router itself are dropped, not answered with RST.
        _run(
            *iptables,
            "-A",
            "INPUT",
            "-i",
            "eth0",
            "-m",
            "conntrack",
            "--ctstate",
            "NEW,INVALID",
            "-j",
            "DROP",
        )
        self._routers.append(_Router(index, ns, wan, mode))
        return index

    def add_private(self, name: str, router: int) -> LabHost:
        """A host on router ``router``'s LAN, reaching the internet only through its NAT."""
        r = self._routers[router]
        ns = self._namespace(f"r{router}h{r.hosts}")
        ip = f"198.19.{router}.{10 + r.hosts}"
        r.hosts += 1
        self._cable(ns, "eth0", r.namespace, "lan")
        _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _run("ip", "-n", ns, "route", "add", "default", "via", f"198.19.{router}.1")
        host = LabHost(name, ns, ip, router=r.namespace)
        self.hosts.append(host)
        return host

    def router_wan(self, router: int) -> str:
        return self._routers[router].wan_ip

    # -- faults -------------------------------------------------------------------------------

    def netem(
        self, host: LabHost, *, delay_ms: float = 0, jitter_ms: float = 0, loss_pct: float = 0
    ) -> None:
        """Delay ``host``'s outgoing packets (tc netem) and drop ``loss_pct`` % of the packets
        it receives (iptables ``statistic``, so loss works on kernels without netem too)."""
        namespace = ["ip", "netns", "exec", host.namespace]
        if delay_ms or jitter_ms:
            delay = ["delay", f"{delay_ms}ms", f"{jitter_ms}ms"]
            _run(*namespace, "tc", "qdisc", "replace", "dev", "eth0", "root", "netem", *delay)
        if loss_pct:
            drop = ["-i", "eth0", "-m", "statistic", "--mode", "random"]
            drop += ["--probability", f"{loss_pct / 100:.6f}", "-j", "DROP"]
            _run(*namespace, "iptables", "-w", "-t", "raw", "-A", "PREROUTING", *drop)

    def clear_netem(self, host: LabHost) -> None:
        namespace = ["ip", "netns", "exec", host.namespace]
        subprocess.run(
            [*namespace, "tc", "qdisc", "del", "dev", "eth0", "root"],
            capture_output=True,
            timeout=COMMAND_TIMEOUT,
        )  # fails when there was no delay: nothing to remove
        _run(*namespace, "iptables", "-w", "-t", "raw", "-F", "PREROUTING")

    def partition(self, *groups: list[LabHost]) -> None:
        """Cut every host off from hosts in other groups: their TCP segments are answered
        with a reset (and resets are let through, so both ends learn at once), everything
        else is dropped."""
        for i, group in enumerate(groups):
            others = [h.ip for j, g in enumerate(groups) if j != i for h in g]
            for host in group:
                iptables = ["ip", "netns", "exec", host.namespace, "iptables", "-w"]
                for ip in others:
                    tcp = ["-A", "INPUT", "-s", ip, "-p", "tcp"]
                    _run(*iptables, *tcp, "--tcp-flags", "RST", "RST", "-j", "ACCEPT")
                    _run(*iptables, *tcp, "-j", "REJECT", "--reject-with", "tcp-reset")
                    _run(*iptables, "-A", "INPUT", "-s", ip, "-j", "DROP")

    def heal(self) -> None:
        """Remove every partition rule."""
        for host in self.hosts:
            _run("ip", "netns", "exec", host.namespace, "iptables", "-w", "-F", "INPUT")

    # -- teardown -----------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Delete every namespace this lab made; returns the ones that could not be deleted."""
        failed = remove_namespaces(reversed(self.namespaces))
        self.namespaces.clear()
        return failed

    def __enter__(self) -> NatLab:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def list_namespaces() -> list[str]:
    try:
        out = subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def remove_namespaces(names: Iterable[str]) -> list[str]:
    """``ip netns del`` each name; returns those that still exist afterwards."""
    wanted = list(names)
    for name in wanted:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=COMMAND_TIMEOUT)
    left = set(list_namespaces())
    return [n for n in wanted if n in left]
