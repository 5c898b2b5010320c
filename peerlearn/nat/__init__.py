"""NAT traversal: reachability, relay reservations and hole punching."""
