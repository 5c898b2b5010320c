"""What experiments choose from, shared by the simulator, the daemon and the testnet: names of
the algorithms, filters, partitions and attacks, the compression of sent models, and how
shards are cut when some nodes attack (light: no torch import)."""

from __future__ import annotations

import enum
import math
from collections.abc import Collection
from dataclasses import dataclass

from peerlearn.errors import LocalProtocolError, RemoteProtocolError

ALGORITHMS = ("fedavg", "dpsgd", "gossip", "gossip-vca", "modest")
FILTERS = ("none", "median", "trimmed", "krum", "clip", "bristle")
PARTITIONS = ("iid", "label-skew", "dirichlet")
ATTACKS = ("none", "label-flip", "sign-flip", "gaussian", "alie", "ipm", "ratchet")
PER_RECEIVER_ATTACKS = ("ratchet",)  # a model made for each receiver (the simulator's)
SHARED_START = ("fedavg", "modest")  # algorithms whose nodes all start from one model


class Codec(enum.Enum):
    NONE = "none"
    INT8 = "int8"
    INT4 = "int4"
    TOPK = "topk"


@dataclass(frozen=True)
class Compression:
    """A swarm's choice: ``none``, ``int8``, ``int4`` or ``topk:F`` (keep a fraction F)."""

    codec: Codec = Codec.NONE
    fraction: float = 1.0  # top-k only

    @classmethod
    def parse(cls, text: str) -> Compression:
        """``LocalProtocolError`` (a one-line reason) if ``text`` names no codec."""
        name, _, argument = text.partition(":")
        try:
            codec = Codec(name)
        except ValueError:
            raise LocalProtocolError(
                f"compression must be none, int8, int4 or topk:F (0 < F < 0.5), not {text!r}"
            ) from None
        if codec is not Codec.TOPK:
            if argument:
                raise LocalProtocolError(f"compression {name} takes no ':' argument")
            return cls(codec)
        try:
            fraction = float(argument)
        except ValueError:
            fraction = math.nan
        if not 0.0 < fraction < 0.5:
            raise LocalProtocolError(
                f"compression topk:F needs 0 < F < 0.5 (at 0.5 it sends as many bytes as the "
                f"model), not {argument!r}"
            )
        return cls(codec, fraction)

    @classmethod
    def from_peer(cls, text: object) -> Compression:
        """The codec a peer says it used; ``RemoteProtocolError`` if it is not one."""
        if not isinstance(text, str) or len(text) > 32:
            raise RemoteProtocolError("compression: not a codec name")
        try:
            compression = cls.parse(text)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(f"compression: {exc}") from None
        if not compression.enabled:  # an uncompressed model names no codec
            raise RemoteProtocolError("compression: 'none' named for a model")
        return compression

    def __str__(self) -> str:
        return f"topk:{self.fraction:g}" if self.codec is Codec.TOPK else self.codec.value

    @property
    def enabled(self) -> bool:
        return self.codec is not Codec.NONE

    def unsuited_to(self, algo: str) -> str | None:
        """Why this codec cannot serve ``algo``, or None."""
        if self.codec is Codec.TOPK and algo not in SHARED_START:
            return (
                f"compression {self} sends changes against a model both sides hold, which only "
                "modest nodes share (and fedavg's in the simulator); gossip and dpsgd nodes "
                "start from models of their own"
            )
        return None

    def kept(self, size: int) -> int:
        """How many of ``size`` values top-k sends."""
        return min(size, max(1, math.ceil(self.fraction * size)))


def experiment_shards(
    nodes: int, byzantine: Collection[int], partition: str
) -> dict[int, tuple[int, int, str]]:
    """Each node's (shard, shards, partition) in an experiment with Byzantine nodes.

    With label-skew, as in Bristle's experiments, the honest nodes split the skewed shards
    among themselves and the Byzantine nodes hold an IID share of every class; otherwise node
    ``i`` of ``nodes`` takes shard ``i``. The simulator and the testnet both cut shards here.
    """
    if partition != "label-skew":
        return {i: (i, nodes, partition) for i in range(nodes)}
    honest = [i for i in range(nodes) if i not in byzantine]
    shards = {i: (k, len(honest), partition) for k, i in enumerate(honest)}
    attackers = sorted(byzantine)
    shards.update({i: (k, len(attackers), "iid") for k, i in enumerate(attackers)})
    return shards
