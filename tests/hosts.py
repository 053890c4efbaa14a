"""Several "hosts" on one machine, made of Linux network namespaces, for system tests.

Who uses it: tests that need separate machines on one box (a gateway on one host, workers on
others, ``torch.distributed`` ranks across them) and tests that need a hostile network (packet
captures, latency and loss, cut links). Needs root, ``ip`` and ``tc`` (Debian ``iproute2``),
``tcpdump`` (Debian ``tcpdump``) for captures, and a kernel with ``sch_netem`` for ``delay``.
Where something is missing, ``HostsUnavailable`` says what; tests skip on it, or fail where
``PILOT_TEST_REQUIRE_HOSTS=1`` (set it in CI, which installs all of them).

The contract::

    with Network() as net:                   # or the `network` fixture (network_fixture)
        a, b = net.add_host("a"), net.add_host("b")
        server = a.popen([...])              # runs inside a's namespace, killed at exit
        b.wait_tcp(a.ip, port)               # a deadline, never a sleep
        cap = net.capture("tcp")             # tcpdump on the bridge, ready on return
        a.delay(100, loss_pct=1); a.clear_netem(); a.cut(); a.restore()
        cap.wait_for(b"marker"); pcap = cap.stop()

The layout. A ``Network`` has a random id ``pp<6 hex>``; everything it makes is named from it,
so ``cleanup_stale()`` can find leftovers of a crashed run:

- a "switch" namespace ``<id>-switch`` holding the bridge ``<id>`` (multicast snooping off, so
  multicast floods to every port as on a dumb switch) and one bridge port ``<id>p<n>`` per host;
- per host a namespace ``<id>-<name>`` with loopback up and ``eth0``, the other end of that
  port, holding ``Host.ip`` in ``Network.subnet`` and a route for 224.0.0.0/4 (multicast).
  The same name in every host, so ``GLOO_SOCKET_IFNAME=eth0`` fits all ranks.

Nothing is added to the root namespace: no link, no address, no route, no firewall rule. So the
bridge is out of reach of the root namespace's iptables, and a host reaches exactly the other
hosts of its ``Network``: not the root namespace's loopback (``127.0.0.1`` in a host is its own
loopback), not the machine's real interfaces (a host has no default route), not the hosts of
another ``Network``. The test process reaches a host only by running a process inside it
(``popen``, ``run``, ``python``). The subnet is a 10.x.y.0/24 that overlaps no route of the
root namespace (``ip route show table all``); the namespaces would isolate even a clash, this
keeps captures and addresses unambiguous.

Ownership: a ``Network`` owns every namespace, link, process (``popen``, ``capture``) and lock
file it made, and ``__exit__`` removes them all, on failure too: first the processes it started
(their whole process group: SIGTERM, then SIGKILL past ``KILL_GRACE_S``), then anything else
still running in its namespaces, then the namespaces (which takes their links with them). A
live ``Network`` holds an exclusive ``flock`` on ``/run/pilot-hosts/<id>.lock``; leftovers whose
lock is free belong to a dead process, and ``cleanup_stale()`` removes only those.

Errors (``HostsError`` and its children)::

    HostsError
    ├── HostsUnavailable   not root, no `ip netns`, a tool or kernel feature missing: skip
    └── CommandFailed      a command inside or about the hosts failed (with its stderr)
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn

import pytest

PREFIX = "pp"
ID_RE = re.compile(rf"^({PREFIX}[0-9a-f]{{6}})(?:-|p\d+$|$)")
HOST_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,15}$")
LOCK_DIR = Path("/run/pilot-hosts")
IFNAME = "eth0"  # the host's end of its link, the same name in every host
MULTICAST = "224.0.0.0/4"

COMMAND_TIMEOUT_S = 30.0  # one `ip`/`tc` command, or `Host.run` by default
READY_TIMEOUT_S = 15.0  # a server answering, tcpdump listening
KILL_GRACE_S = 5.0  # SIGTERM to SIGKILL at teardown
REQUIRE_ENV = "PILOT_TEST_REQUIRE_HOSTS"  # "1": unavailable hosts fail tests instead of skip


class HostsError(Exception):
    """Base of this module's errors."""


class HostsUnavailable(HostsError):
    """This machine cannot make hosts, or lacks a tool or kernel feature; the reason says which
    and how to fix it. Tests skip on it (see ``skip_unavailable``)."""


