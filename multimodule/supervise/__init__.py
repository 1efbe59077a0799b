"""Supervision of external tasks: unit names and drop-ins (``units``). The runner backends
(systemd units, detached processes) build on these."""
