"""Names of the algorithms, filters, partitions and attacks (light: no torch import)."""

ALGORITHMS = ("fedavg", "dpsgd", "gossip", "gossip-vca", "modest")
FILTERS = ("none", "median", "trimmed", "krum", "clip", "bristle")
PARTITIONS = ("iid", "label-skew", "dirichlet")
ATTACKS = ("none", "label-flip", "sign-flip", "gaussian", "alie", "ipm")
