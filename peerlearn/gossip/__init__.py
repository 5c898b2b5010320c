"""Signed CRDT state and gossip of model-update announcements (sans-I/O cores)."""
