"""Several simulated hosts on this one machine, joined to NATS servers through a "hub".

For the tests of the bridge between hosts (System V queues on each host, NATS JetStream in
between). Everything runs in Linux namespaces made for the test; nothing binds on the root
namespace's interfaces, and two runs at once do not collide (every name has a random tag)::

                       hub network namespace  (nats-server processes)
              10.213.1.1/24 v1    10.213.2.1/24 v2    ...   10.213.K.1/24 vK
                    │ veth              │ veth                    │ veth
              10.213.1.2/24 eth0  10.213.2.2/24 eth0  ...   10.213.K.2/24 eth0
               host "a": own net,  host "b": own net,        host K (K = 1..254, in the
               IPC and UTS ns      IPC and UTS ns             order of add_host)

Address plan: host number K (1, 2, ... in the order of :meth:`Network.add_host`, at most 254)
gets the subnet ``10.213.K.0/24``: the hub side of its veth is ``10.213.K.1`` (the address the
host reaches NATS at, :attr:`Host.hub_address`), the host side ``10.213.K.2``
(:attr:`Host.address`). The subnets live only inside the namespaces of one :class:`Network`,
so concurrent runs reuse them without conflict. A host has no default route: it reaches its own
hub address only, not the other hosts (the hub does not forward). Interface names: ``vK`` in
the hub, ``eth0`` in each host (made in those namespaces directly, so no veth name ever exists
in the root namespace).

Ports, all in the hub namespace: node i (0-based) of the c-th cluster (0-based, in the order of
:meth:`Network.start_nats`) listens for clients on ``0.0.0.0:4222+10c+i``, for routes on
``127.0.0.1:6222+10c+i`` and for monitoring on ``127.0.0.1:8222+10c+i``.

Each host is an "anchor" process, ``ip netns exec NS unshare --ipc --uts -- sh -c 'hostname
NAME && exec sleep infinity'``: its own network namespace (from ``ip netns``), its own IPC
namespace (so its own System V queues, which disappear with the namespace when its last process
exits) and its own UTS namespace (``hostname`` prints the host's name). Every command for the
host runs as ``nsenter -t ANCHOR --net --ipc --uts -- CMD``; the mount namespace, the file
system and the PID namespace stay shared with the test (each host gets its own directory,
:attr:`Host.root`, and its own ``MULTIMODULE_TRANSIT_DIR`` under it).

Use the ``network`` fixture (import it into the test module: ``from hosts import network  #
noqa: F401``)::

    def test_x(network):
        require_root()
        a, b = network.add_host("a"), network.add_host("b")
        cluster = network.start_nats(cluster_size=3)
        a.python("import socket; print(socket.gethostname())").stdout   # "a\\n"
        cluster.urls_for(a)          # ["nats://10.213.1.1:4222", ":4223", ":4224"]
        proc = b.popen("multimodule", ..., stdout=subprocess.PIPE)
        a.link_down(); ...; a.link_up()
        cluster.kill(0); cluster.start(0)

:meth:`Network.close` (run by the fixture, also after a failing test) kills every process of
the hub and the hosts (by process group, then every process found in one of the namespaces),
stops the NATS servers and deletes the namespaces (which removes the veths).

Requires root, ``ip`` (iproute2), ``nsenter`` and ``unshare`` (util-linux), ``hostname``,
``nats-server`` (2.9 or later), and ``openssl`` for ``start_nats(tls=True)``; see
:func:`require_root`.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import IO, Any, Iterator

import pytest

REPO = Path(__file__).resolve().parent.parent

#: First two octets of every address the harness assigns (see the module docstring).
SUBNET_PREFIX = "10.213"
#: Hosts per network: K in 10.213.K.0/24 runs from 1 to 254.
MAX_HOSTS = 254
#: Base ports inside the hub; node i of cluster c adds 10 * c + i.
CLIENT_PORT = 4222
ROUTE_PORT = 6222
HTTP_PORT = 8222
#: Nodes per cluster at most (the ports of cluster c + 1 start 10 above those of cluster c).
MAX_CLUSTER_SIZE = 9
#: Seconds to wait for a host's anchor to set up its namespaces and hostname.
ANCHOR_TIMEOUT = 10.0
#: Seconds to wait for NATS servers to be ready (a JetStream cluster: to elect its leaders).
NATS_READY_TIMEOUT = 30.0
#: Seconds between SIGTERM and SIGKILL when stopping NATS servers.
NATS_STOP_GRACE = 3.0

#: Tools every :class:`Network` needs (looked up on $PATH, then /usr/sbin and /sbin).
REQUIRED_TOOLS = ("nats-server", "ip", "nsenter", "unshare", "hostname", "sleep")

_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,30}[A-Za-z0-9])?")
_namespaces_usable: bool | None = None


# -- requirements -------------------------------------------------------------------------------


def _tool(name: str) -> str | None:
    """The absolute path of program ``name``, or None: $PATH first, then /usr/sbin, /sbin."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def _need(name: str) -> str:
    """The absolute path of program ``name``; raises RuntimeError if it is not installed."""
    found = _tool(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed (needed by tests/hosts.py)")
    return found


def _unavailable(reason: str) -> None:
    """Skip the test, or fail it when $CI is set: CI is root and must run these tests."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: these tests must not be skipped)", pytrace=False)
    pytest.skip(reason)


def require_root(*, tls: bool = False) -> None:
    """Skip the calling test unless it can simulate hosts; with $CI set, fail it instead.

    Checks: running as root; ``nats-server``, ``ip``, ``nsenter``, ``unshare``, ``hostname``
    and ``sleep`` installed (``openssl`` too with ``tls=True``); and, once per process, that
    this kernel/container lets us make network, IPC and UTS namespaces (``unshare --net --ipc
    --uts true``). Calls ``pytest.skip`` on the first problem, or ``pytest.fail`` when the
    environment variable ``CI`` is non-empty.
    """
    global _namespaces_usable
    if os.geteuid() != 0:
        _unavailable("simulated hosts need root (network, IPC and UTS namespaces)")
    tools = REQUIRED_TOOLS + (("openssl",) if tls else ())
    missing = [name for name in tools if _tool(name) is None]
    if missing:
        _unavailable(f"simulated hosts need {', '.join(missing)} (not installed)")
    if _namespaces_usable is None:
        probe = subprocess.run(
            [_need("unshare"), "--net", "--ipc", "--uts", "--", "true"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10,
        )
        _namespaces_usable = probe.returncode == 0
        if not _namespaces_usable:
            _unavailable(f"cannot make namespaces here: {probe.stderr.strip()}")
    elif not _namespaces_usable:
        _unavailable("cannot make namespaces here (unshare --net --ipc --uts failed)")


# -- errors -------------------------------------------------------------------------------------


class HostCommandError(subprocess.CalledProcessError):
    """A command run with :meth:`Host.run` (check=True) exited with a non-zero status.

    ``str()`` of it shows the host, the command, the status, stdout and stderr.
    """

    def __init__(self, host: str, returncode: int, cmd: list[str], output: str, stderr: str):
        super().__init__(returncode, cmd, output, stderr)
        self.host = host

    def __str__(self) -> str:
        return (
            f"command {self.cmd!r} on host {self.host!r} exited with status {self.returncode}"
            f"\n--- stdout ---\n{self.output or ''}\n--- stderr ---\n{self.stderr or ''}"
        )


class HostTimeout(subprocess.TimeoutExpired):
    """A command run with :meth:`Host.run` outlived its timeout; its process group was killed.

    ``str()`` of it shows the host, the command, the timeout and what it wrote so far.
    """

    def __init__(self, host: str, cmd: list[str], timeout: float, output: str, stderr: str):
        super().__init__(cmd, timeout, output, stderr)
        self.host = host

    def __str__(self) -> str:
        return (
            f"command {self.cmd!r} on host {self.host!r} timed out after {self.timeout} s"
            f"\n--- stdout ---\n{self.output or ''}\n--- stderr ---\n{self.stderr or ''}"
        )


# -- small process helpers ----------------------------------------------------------------------


def _run(argv: list[str], *, timeout: float = 30.0, check: bool = True,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a short setup command (ip, openssl, ...) in the root namespaces and capture output.

    Raises RuntimeError with stdout and stderr if it fails and ``check`` is true.
    """
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=timeout, env=env)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{argv!r} exited with status {result.returncode}\n--- stdout ---\n{result.stdout}"
            f"\n--- stderr ---\n{result.stderr}"
        )
    return result


