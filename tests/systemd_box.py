"""A real systemd for system tests: booted as PID 1 of a throwaway container.

The machines we test on do not boot systemd, but systemd runs fine as PID 1 of a
``systemd-nspawn`` container whose root is a copy-on-write overlay of the host's root: the
container sees this checkout, its virtualenv and Python, and nothing it writes reaches the host
(the upper layer lives on a tmpfs that is unmounted afterwards). Needs root and
``systemd-nspawn`` (package systemd-container, which scripts/setup installs as root).

The container has its own IPC namespace: System V queues made inside are invisible outside, so
a scenario runs entirely inside (through :meth:`SystemdBox.run`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

BOOT_TIMEOUT_S = 120.0  # a fresh, loaded CI machine boots slower than ours (3 s)


class BoxError(RuntimeError):
    """The container could not be booted or a command in it failed."""


class SystemdBox:
    """A booted systemd container; use as a context manager (always torn down).

    ``root``: the container's root as seen from the host. :meth:`run` runs a command inside
    through ``nsenter``; :meth:`write` writes a file inside. ``binds``: host directories made
    visible read-only at the same path (the container mounts its own /tmp, so a checkout or a
    Python under /tmp must be bound; see :func:`binds_for`).
    """

    def __init__(self, base: Path, binds: tuple[Path, ...] = ()):
        self.binds = tuple(binds)
        self.name = f"mmbox-{uuid.uuid4().hex[:8]}"
        self.base = base / self.name
        self.root = self.base / "root"
        self.console = base / f"{self.name}.console.log"
        self.nspawn: subprocess.Popen | None = None
        self.pid1: int | None = None
        self._mounted: list[Path] = []

    def __enter__(self) -> SystemdBox:
        try:
            self._boot()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _mount(self, *args: str, target: Path) -> None:
        subprocess.run(["mount", *args, str(target)], check=True, capture_output=True)
        self._mounted.append(target)

    def _boot(self) -> None:
        self.base.mkdir(parents=True)
        self._mount("-t", "tmpfs", "tmpfs", target=self.base)
        for sub in ("upper", "work", "root"):
            (self.base / sub).mkdir()
        self._mount("-t", "overlay", "overlay", "-o",
                    f"lowerdir=/,upperdir={self.base / 'upper'},workdir={self.base / 'work'}",
                    target=self.root)
        # A clean machine-id and no leftover state of the host's own services.
        (self.root / "etc" / "machine-id").write_text(uuid.uuid4().hex + "\n")
        with open(self.console, "wb") as console:
            # --private-network: the container's services (the host's enabled ones start too)
            # see only their own loopback, never this machine's interfaces.
            # systemd.unit=basic.target: sockets, D-Bus, journald and timers, without the
            # host's multi-user services, whose start-up (on some machine, waiting for a
            # network or a disk) is no business of these tests.
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "-D", str(self.root), "--register=no", "--keep-unit",
                 f"--machine={self.name}", "--private-network",
                 *(f"--bind-ro={path}" for path in self.binds),
                 "--boot", "systemd.firstboot=off", "systemd.unit=basic.target"],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                start_new_session=True)
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while self.pid1 is None:
            if self.nspawn.poll() is not None:
                raise BoxError(f"systemd-nspawn exited with {self.nspawn.returncode}:\n"
                               f"{self._console_tail()}")
            found = subprocess.run(["pgrep", "-P", str(self.nspawn.pid), "-x", "systemd"],
                                   capture_output=True, text=True)
            if found.stdout.strip():
                self.pid1 = int(found.stdout.split()[0])
            elif time.monotonic() > deadline:
                raise BoxError("systemd did not start in the container")
            else:
                time.sleep(0.05)  # no event tells us when nspawn has forked PID 1
        self._wait_until_booted(deadline)

    def _wait_until_booted(self, deadline: float) -> None:
        """Wait (bounded by ``deadline``, monotonic seconds) until the container's manager
        reports ``running`` or ``degraded``. Until PID 1 has made ``/run/systemd/system``
        ``systemctl is-system-running`` says ``offline``, and until it has opened its private
        socket it says nothing: both mean "not yet", as do ``initializing`` and ``starting``.
        Raises :class:`BoxError` with the pending jobs and the console's tail otherwise."""
        state = ""
        while True:
            if self.nspawn.poll() is not None:
                raise BoxError(f"systemd-nspawn exited with {self.nspawn.returncode} while "
                               f"booting:\n{self._console_tail()}")
            try:
                state = self.run("systemctl", "is-system-running", check=False,
                                 timeout=10).stdout.strip()
            except subprocess.TimeoutExpired:
                state = "(no answer in 10 s)"
            if state in ("running", "degraded"):
                return
            if state in ("maintenance", "stopping"):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)  # systemd offers no event we can await from outside the container
        jobs = self.run("systemctl", "list-jobs", "--no-pager", check=False, timeout=10).stdout
        raise BoxError(f"container did not finish booting: {state!r}\npending jobs:\n{jobs}\n"
                       f"console:\n{self._console_tail()}")

    def _console_tail(self) -> str:
        return self.console.read_text(errors="replace")[-3000:]

    def run(self, *cmd: str, check: bool = True, timeout: float = 60.0,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside the container (all its namespaces); returns the completed
        process with text stdout/stderr. Raises :class:`BoxError` on failure if ``check``."""
        if self.pid1 is None:
            raise BoxError("the container is not running")
        result = subprocess.run(["nsenter", "-t", str(self.pid1), "-a", *cmd],
                                capture_output=True, text=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise BoxError(f"{' '.join(cmd)} exited {result.returncode}\n"
                           f"stdout: {result.stdout}\nstderr: {result.stderr}")
        return result

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file at ``path`` inside the container (from inside: the container mounts
        its own /run and /tmp over the overlay)."""
        self.run("sh", "-c", 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"',
                 "sh", path, f"{mode:o}", input=text)

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        """``systemctl show -p ...`` as a dict."""
        out = self.run("systemctl", "show", unit, *(f"-p{p}" for p in properties)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_for(self, predicate, timeout: float, what: str, interval: float = 0.1):
        """Re-check ``predicate()`` (a question to systemd, which offers no event we can
        await from outside the container) until it returns a true value; bounded."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise BoxError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(interval)

    def journal(self, *args: str) -> str:
        """``journalctl --no-pager ARGS`` output."""
        return self.run("journalctl", "--no-pager", *args, check=False).stdout

    def close(self) -> None:
        """Shut the container down and unmount everything (idempotent)."""
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)  # nspawn asks systemd to power off
            try:
                self.nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                # Killing PID 1 kills its whole PID namespace: no container outlives us to
                # disturb the next boot.
                if self.pid1 is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid1, signal.SIGKILL)
                os.killpg(self.nspawn.pid, signal.SIGKILL)
                self.nspawn.wait(timeout=10)
        self.pid1 = None
        for target in reversed(self._mounted):
            subprocess.run(["umount", "-l", str(target)], capture_output=True)
        self._mounted.clear()
        shutil.rmtree(self.base, ignore_errors=True)


def binds_for(*paths: Path) -> tuple[Path, ...]:
    """Those of ``paths`` the container would hide behind its own /tmp or /var/tmp."""
    hidden = (Path("/tmp"), Path("/var/tmp"))
    out = []
    for path in paths:
        real = Path(path).resolve()
        if any(real.is_relative_to(h) for h in hidden) and real not in out:
            out.append(real)
    return tuple(out)


def box_available() -> str | None:
    """``None`` if a box can be booted here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("systemd-nspawn") is None:
        return "needs systemd-nspawn (package systemd-container)"
    return None
