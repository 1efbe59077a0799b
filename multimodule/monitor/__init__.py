"""The resource monitor. So far: metric sources (``sources``: cgroup v1/v2 and psutil) and
levels (``levels``: thresholds, windows, alerts on change). Not yet wired into the daemon."""
