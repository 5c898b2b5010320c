"""Sans-I/O learning cores: aggregation, MoDeST, Bristle, attacks, data and the simulator.

Nothing in this package imports trio or libp2p.
"""
