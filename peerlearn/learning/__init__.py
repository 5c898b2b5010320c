"""Torch maths and the Task API: merges (mean, VCA), robust rules, Bristle, attacks, data,
built-in tasks, a task's model as drivers use it.

Nothing in this package imports trio or libp2p.
"""
