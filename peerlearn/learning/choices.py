"""What experiments choose from, shared by the simulator, the daemon and the testnet: names of
the algorithms, filters, partitions and attacks, and how shards are cut when some nodes attack
(light: no torch import)."""

from collections.abc import Collection

ALGORITHMS = ("fedavg", "dpsgd", "gossip", "gossip-vca", "modest")
FILTERS = ("none", "median", "trimmed", "krum", "clip", "bristle")
PARTITIONS = ("iid", "label-skew", "dirichlet")
ATTACKS = ("none", "label-flip", "sign-flip", "gaussian", "alie", "ipm")


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
