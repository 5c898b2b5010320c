"""Torch maths and the Task API: merges (mean, VCA), robust rules, Bristle, attacks, data,
built-in tasks, and the simulator that drives ``peerlearn.gossip``'s protocol cores.

Nothing in this package imports trio or libp2p.
"""
