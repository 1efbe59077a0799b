"""The task runtime: the processes that host tasks, one job per module (see
``docs/architecture.md``): ``daemon`` composes the control daemon from ``registry``,
``configs``, ``externals``, ``migration``, ``failsafe``, ``monitoring`` and ``control_server``
over ``host``; ``task_process`` is the process of one external task; ``runner`` and
``schedule`` run one task."""
