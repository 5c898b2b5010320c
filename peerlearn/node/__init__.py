"""The node daemon: libp2p adapter, control API, blob transfer, configuration."""
