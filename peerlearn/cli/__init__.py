"""The ``peerlearn`` command line."""
