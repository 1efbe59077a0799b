"""The resource monitor's pure parts: metric sources (``sources``: cgroup v1/v2 and psutil;
``deepsize``: the memory of internal tasks), levels (``levels``: thresholds, windows, alerts on
change) and per-task windows and rows (``monitor``). The daemon's side is
:mod:`multimodule.runtime.monitoring`."""
