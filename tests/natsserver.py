"""A throwaway ``nats-server`` with JetStream on loopback, and two daemons that talk through it.

``NatsServer(tmp_path)`` starts one on a free port of 127.0.0.1 with its store under
``tmp_path`` and waits until JetStream answers; ``stop()`` ends it. ``two_hosts`` gives daemon
workspaces ``a`` and ``b`` (each a :class:`~helpers.Harness` with its own transit directory,
state directory and ``$MULTIMODULE_HOSTNAME``) configured with a Bridge to one server. Tests that
need namespaces of their own (several hosts with their own System V queues and links) use
``tests/hosts.py``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers import Harness
from multimodule.transit import Transit

#: Seconds a server may take to answer.
READY_TIMEOUT_S = 20.0


def require_nats_server() -> str:
    """The ``nats-server`` binary; skips without it, except under CI (set-up installs it)."""
    path = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("nats-server is missing (scripts/setup installs it as root)")
        pytest.skip("nats-server is not installed (scripts/setup installs it as root)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def jetstream_ready(url: str, deadline: float, **options) -> None:
    """Wait until JetStream at ``url`` answers an account query (``deadline``: monotonic)."""
    import nats

    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            nc = await nats.connect(url, connect_timeout=1, allow_reconnect=False, **options)
            try:
                await nc.jetstream().account_info()
                return
            finally:
                await nc.close()
        except Exception as exc:  # noqa: BLE001 - not up yet
            last = exc
            await asyncio.sleep(0.05)
    raise AssertionError(f"JetStream at {url} did not answer: {last!r}")


class NatsServer:
    """One ``nats-server -js`` on 127.0.0.1; ``url``; ``max_payload`` in bytes (default the
    server's, 1 MiB)."""

    def __init__(self, root: Path, *, port: int | None = None, max_payload: int | None = None):
        self.binary = require_nats_server()
        self.root = root
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.max_payload = max_payload
        self.proc: subprocess.Popen | None = None

    def start(self) -> NatsServer:
        self.root.mkdir(parents=True, exist_ok=True)
        conf = self.root / "nats.conf"
        lines = [f"listen: 127.0.0.1:{self.port}",
                 f'jetstream {{ store_dir: "{self.root / "store"}", max_mem: 64M, max_file: 2G }}']
        if self.max_payload:
            lines.append(f"max_payload: {self.max_payload}")
        conf.write_text("\n".join(lines) + "\n")
        log = open(self.root / "nats.log", "ab")
        self.proc = subprocess.Popen([self.binary, "-c", str(conf)], stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        asyncio.run(jetstream_ready(self.url, time.monotonic() + READY_TIMEOUT_S))
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def log(self) -> str:
        path = self.root / "nats.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


class Host:
    """One daemon's workspace as a host: ``name``, ``mm`` (its :class:`Harness`), ``transit``
    (a :class:`Transit` on its directory, to send and receive as its local processes do)."""

    def __init__(self, name: str, root: Path, env: dict[str, str]):
        self.name = name
        root.mkdir()
        transit_dir = root / "transit"
        self.env = dict(env, MULTIMODULE_TRANSIT_DIR=str(transit_dir),
                        MULTIMODULE_HOSTNAME=name)
        self.mm = Harness(root, self.env, transit_dir)
        self.transit = Transit(transit_dir)

    def config(self, url: str, extra: str = "", bridge: str = "") -> None:
        self.mm.config(f'[Bridge]\nservers = ["{url}"]\n{bridge}\n{extra}')

    def mmctl(self, *args: str) -> subprocess.CompletedProcess:
        return self.mm.mmctl_proc(*args)


@pytest.fixture
def nats_server(tmp_path: Path):
    server = NatsServer(tmp_path / "nats").start()
    yield server
    server.stop()


@pytest.fixture
def two_hosts(tmp_path: Path, child_env: dict[str, str]):
    """Hosts ``a`` and ``b`` (names "hostA", "hostB"), not started."""
    hosts = {"a": Host("hostA", tmp_path / "hostA", child_env),
             "b": Host("hostB", tmp_path / "hostB", child_env)}
    yield hosts
    problems = []
    for host in hosts.values():
        problems += host.mm.close()
        host.transit.remove_all()
    if problems:
        pytest.fail("\n\n".join(problems))