class CommandFailed(HostsError):
    """A command exited non-zero; the message carries the command and its stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        super().__init__(f"{' '.join(argv)!r} exited {returncode}: {stderr.strip()[-2000:]}")
        self.argv, self.returncode, self.stderr = list(argv), returncode, stderr


def _cmd(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if check and out.returncode != 0:
        raise CommandFailed(argv, out.returncode, out.stderr)
    return out


def check_available() -> None:
    """Raise ``HostsUnavailable`` unless this process can make namespaces and bridges."""
    if os.geteuid() != 0:
        raise HostsUnavailable("network namespaces need root (CAP_NET_ADMIN): run as root")
    if shutil.which("ip") is None:
        raise HostsUnavailable("`ip` not found: install iproute2")
    listed = _cmd(["ip", "netns", "list"], check=False)
    if listed.returncode != 0:
        raise HostsUnavailable(f"`ip netns` is unavailable: {listed.stderr.strip()}")


def skip_unavailable(exc: HostsUnavailable) -> NoReturn:
    """Skip the current test for ``exc``, or fail it where ``PILOT_TEST_REQUIRE_HOSTS=1`` (CI,
    where skipping would hide that the tests never ran)."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"hosts unavailable but {REQUIRE_ENV}=1: {exc}")
    pytest.skip(f"hosts unavailable: {exc}")


@pytest.fixture(name="network")
def network_fixture() -> Iterator[Network]:
    """The ``network`` fixture: a fresh ``Network`` for one test, torn down after it; skips
    where unavailable. A test module imports it (``from hosts import network_fixture``), so
    the name it asks for (``network``) shadows no import."""
    with contextlib.ExitStack() as stack:
        try:
            net = stack.enter_context(Network())
        except HostsUnavailable as exc:
            skip_unavailable(exc)
        yield net


def read_line(proc: subprocess.Popen[Any], timeout: float = READY_TIMEOUT_S) -> Any:
    """The next line of ``proc.stdout`` (a pipe), stripped; how a server started with ``popen``
    tells its port. Raises ``TimeoutError`` past ``timeout``, ``HostsError`` at end of file."""
    stream = proc.stdout
    assert stream is not None, "start the process with stdout=subprocess.PIPE"
    result: list[Any] = []
    reader = threading.Thread(target=lambda: result.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)  # the reader ends with the process if it never prints
    if not result:
        raise TimeoutError(f"no line from pid {proc.pid} within {timeout} s")
    if not result[0]:
        raise HostsError(f"pid {proc.pid} closed stdout (exit status {proc.poll()})")
    return result[0].strip()


