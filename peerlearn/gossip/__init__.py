"""Sans-I/O protocol cores with their wire codecs: the signed swarm-state CRDT and its sync,
admission and conduct, DHT records, gossip / D-PSGD rounds and MoDeST. No trio, no libp2p,
no torch: bytes and opaque models in, decisions out, ``now`` passed in."""