def _killpg(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the process group led by ``proc`` (made with start_new_session=True).

    Only while ``proc`` is not reaped: until then its pid (the group id) cannot be reused.
    """
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _ns_inode(pid: int | str, kind: str) -> int | None:
    """The inode of ``/proc/PID/ns/KIND`` (identifies a namespace), or None if unreadable."""
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def _pids_in_namespaces(inodes: dict[str, set[int]]) -> list[int]:
    """Pids of the processes that are in one of the namespaces ``{kind: {inode, ...}}``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        for kind, wanted in inodes.items():
            if wanted and _ns_inode(entry.name, kind) in wanted:
                found.append(int(entry.name))
                break
    return found


def _tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a text file ("" if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "".join(text.splitlines(keepends=True)[-lines:])


# -- hosts --------------------------------------------------------------------------------------


class Host:
    """One simulated host: own network, IPC (System V queues) and UTS (hostname) namespaces.

    Made by :meth:`Network.add_host`. Attributes:

    - ``name``: the host's name, also its hostname inside.
    - ``index``: K, its number in the network (1-based); its subnet is ``10.213.K.0/24``.
    - ``address``: the host side IP of its veth, ``"10.213.K.2"``.
    - ``hub_address``: the hub side IP, ``"10.213.K.1"``, where the host reaches NATS.
    - ``netns``: the name of its network namespace (``ip netns list``).
    - ``hub_veth``: the name of the hub end of its veth (in the hub namespace); the host end is
      ``eth0``.
    - ``root``: a directory of its own (mode 0700) under the network's base directory.
    - ``env``: environment for its processes: a copy of os.environ plus
      ``MULTIMODULE_TRANSIT_DIR=<root>/transit`` (not created), ``MULTIMODULE_HOSTNAME=<name>``,
      ``PYTHONPATH`` with this checkout first, ``PYTHONUNBUFFERED=1``. Tests may change it.
    - ``anchor``: the Popen of the process holding its namespaces.
    """

    def __init__(self, network: Network, name: str, index: int, netns: str) -> None:
        self.network = network
        self.name = name
        self.index = index
        self.netns = netns
        self.address = f"{SUBNET_PREFIX}.{index}.2"
        self.hub_address = f"{SUBNET_PREFIX}.{index}.1"
        self.prefix_len = 24
        self.hub_veth = f"v{index}"
        self.veth = "eth0"
        self.root = network.base / "hosts" / name
        self.root.mkdir(parents=True, mode=0o700)
        os.chmod(self.root, 0o700)
        env = dict(os.environ)
        env["MULTIMODULE_TRANSIT_DIR"] = str(self.root / "transit")
        env["MULTIMODULE_HOSTNAME"] = name
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        self.env: dict[str, str] = env
        self.anchor: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.address} ns={self.netns}>"

    # -- commands

    def argv(self, *cmd: Any) -> list[str]:
        """``nsenter -t ANCHOR --net --ipc --uts -- *cmd`` (items turned into str).

        Raises RuntimeError if the host's anchor process is gone (its pid could be reused).
        """
        if self.anchor is None or self.anchor.poll() is not None:
            raise RuntimeError(f"host {self.name!r} is down: its anchor process exited")
        return [self.network.nsenter, "-t", str(self.anchor.pid), "--net", "--ipc", "--uts",
                "--", *map(str, cmd)]

    def popen(self, *cmd: Any, stdin: Any = subprocess.DEVNULL, stdout: Any = None,
              stderr: Any = None, env: dict[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen:
        """Start ``cmd`` inside the host; returns its Popen (its pid is the command's own).

        It runs in a new session (its own process group, killed as a whole by
        :meth:`Network.close`), with :attr:`env` updated by ``env``. stdin defaults to
        /dev/null; stdout and stderr to the test's own (pytest captures them). Other keyword
        arguments go to subprocess.Popen (``text=True``, ``cwd=...``). Every process started
        here is recorded and killed by :meth:`Network.close` if still running.
        """
        full_env = dict(self.env)
        if env:
            full_env.update(env)
        return self.network._spawn(self.argv(*cmd), stdin=stdin, stdout=stdout, stderr=stderr,
                                   env=full_env, **kwargs)

    def run(self, *cmd: Any, timeout: float = 60.0, check: bool = True,
            input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the host to completion; text mode, stdout and stderr captured.

        ``timeout`` is in seconds. On timeout the command's process group is killed and
        :class:`HostTimeout` raised; with ``check`` a non-zero status raises
        :class:`HostCommandError`; both show stdout and stderr. ``input`` is sent to stdin
        (otherwise stdin is /dev/null).
        """
        proc = self.popen(*cmd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        argv = [str(c) for c in cmd]
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(proc)
            try:
                out, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a grandchild outside the group holds the pipes
                out, err = "", ""
            raise HostTimeout(self.name, argv, timeout, out, err) from None
        except BaseException:
            _killpg(proc)
            proc.wait()
            raise
        if check and proc.returncode != 0:
            raise HostCommandError(self.name, proc.returncode, argv, out, err)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def python(self, code: str, *args: Any, timeout: float = 60.0, input: str | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``sys.executable -c CODE *args`` inside the host (check=True; see :meth:`run`).

        ``code`` is dedented first, so an indented triple-quoted string works.
        """
        return self.run(sys.executable, "-c", textwrap.dedent(code), *args, timeout=timeout,
                        input=input, env=env)

    # -- the link to the hub

    def link_down(self, *, hub_side_only: bool = False) -> None:
        """Cut the host off the hub: set its veth down (both ends, or only the hub end).

        Both ends (the default): the host loses its route to the hub, so connects fail at
        once (ENETUNREACH) and established connections see no traffic. ``hub_side_only``: the
        host keeps its address and route but nothing gets through; connects hang until their
        timeout (like a cable pulled at the far end). Either way established TCP connections
        are not reset; they stall until their own timeouts.
        """
        net = self.network
        _run([net.ip, "-n", net.hub, "link", "set", self.hub_veth, "down"])
        if not hub_side_only:
            _run([net.ip, "-n", self.netns, "link", "set", self.veth, "down"])

    def link_up(self) -> None:
        """Undo :meth:`link_down`: both ends of the veth up (addresses and routes return)."""
        net = self.network
        _run([net.ip, "-n", net.hub, "link", "set", self.hub_veth, "up"])
        _run([net.ip, "-n", self.netns, "link", "set", self.veth, "up"])


# -- NATS ---------------------------------------------------------------------------------------


#: Run inside the hub by NatsCluster._wait_ready: polls the monitoring endpoints of some nodes
#: until JetStream is enabled (and, clustered, each node knows a meta leader), then optionally
#: creates and deletes a stream with N replicas (retrying) so that the JetStream cluster is
#: known to work. argv[1]: JSON spec. Exits non-zero with the reason on stderr.
_READY_PROBE = r'''
import asyncio, json, ssl, sys, time, urllib.error, urllib.request

spec = json.loads(sys.argv[1])
deadline = time.monotonic() + spec["timeout"]

def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")

def get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError as e:
        return None, repr(e).encode()

pending, last = list(spec["nodes"]), {}
while pending:
    for node in list(pending):
        name, pid, port = node
        if not alive(pid):
            sys.exit(f"{name}: nats-server (pid {pid}) exited")
        status, body = get(port, "/healthz?js-enabled-only=true")
        ok = status == 200
        if ok and spec["clustered"]:
            status, body = get(port, "/jsz")
            ok = status == 200 and bool(json.loads(body).get("meta_cluster", {}).get("leader"))
        if ok:
            pending.remove(node)
        else:
            last[name] = f"{status} {body[:300]!r}"
    if pending:
        if time.monotonic() > deadline:
            sys.exit(f"not ready within {spec['timeout']} s: {last}")
        time.sleep(0.05)

check = spec.get("stream_check")
if check:
    import nats

    async def attempt():
        tls = None
        if check.get("ca"):
            tls = ssl.create_default_context(cafile=check["ca"])
            tls.load_cert_chain(check["cert"], check["key"])
        async def quiet(e):
            pass
        # max_reconnect_attempts=0 would mean "retry forever", even for the first connect.
        nc = await nats.connect(check["urls"], tls=tls, connect_timeout=2, allow_reconnect=False,
                                max_reconnect_attempts=1, reconnect_time_wait=0.1, error_cb=quiet)
        try:
            js = nc.jetstream(timeout=5)
            await js.add_stream(name=check["stream"], subjects=[check["stream"] + ".x"],
                                num_replicas=check["replicas"])
            await js.delete_stream(check["stream"])
        finally:
            await nc.close()

    error = None
    while True:
        try:
            asyncio.run(asyncio.wait_for(attempt(), max(1.0, deadline - time.monotonic())))
            break
        except Exception as e:
            error = e
        if time.monotonic() > deadline:
            sys.exit(f"R{check['replicas']} stream not possible within {spec['timeout']} s: "
                     f"{error!r}")
        time.sleep(0.2)
'''


class NatsCluster:
    """NATS servers with JetStream in the hub namespace, made by :meth:`Network.start_nats`.

    Attributes:

    - ``size``: number of nodes; node i (0-based) is named ``n{i+1}``.
    - ``tls``: whether clients must use TLS with a client certificate.
    - ``nodes``: list of the nodes' Popen, None for a node that is not running.
    - ``client_ports`` / ``route_ports`` / ``http_ports``: per node, in the hub namespace.
    - ``dir``: its directory (configs ``n1.conf``, logs ``n1.log``, stores ``n1-store/``, TLS
      files ``tls/``).
    - ``ca``, ``client_cert``, ``client_key``: paths of the CA certificate and of a client
      certificate and key signed by it (PEM), or None without TLS. In a host::

          ctx = ssl.create_default_context(cafile=ca); ctx.load_cert_chain(client_cert, client_key)
          nc = await nats.connect(cluster.urls_for(host), tls=ctx)
    """

    def __init__(self, network: Network, number: int, size: int, tls: bool,
                 max_payload: int | None) -> None:
        if not 1 <= size <= MAX_CLUSTER_SIZE:
            raise ValueError(f"cluster_size must be 1..{MAX_CLUSTER_SIZE}, not {size}")
        self.network = network
        self.number = number
        self.size = size
        self.tls = tls
        self.max_payload = max_payload
        self.dir = network.base / f"nats{number}"
        self.dir.mkdir(mode=0o700)
        offset = 10 * number
        self.client_ports = [CLIENT_PORT + offset + i for i in range(size)]
        self.route_ports = [ROUTE_PORT + offset + i for i in range(size)]
        self.http_ports = [HTTP_PORT + offset + i for i in range(size)]
        self.nodes: list[subprocess.Popen | None] = [None] * size
        self._logs: list[IO[bytes] | None] = [None] * size
        self.ca: Path | None = None
        self.client_cert: Path | None = None
        self.client_key: Path | None = None
        self._server_cert: Path | None = None
        self._server_key: Path | None = None
        if tls:
            self._make_certificates()
        for i in range(size):
            self.config_path(i).write_text(self._config(i))

    def __repr__(self) -> str:
        running = sum(p is not None for p in self.nodes)
        return f"<NatsCluster {self.size} nodes ({running} running) tls={self.tls}>"

    # -- files

    def config_path(self, i: int) -> Path:
        """The config file of node i."""
        return self.dir / f"n{i + 1}.conf"

    def log_path(self, i: int) -> Path:
        """The log file of node i (its stdout and stderr, appended across restarts)."""
        return self.dir / f"n{i + 1}.log"

    def log(self, i: int, lines: int = 200) -> str:
        """The last ``lines`` lines of node i's log."""
        return _tail(self.log_path(i), lines)

    def _config(self, i: int) -> str:
        q = json.dumps  # a JSON string is a valid quoted string in the NATS config syntax
        lines = [
            f"server_name: n{i + 1}",
            f"listen: 0.0.0.0:{self.client_ports[i]}",
            f"http: 127.0.0.1:{self.http_ports[i]}",
            f"jetstream {{ store_dir: {q(str(self.dir / f'n{i + 1}-store'))}, "
            "max_mem: 64M, max_file: 1G }",
        ]
        if self.max_payload is not None:
            lines.append(f"max_payload: {int(self.max_payload)}")
        if self.tls:
            lines.append(
                f"tls {{ cert_file: {q(str(self._server_cert))}, "
                f"key_file: {q(str(self._server_key))}, ca_file: {q(str(self.ca))}, "
                "verify: true, timeout: 5 }"
            )
        if self.size > 1:
            routes = ", ".join(f"nats-route://127.0.0.1:{port}"
                               for j, port in enumerate(self.route_ports) if j != i)
            # no_advertise: clients are not told the servers' other addresses (the hub's
            # addresses of other hosts, which a host has no route to).
            lines.append(
                f"cluster {{ name: mmt, listen: 127.0.0.1:{self.route_ports[i]}, "
                f"no_advertise: true, routes: [ {routes} ] }}"
            )
        return "\n".join(lines) + "\n"

    def _make_certificates(self) -> None:
        """A throwaway CA, a server certificate for 127.0.0.1 and every possible hub address
        (10.213.1.1 .. 10.213.254.1, so hosts added later are covered) and a client
        certificate, all EC P-256 (keys mode 0600)."""
        openssl = _need("openssl")
        d = self.dir / "tls"
        d.mkdir(mode=0o700)
        self.ca, ca_key = d / "ca.pem", d / "ca.key"
        self._server_cert, self._server_key = d / "server.pem", d / "server.key"
        self.client_cert, self.client_key = d / "client.pem", d / "client.key"
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        _run([openssl, "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(self.ca),
              "-days", "2", "-subj", "/CN=multimodule test CA",
              "-addext", "basicConstraints=critical,CA:TRUE",
              "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        sans = ",".join(["IP:127.0.0.1"] + [f"IP:{SUBNET_PREFIX}.{k}.1"
                                            for k in range(1, MAX_HOSTS + 1)])
        for cert, key, cn, usage, extra in [
            (self._server_cert, self._server_key, "nats server", "serverAuth",
             f"subjectAltName={sans}\n"),
            (self.client_cert, self.client_key, "multimodule client", "clientAuth", ""),
        ]:
            csr, ext = cert.with_suffix(".csr"), cert.with_suffix(".ext")
            ext.write_text(
                "basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                f"extendedKeyUsage={usage}\n"
                "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n" + extra
            )
            _run([openssl, "req", "-new", *ec, "-keyout", str(key), "-out", str(csr),
                  "-subj", f"/CN={cn}"])
            _run([openssl, "x509", "-req", "-in", str(csr), "-CA", str(self.ca),
                  "-CAkey", str(ca_key), "-set_serial", str(secrets.randbits(63)),
                  "-days", "2", "-extfile", str(ext), "-out", str(cert)])
        for key in (ca_key, self._server_key, self.client_key):
            os.chmod(key, 0o600)

    # -- addresses

    def urls_for(self, host: Host) -> list[str]:
        """The URLs ``host`` reaches the nodes at, one per node in node order, through its own
        veth: ``["nats://10.213.K.1:4222", "nats://10.213.K.1:4223", ...]`` (``tls://``
        with TLS). Raises ValueError for a host of another network."""
        if host.network is not self.network:
            raise ValueError(f"{host!r} is not a host of this network")
        scheme = "tls" if self.tls else "nats"
        return [f"{scheme}://{host.hub_address}:{port}" for port in self.client_ports]

    def _local_urls(self) -> list[str]:
        scheme = "tls" if self.tls else "nats"
        return [f"{scheme}://127.0.0.1:{port}" for port in self.client_ports]

    # -- processes

    def _launch(self, i: int) -> None:
        if self.nodes[i] is not None and self.nodes[i].poll() is None:
            raise RuntimeError(f"node n{i + 1} is already running")
        log = open(self.log_path(i), "ab")
        self._logs[i] = log
        net = self.network
        argv = [net.nsenter, f"--net={net.netns_path(net.hub)}", "--",
                _need("nats-server"), "-c", str(self.config_path(i))]
        self.nodes[i] = net._spawn(argv, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, record=False)

    def _wait_ready(self, indices: list[int], *, stream_check: bool,
                    timeout: float = NATS_READY_TIMEOUT) -> None:
        """Wait (at most ``timeout`` s) until the given nodes serve JetStream (clustered: know a
        meta leader); with ``stream_check``, until a stream with ``size`` replicas can be
        made. Raises RuntimeError with the nodes' log tails otherwise."""
        spec: dict[str, Any] = {
            "timeout": timeout,
            "clustered": self.size > 1,
            "nodes": [[f"n{i + 1}", self.nodes[i].pid, self.http_ports[i]] for i in indices],
        }
        if stream_check:
            spec["stream_check"] = {
                "urls": self._local_urls(), "replicas": self.size,
                "stream": f"MMT_READY_{secrets.token_hex(4)}",
                "ca": str(self.ca) if self.tls else None,
                "cert": str(self.client_cert) if self.tls else None,
                "key": str(self.client_key) if self.tls else None,
            }
        net = self.network
        argv = [net.nsenter, f"--net={net.netns_path(net.hub)}", "--",
                sys.executable, "-c", _READY_PROBE, json.dumps(spec)]
        probe = net._spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
        try:
            out, err = probe.communicate(timeout=timeout + 15)
        except subprocess.TimeoutExpired:
            _killpg(probe)
            probe.wait()
            out, err = "", "probe timed out"
        if probe.returncode != 0:
            logs = "\n".join(f"--- n{i + 1} log ---\n{self.log(i, 40)}" for i in indices)
            raise RuntimeError(f"NATS servers not ready: {err.strip()} {out.strip()}\n{logs}")

    def start(self, i: int | None = None, *, timeout: float = NATS_READY_TIMEOUT) -> None:
        """Start node i again (same config and store) and wait until it is ready (JetStream
        enabled; clustered: it knows a meta leader), at most ``timeout`` s; with ``i=None``
        start every node that is not running. Raises RuntimeError if a node is not ready in
        time or already running."""
        indices = [j for j in range(self.size) if self.nodes[j] is None] if i is None else [i]
        for j in indices:
            self._launch(j)
        self._wait_ready(indices, stream_check=False, timeout=timeout)

    def kill(self, i: int) -> None:
        """SIGKILL node i (no shutdown: what a crash or power loss does) and reap it."""
        proc = self.nodes[i]
        if proc is None:
            raise RuntimeError(f"node n{i + 1} is not running")
        _killpg(proc)
        proc.wait()
        self._forget(i)

    def stop(self, grace: float = NATS_STOP_GRACE) -> None:
        """Stop every running node: SIGTERM, then SIGKILL after ``grace`` seconds."""
        running = [(i, p) for i, p in enumerate(self.nodes) if p is not None]
        for _, proc in running:
            _killpg(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for i, proc in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _killpg(proc)
                proc.wait()
            self._forget(i)

    def _forget(self, i: int) -> None:
        self.nodes[i] = None
        log = self._logs[i]
        if log is not None:
            log.close()
            self._logs[i] = None


# -- the network --------------------------------------------------------------------------------


class Network:
    """A hub network namespace plus simulated hosts attached to it (see the module docstring).

    ``Network(base)`` makes ``base`` (if needed) and the hub namespace ``mmt-<tag>-hub``
    (``tag``: 8 random hex digits; hosts are ``mmt-<tag>-hK``), loopback up. Use it as a
    context manager or call :meth:`close`; a failure while constructing cleans up and
    re-raises. Attributes: ``base``, ``tag``, ``hub`` (the hub namespace's name), ``hosts``
    ({name: Host}), ``clusters`` (the NatsCluster objects, in start order).
    """

    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.tag = secrets.token_hex(4)
        self.hub = f"mmt-{self.tag}-hub"
        self.hosts: dict[str, Host] = {}
        self.clusters: list[NatsCluster] = []
        self.ip = _need("ip")
        self.nsenter = _need("nsenter")
        self._namespaces: list[str] = []       # made by ip netns add, deleted by close()
        self._inodes: dict[str, set[int]] = {"net": set(), "ipc": set(), "uts": set()}
        self._procs: list[subprocess.Popen] = []
        self._next_index = 1
        self._closed = False
        atexit.register(self.close)
        try:
            self._add_netns(self.hub)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Network {self.tag} hosts={list(self.hosts)}>"

    @staticmethod
    def netns_path(name: str) -> str:
        """The file ``ip netns`` keeps the namespace ``name`` at (for ``nsenter --net=``)."""
        return f"/run/netns/{name}"

    def _add_netns(self, name: str) -> None:
        _run([self.ip, "netns", "add", name])
        self._namespaces.append(name)
        self._inodes["net"].add(os.stat(self.netns_path(name)).st_ino)
        _run([self.ip, "-n", name, "link", "set", "lo", "up"])

    def _spawn(self, argv: list[str], *, record: bool = True, **kwargs: Any) -> subprocess.Popen:
        """Popen in a new session; recorded (unless ``record`` is false) for :meth:`close`."""
        if self._closed:
            raise RuntimeError("the network is closed")
        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
        if record:
            self._procs.append(proc)
        return proc

    # -- hosts

    def add_host(self, name: str) -> Host:
        """Make host ``name`` (letters, digits, inner '-', at most 32 characters; unique in the
        network) and return it once its anchor runs with hostname ``name``.

        Makes its network namespace ``mmt-<tag>-hK``, the veth ``vK`` (hub) -- ``eth0`` (host)
        with 10.213.K.1/24 and 10.213.K.2/24, all links up, then the anchor process (own IPC
        and UTS namespaces). Waits at most :data:`ANCHOR_TIMEOUT` s for the anchor. Raises
        ValueError for a bad or taken name, RuntimeError if a step fails (what was made so far
        is still removed by :meth:`close`).
        """
        if self._closed:
            raise RuntimeError("the network is closed")
        if not _HOST_NAME.fullmatch(name):
            raise ValueError(f"bad host name {name!r}: letters, digits and inner '-', 1..32")
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists already")
        if self._next_index > MAX_HOSTS:
            raise ValueError(f"at most {MAX_HOSTS} hosts per network")
        index = self._next_index
        self._next_index += 1
        host = Host(self, name, index, f"mmt-{self.tag}-h{index}")
        ip, hub, ns = self.ip, self.hub, host.netns
        self._add_netns(ns)
        _run([ip, "-n", hub, "link", "add", host.hub_veth, "type", "veth",
              "peer", "name", host.veth, "netns", ns])
        _run([ip, "-n", hub, "addr", "add", f"{host.hub_address}/24", "dev", host.hub_veth])
        _run([ip, "-n", ns, "addr", "add", f"{host.address}/24", "dev", host.veth])
        _run([ip, "-n", hub, "link", "set", host.hub_veth, "up"])
        _run([ip, "-n", ns, "link", "set", host.veth, "up"])

        anchor_log = open(host.root / "anchor.log", "wb")
        try:
            host.anchor = self._spawn(
                [ip, "netns", "exec", ns, _need("unshare"), "--ipc", "--uts", "--",
                 "sh", "-c", 'hostname "$1" && exec sleep infinity', "sh", name],
                stdin=subprocess.DEVNULL, stdout=anchor_log, stderr=subprocess.STDOUT,
            )
        finally:
            anchor_log.close()
        self._wait_anchor(host)
        self.hosts[name] = host
        return host

    def _wait_anchor(self, host: Host) -> None:
        """Wait until the anchor is in its own IPC and UTS namespaces and has set the hostname;
        then record its namespaces for the sweep in :meth:`close`."""
        anchor = host.anchor
        assert anchor is not None
        own = {kind: _ns_inode("self", kind) for kind in ("ipc", "uts")}
        deadline = time.monotonic() + ANCHOR_TIMEOUT
        seen = ""
        while True:
            if anchor.poll() is not None:
                raise RuntimeError(f"anchor of host {host.name!r} exited with status "
                                   f"{anchor.returncode}: {_tail(host.root / 'anchor.log', 20)}")
            inodes = {kind: _ns_inode(anchor.pid, kind) for kind in ("ipc", "uts")}
            if all(inodes[k] is not None and inodes[k] != own[k] for k in inodes):
                # unshare has run (the namespaces differ from ours); now the hostname
                result = _run(host.argv("hostname"), check=False, timeout=10)
                seen = result.stdout.strip()
                if result.returncode == 0 and seen == host.name:
                    for kind, inode in inodes.items():
                        self._inodes[kind].add(inode)
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"host {host.name!r}: anchor not ready within "
                                   f"{ANCHOR_TIMEOUT} s (hostname {seen!r})")
            time.sleep(0.01)

    # -- NATS

    def start_nats(self, *, cluster_size: int = 1, tls: bool = False,
                   max_payload: int | None = None,
                   timeout: float = NATS_READY_TIMEOUT) -> NatsCluster:
        """Start ``cluster_size`` nats-server nodes with JetStream in the hub and wait for them.

        Nodes are ``n1``.., ports per the module docstring; with more than one node they form
        the cluster ``mmt`` (routes over the hub's loopback). ``tls``: clients must use TLS
        and present a certificate from the cluster's CA (see :class:`NatsCluster`).
        ``max_payload``: the servers' max_payload in bytes (default: NATS's 1 MiB). Returns
        once every node serves JetStream and (clustered) a stream with ``cluster_size``
        replicas can be made, at most ``timeout`` s; raises RuntimeError with the logs
        otherwise. Can be called again for another, independent cluster (ports + 10).
        """
        if self._closed:
            raise RuntimeError("the network is closed")
        cluster = NatsCluster(self, len(self.clusters), cluster_size, tls, max_payload)
        self.clusters.append(cluster)
        for i in range(cluster_size):
            cluster._launch(i)
        cluster._wait_ready(list(range(cluster_size)), stream_check=cluster_size > 1,
                            timeout=timeout)
        return cluster

    def nats_log(self, i: int, lines: int = 200, *, cluster: int = -1) -> str:
        """The last ``lines`` lines of node i's log in the latest (or given) cluster."""
        return self.clusters[cluster].log(i, lines)

    # -- clean-up

    def processes(self) -> list[int]:
        """Pids of every process now in the hub's or a host's namespaces (net, IPC or UTS)."""
        return _pids_in_namespaces(self._inodes)

    def close(self) -> None:
        """Kill everything, delete the namespaces. Idempotent; safe after a partial setup.

        Order: NATS nodes (SIGTERM, SIGKILL after a grace), every recorded process group
        (SIGKILL), then every process still found in one of the network's namespaces (also
        daemons that left their group; anchors included), repeated until none is left (at most
        10 s), then ``ip netns del`` for each namespace (the kernel destroys a namespace and
        its veths asynchronously once nothing uses it; an IPC namespace's System V queues go
        with it). Raises RuntimeError at the end if something could not be removed.
        """
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        problems: list[str] = []
        for cluster in self.clusters:
            try:
                cluster.stop(grace=NATS_STOP_GRACE)
            except Exception as e:  # keep cleaning
                problems.append(f"stopping NATS: {e!r}")
        for proc in self._procs:
            _killpg(proc)
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                problems.append(f"pid {proc.pid} did not die")
        deadline = time.monotonic() + 10
        while True:
            left = self.processes()
            if not left:
                break
            if time.monotonic() > deadline:
                problems.append(f"processes left in the namespaces: {left}")
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for proc in self._procs:  # reap our own children among them
                proc.poll()
            time.sleep(0.02)
        for name in reversed(self._namespaces):
            result = _run([self.ip, "netns", "del", name], check=False)
            if result.returncode != 0 and os.path.exists(self.netns_path(name)):
                problems.append(f"ip netns del {name}: {result.stderr.strip()}")
        if problems:
            raise RuntimeError("Network.close: " + "; ".join(problems))


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    """A :class:`Network` under ``tmp_path/"net"`` (skips/fails per :func:`require_root`),
    closed after the test, whatever its outcome."""
    require_root()
    with Network(tmp_path / "net") as net:
        yield net
