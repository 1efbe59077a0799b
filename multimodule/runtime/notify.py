"""Telling systemd about the daemon's life (``Type=notify`` services), in one small module.

Outside systemd (no ``$NOTIFY_SOCKET``) every call does nothing. Under systemd:
``READY=1`` once the transit and the Router are up, ``STATUS=`` one-line summaries,
``RELOADING=1`` ... ``READY=1`` around config reloads, ``STOPPING=1`` at the start of an
orderly exit, and ``WATCHDOG=1`` from the event loop itself at half of ``WatchdogSec=`` (so a
loop that a task blocks stops the pings and systemd restarts the service). The protocol is
sd_notify(3); the datagrams are sent by systemd-python's ``systemd.daemon.notify``.
"""

from __future__ import annotations

import os
import time


class Notifier:
    """sd_notify for this process.

    ``environ``: the environment to read ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and
    ``WATCHDOG_PID`` from (default ``os.environ``). :attr:`watchdog_interval_s` is half the
    watchdog timeout in seconds, or ``None`` when systemd set no watchdog for this process.
    """

    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        self.watchdog_interval_s: float | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        if self.enabled and usec.isdigit() and int(usec) > 0 and (
                not pid or pid == str(os.getpid())):
            self.watchdog_interval_s = int(usec) / 2e6
        self.sent: list[str] = []  # what was sent, newest last (for status and tests)

    def _send(self, *lines: str) -> bool:
        if not self.enabled:
            return False
        from systemd import daemon  # imported only under systemd

        text = "\n".join(lines)
        self.sent.append(text)
        del self.sent[:-20]
        return daemon.notify(text)

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (and a ``STATUS=``): start-up or a reload finished."""
        lines = ["READY=1"]
        if status:
            lines.append(f"STATUS={status}")
        return self._send(*lines)

    def status(self, text: str) -> bool:
        """``STATUS=text``: the one-line summary ``systemctl status`` shows."""
        return self._send(f"STATUS={text}")

    def reloading(self) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (systemd.service(5), ``Type=notify-reload``)."""
        return self._send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> bool:
        """``STOPPING=1``: an orderly exit has begun."""
        return self._send("STOPPING=1")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the event loop is alive."""
        return self._send("WATCHDOG=1")
