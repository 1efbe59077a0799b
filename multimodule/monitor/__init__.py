"""The resource monitor. So far: metric sources (``sources``: cgroup v1/v2 and psutil)."""
