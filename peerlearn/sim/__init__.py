"""The simulator: one event-driven driver of the protocol cores with a Task, in virtual time,
with bytes measured from the encoded messages (no trio, no libp2p)."""