def _pick_subnet() -> ipaddress.IPv4Network:
    routes = json.loads(_cmd(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout)
    taken = [
        ipaddress.ip_network(r["dst"], strict=False)
        for r in routes
        if r.get("dst", "default") != "default" and not r["dst"].startswith("0.0.0.0/")
    ]
    for second in range(200, 256):
        for third in range(256):
            candidate = ipaddress.IPv4Network(f"10.{second}.{third}.0/24")
            if not any(candidate.overlaps(t) for t in taken if t.version == 4):
                return candidate
    raise HostsUnavailable("every 10.200-255.x.0/24 overlaps a route of this machine")


class Host:
    """One host: a namespace ``netns`` whose ``eth0`` has address ``ip``. Made by
    ``Network.add_host``; its processes and namespace are owned by that ``Network``."""

    def __init__(self, net: Network, name: str, index: int, ip: str) -> None:
        self.net, self.name, self.ip = net, name, ip
        self.netns = f"{net.id}-{name}"
        self.bridge_port = f"{net.id}p{index}"  # the other end of eth0, in the switch netns
        self.ifname = IFNAME
        self._netem = False

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.ip} netns={self.netns}>"

    # processes

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this host, in a new session (so its process group can be killed
        whole); ``kw`` goes to ``subprocess.Popen``. The ``Network`` kills it at exit."""
        kw["start_new_session"] = True
        proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], **kw)
        self.net._procs.append(proc)
        return proc

    def run(
        self, argv: Sequence[str], *, timeout: float = COMMAND_TIMEOUT_S, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command inside this host; its output as text. Raises ``CommandFailed``
        on a non-zero exit when ``check``, ``subprocess.TimeoutExpired`` past ``timeout`` (after
        killing its process group)."""
        proc = self.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_groups([proc])
            proc.communicate()
            raise
        finally:
            self.net._procs.remove(proc)
        if check and proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, stderr)
        return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)

    def python(
        self, code_or_args: str | Sequence[str], *, timeout: float = COMMAND_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """``run`` this interpreter inside the host: a string is ``-c`` code, a list the
        arguments (``["-c", code, *argv]``, ``["-m", "worker", ...]``)."""
        return self.run(_python_argv(code_or_args), timeout=timeout)

    def python_popen(self, code_or_args: str | Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """``popen`` this interpreter inside the host, arguments as for ``python``."""
        return self.popen(_python_argv(code_or_args), **kw)

    def wait_tcp(
        self, ip: str, port: int, *, reachable: bool = True, timeout: float = READY_TIMEOUT_S
    ) -> None:
        """Return once a TCP connect from this host to ``ip:port`` succeeds (or, with
        ``reachable=False``, fails); one process polls with a deadline. Raises ``TimeoutError``."""
        done = self.run(
            [sys.executable, "-c", _WAIT_TCP, ip, str(port), str(int(reachable)), str(timeout)],
            timeout=timeout + COMMAND_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            state = "reachable" if reachable else "unreachable"
            raise TimeoutError(f"{ip}:{port} not {state} from {self.name} within {timeout} s")

    # faults

    def delay(self, ms: float, loss_pct: float = 0, jitter_ms: float = 0) -> None:
        """Delay (and drop ``loss_pct`` % of) every packet leaving this host, with ``tc netem``
        on its ``eth0``: a round trip to any peer grows by ``ms``. Replaces earlier settings.
        Raises ``HostsUnavailable`` where ``tc`` or the kernel's netem is missing."""
        if shutil.which("tc") is None:
            raise HostsUnavailable("`tc` not found: install iproute2")
        argv = ["tc", "-n", self.netns, "qdisc", "replace", "dev", IFNAME, "root", "netem"]
        argv += ["delay", f"{ms}ms", *([f"{jitter_ms}ms"] if jitter_ms else [])]
        argv += ["loss", f"{loss_pct}%"] if loss_pct else []
        out = _cmd(argv, check=False)
        if "qdisc kind is unknown" in out.stderr:
            raise HostsUnavailable(
                f"this kernel ({os.uname().release}) has no netem: `modprobe sch_netem` "
                "(Debian/Ubuntu: install linux-modules-extra-$(uname -r))"
            )
        if out.returncode != 0:
            raise CommandFailed(argv, out.returncode, out.stderr)
        self._netem = True

    def clear_netem(self) -> None:
        """Undo ``delay``: back to the default queue, no delay, no loss."""
        if self._netem:
            _cmd(["tc", "-n", self.netns, "qdisc", "del", "dev", IFNAME, "root"])
            self._netem = False

    def cut(self) -> None:
        """Pull this host's cable: its bridge port goes down, so every packet to or from it
        is dropped (connects time out or find no route to host; nothing is refused); open
        sockets stay open and retransmit."""
        _cmd(["ip", "-n", self.net.switch, "link", "set", self.bridge_port, "down"])

    def restore(self) -> None:
        """Plug the cable back in after ``cut``; open connections carry on."""
        _cmd(["ip", "-n", self.net.switch, "link", "set", self.bridge_port, "up"])


def _python_argv(code_or_args: str | Sequence[str]) -> list[str]:
    if isinstance(code_or_args, str):
        return [sys.executable, "-c", code_or_args]
    return [sys.executable, *code_or_args]


_WAIT_TCP = """
import socket, sys, time
ip, port, want, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", float(sys.argv[4])
deadline = time.monotonic() + timeout
while time.monotonic() < deadline:
    try:
        socket.create_connection((ip, port), timeout=0.5).close()
        ok = True
    except OSError:
        ok = False
    if ok == want:
        sys.exit(0)
    time.sleep(0.05)  # poll interval under the deadline
sys.exit(1)
"""


class Capture:
    """tcpdump on the bridge, writing raw packets (pcap) to a pipe that a thread collects.
    Made by ``Network.capture``, listening when returned; ``stop`` ends it (or the Network
    does at exit)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc
        self._data = bytearray()
        self._stderr: list[str] = []
        self._changed = threading.Condition()
        self._listening = threading.Event()
        self._threads = [
            threading.Thread(target=self._collect, daemon=True),
            threading.Thread(target=self._watch_stderr, daemon=True),
        ]
        for t in self._threads:
            t.start()
        if not self._listening.wait(READY_TIMEOUT_S):
            stderr = "".join(self._stderr)
            _kill_groups([proc])
            raise HostsError(f"tcpdump not listening within {READY_TIMEOUT_S} s: {stderr}")

    def _collect(self) -> None:
        assert self._proc.stdout is not None
        while chunk := self._proc.stdout.read1(65536):
            with self._changed:
                self._data += chunk
                self._changed.notify_all()

    def _watch_stderr(self) -> None:
        assert self._proc.stderr is not None
        for line in self._proc.stderr:
            self._stderr.append(line.decode(errors="replace"))
            if b"listening on" in line:
                self._listening.set()
        self._listening.set()  # exited: let the constructor see it and report stderr

    @property
    def pcap(self) -> bytes:
        """The pcap bytes so far (a global header, then packets)."""
        with self._changed:
            return bytes(self._data)

    def contains(self, marker: bytes) -> bool:
        """Whether ``marker`` appears in the raw packets captured so far."""
        return marker in self.pcap

    def wait_for(self, marker: bytes, timeout: float = READY_TIMEOUT_S) -> None:
        """Return once ``marker`` is captured; ``TimeoutError`` past ``timeout``."""
        with self._changed:
            if not self._changed.wait_for(lambda: marker in self._data, timeout):
                raise TimeoutError(f"{marker!r} not captured within {timeout} s")

    def stop(self) -> bytes:
        """Stop tcpdump (it flushes on SIGTERM) and return everything captured."""
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                _kill_groups([self._proc])
        for t in self._threads:
            t.join(KILL_GRACE_S)
        return self.pcap


class Network:
    """A bridge and the hosts on it; a context manager that owns and removes all it makes.
    ``subnet`` defaults to a free 10.x.y.0/24 (see the module docstring)."""

    def __init__(self, subnet: str | None = None) -> None:
        self.id = ""
        self.switch = ""
        self.subnet = ipaddress.IPv4Network(subnet) if subnet else None
        self.hosts: dict[str, Host] = {}
        self._netns: list[str] = []  # made by us, deleted in reverse order
        self._procs: list[subprocess.Popen[Any]] = []
        self._captures: list[Capture] = []
        self._lock: IO[str] | None = None  # flock held for the Network's life

    @property
    def bridge(self) -> str:
        return self.id

    def __repr__(self) -> str:
        return f"<Network {self.id} {self.subnet} hosts={list(self.hosts)}>"

    def __enter__(self) -> Network:
        check_available()
        try:
            self._setup()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._teardown()

    def _setup(self) -> None:
        self.subnet = self.subnet or _pick_subnet()
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        # The lock file appears already locked (made aside, then linked into place), before
        # anything it guards exists: `cleanup_stale` elsewhere never sees us unlocked.
        self._lock = tempfile.NamedTemporaryFile("w", dir=LOCK_DIR, prefix=".")  # noqa: SIM115
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        existing = _netns_list()
        while not self.id:
            self.id = f"{PREFIX}{secrets.token_hex(3)}"
            try:
                if any(n.startswith(self.id) for n in existing):
                    raise FileExistsError(self.id)
                os.link(self._lock.name, LOCK_DIR / f"{self.id}.lock")
            except FileExistsError:
                self.id = ""
        self.switch = f"{self.id}-switch"
        self._add_netns(self.switch)
        # Snooping off: multicast floods to every port, whoever joined (zeroconf needs it).
        bridge = ["link", "add", "name", self.bridge, "type", "bridge", "mcast_snooping", "0"]
        try:
            _cmd(["ip", "-n", self.switch, *bridge])
        except CommandFailed as exc:
            raise HostsUnavailable(f"cannot make a bridge: {exc}") from exc
        _cmd(["ip", "-n", self.switch, "link", "set", self.bridge, "up"])

    def _add_netns(self, name: str) -> None:
        out = _cmd(["ip", "netns", "add", name], check=False)
        if out.returncode != 0:
            raise HostsUnavailable(f"`ip netns add` failed: {out.stderr.strip()}")
        self._netns.append(name)

    def add_host(self, name: str) -> Host:
        """A new host ``name`` (lower-case letters and digits, up to 16) on the bridge, with the
        next address of the subnet; loopback, ``eth0`` and the multicast route are up."""
        if not HOST_NAME_RE.match(name) or name == "switch" or name in self.hosts:
            raise ValueError(f"bad or duplicate host name {name!r}: use [a-z][a-z0-9]{{0,15}}")
        assert self.subnet is not None, "use the Network as a context manager"
        index = len(self.hosts)
        host = Host(self, name, index, str(self.subnet[index + 1]))
        self._add_netns(host.netns)
        self.hosts[name] = host
        sw, ns = ["ip", "-n", self.switch], ["ip", "-n", host.netns]
        veth = ["type", "veth", "peer", "name", IFNAME, "netns", host.netns]
        _cmd([*sw, "link", "add", "name", host.bridge_port, *veth])
        _cmd([*sw, "link", "set", host.bridge_port, "master", self.bridge, "up"])
        _cmd([*ns, "link", "set", "lo", "up"])
        _cmd([*ns, "addr", "add", f"{host.ip}/{self.subnet.prefixlen}", "dev", IFNAME])
        _cmd([*ns, "link", "set", IFNAME, "up"])
        _cmd([*ns, "route", "add", MULTICAST, "dev", IFNAME])
        return host

    def capture(self, filter: str = "") -> Capture:
        """Capture raw packets crossing the bridge (every host's traffic), optionally with a
        tcpdump ``filter`` expression; listening on return. Raises ``HostsUnavailable`` where
        tcpdump is missing."""
        if shutil.which("tcpdump") is None:
            raise HostsUnavailable("`tcpdump` not found: install tcpdump")
        # -U --immediate-mode: each packet reaches the pipe as it crosses. A pipe, not a file:
        # no file for tcpdump's dropped privileges or Ubuntu's AppArmor profile to refuse.
        argv = ["ip", "netns", "exec", self.switch, "tcpdump", "-i", self.bridge, "-n", "-U"]
        argv += ["--immediate-mode", "-w", "-", *([filter] if filter else [])]
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        self._procs.append(proc)
        capture = Capture(proc)
        self._captures.append(capture)
        return capture

    def _teardown(self) -> None:
        """Each step runs whatever the one before raised; what failed is raised at the end."""
        errors: list[str] = []

        def attempt(step: Any, *args: Any) -> None:
            try:
                step(*args)
            except Exception as exc:
                errors.append(f"{step.__name__}{args}: {exc!r}")

        for capture in self._captures:
            attempt(capture.stop)
        attempt(_kill_groups, self._procs)
        for name in reversed(self._netns):  # what left its process group dies here
            attempt(_remove_netns, name)
        # Only now: a reader blocked on a pipe that an escaped child held has its end of file.
        for proc in self._procs:
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    attempt(stream.close)
        self._captures.clear()
        self._procs.clear()
        self._netns.clear()
        if self._lock is not None:
            if self.id:
                (LOCK_DIR / f"{self.id}.lock").unlink(missing_ok=True)
            self._lock.close()  # deletes the temporary name, releases the flock
            self._lock = None
        if errors:
            raise HostsError(f"teardown of {self.id} left: " + "; ".join(errors))


def _kill_groups(procs: Sequence[subprocess.Popen[Any]]) -> None:
    """SIGTERM the process groups of ``procs`` (session leaders that still run), SIGKILL
    those left past one shared grace period, and reap them."""
    running = [p for p in procs if p.poll() is None]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        deadline = time.monotonic() + KILL_GRACE_S
        for proc in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        running = [p for p in running if p.poll() is None]
    if running:
        raise HostsError(f"pids {[p.pid for p in running]} survive SIGKILL")


def _netns_list() -> list[str]:
    out = _cmd(["ip", "-j", "netns", "list"]).stdout.strip()
    return [n["name"] for n in json.loads(out or "[]")]


def _remove_netns(name: str) -> None:
    """Kill whatever still runs in namespace ``name``, then delete it (and its links)."""
    deadline = time.monotonic() + KILL_GRACE_S
    while pids := _cmd(["ip", "netns", "pids", name], check=False).stdout.split():
        if time.monotonic() > deadline:
            raise HostsError(f"processes {pids} in {name} survive SIGKILL")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.01)  # poll interval under the deadline: SIGKILL takes effect at once
    out = _cmd(["ip", "netns", "del", name], check=False)
    if out.returncode != 0 and name in _netns_list():
        raise CommandFailed(["ip", "netns", "del", name], out.returncode, out.stderr)


def cleanup_stale() -> list[str]:
    """Remove what crashed runs left: namespaces and root-namespace links named ``pp<6 hex>…``
    whose ``Network`` is dead (its lock file free or gone). Live Networks, in this process or
    another, are left alone. Returns the names removed."""
    check_available()
    links = {link["ifname"] for link in json.loads(_cmd(["ip", "-j", "link"]).stdout or "[]")}
    removed = []
    for name in [*_netns_list(), *links]:
        match = ID_RE.match(name)
        if match is None or not _owner_dead(LOCK_DIR / f"{match.group(1)}.lock"):
            continue
        if name in links:
            _cmd(["ip", "link", "del", name], check=False)
        else:
            _remove_netns(name)
        removed.append(name)
    for lock in [*LOCK_DIR.glob(f"{PREFIX}*.lock"), *LOCK_DIR.glob(".*")]:  # .*: made aside
        if _owner_dead(lock):
            lock.unlink(missing_ok=True)
    return removed


def _owner_dead(lock_path: Path) -> bool:
    try:
        with open(lock_path) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on close
    except FileNotFoundError:
        return True
    except BlockingIOError:
        return False
    return True
