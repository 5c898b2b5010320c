"""Local multi-process testnets and the demo."""
