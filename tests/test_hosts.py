"""The many-hosts fixture (tests/hosts.py): reachability, isolation, faults, captures, multicast
and cleanup, each checked with real processes inside real namespaces."""

from __future__ import annotations

import json
import re
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hosts import (
    LOCK_DIR,
    Host,
    HostsUnavailable,
    Network,
    check_available,
    cleanup_stale,
    network_fixture,  # noqa: F401 (provides the `network` fixture)
    read_line,
    skip_unavailable,
)

pytestmark = pytest.mark.system

ECHO_SERVER = """
import socketserver

class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)

socketserver.ThreadingTCPServer.daemon_threads = True
with socketserver.ThreadingTCPServer(("0.0.0.0", 0), Echo) as server:
    print(server.server_address[1], flush=True)
    server.serve_forever()
"""

# argv: ip port payload rounds; prints the echo and the fastest round trip in seconds.
ECHO_CLIENT = """
import socket, sys, time
ip, port, payload, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3].encode(), int(sys.argv[4])
with socket.create_connection((ip, port), timeout=10) as conn:
    best = float("inf")
    for _ in range(rounds):
        start = time.monotonic()
        conn.sendall(payload)
        got = b""
        while len(got) < len(payload):
            got += conn.recv(65536)
        best = min(best, time.monotonic() - start)
print(got.decode(), best)
"""


@pytest.fixture
def available() -> None:
    try:
        check_available()
    except HostsUnavailable as exc:
        skip_unavailable(exc)


def start_echo(host: Host) -> int:
    """An echo server inside ``host``, killed with the network; its kernel-chosen port."""
    server = host.python_popen(ECHO_SERVER, stdout=subprocess.PIPE, text=True)
    return int(read_line(server))


def echo(client: Host, ip: str, port: int, payload: str, rounds: int = 1) -> tuple[str, float]:
    out = client.python(["-c", ECHO_CLIENT, ip, str(port), payload, str(rounds)]).stdout
    got, best = out.split()
    return got, float(best)


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True).stdout
    return [n["name"] for n in json.loads(out.strip() or "[]")]


def root_links() -> list[str]:
    out = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True).stdout
    return [link["ifname"] for link in json.loads(out)]


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_two_hosts_reach_each_other_over_tcp(network: Network) -> None:
    a, b = network.add_host("a"), network.add_host("b")
    assert a.ip != b.ip and {a.ip, b.ip} <= {str(ip) for ip in network.subnet.hosts()}
    port = start_echo(a)
    b.wait_tcp(a.ip, port)
    assert echo(b, a.ip, port, "hello-from-b")[0] == "hello-from-b"
    back = start_echo(b)
    assert echo(a, b.ip, back, "hello-from-a")[0] == "hello-from-a"
    assert not [link for link in root_links() if link.startswith(network.id)]  # all elsewhere


def test_a_host_reaches_neither_the_root_loopback_nor_the_machines_addresses(
    network: Network,
) -> None:
    a = network.add_host("a")
    addrs = json.loads(subprocess.run(["ip", "-j", "-4", "addr"], capture_output=True).stdout)
    machine = [i["local"] for link in addrs for i in link["addr_info"] if i["scope"] == "global"]
    with socket.create_server(("127.0.0.1", 0)) as root_service:
        port = root_service.getsockname()[1]
        probe = (
            "import socket, errno, sys\n"
            "for ip in sys.argv[2:]:\n"
            "    try:\n"
            "        socket.create_connection((ip, int(sys.argv[1])), timeout=5).close()\n"
            "        print('connected')\n"
            "    except OSError as e:\n"
            "        print(errno.errorcode[e.errno])\n"
        )
        out = a.python(["-c", probe, str(port), "127.0.0.1", *machine]).stdout.split()
        root_service.setblocking(False)
        with pytest.raises(BlockingIOError):
            root_service.accept()
    # 127.0.0.1 is the host's own loopback (nothing listens there); nothing else has a route.
    assert out == ["ECONNREFUSED"] + ["ENETUNREACH"] * len(machine)


def test_hosts_of_two_networks_do_not_reach_each_other(network: Network) -> None:
    a = network.add_host("a")
    port = start_echo(a)
    with Network(subnet=str(network.subnet)) as other:
        stranger = other.add_host("stranger")
        with pytest.raises(TimeoutError):
            stranger.wait_tcp(a.ip, port, timeout=1.0)


def test_netem_delays_every_round_trip_and_clear_netem_removes_it(network: Network) -> None:
    a, b = network.add_host("a"), network.add_host("b")
    port = start_echo(a)
    delay_ms = 200
    try:
        a.delay(delay_ms, loss_pct=1, jitter_ms=10)
    except HostsUnavailable as exc:
        skip_unavailable(exc)
    shown = a.run(["tc", "qdisc", "show", "dev", a.ifname]).stdout
    assert "netem" in shown and re.search(r"loss 1(\.0+)?%", shown), shown
    a.delay(delay_ms)  # replaces the settings above: no jitter, no loss
    _, delayed = echo(b, a.ip, port, "slow", rounds=3)
    assert delayed >= delay_ms / 1000  # the echo leaves a through netem
    a.clear_netem()
    assert "netem" not in a.run(["tc", "qdisc", "show", "dev", a.ifname]).stdout
    _, cleared = echo(b, a.ip, port, "fast", rounds=3)
    assert cleared < delay_ms / 1000


# argv: ip port; one round trip, then another after a line on stdin, over one connection.
TWO_ROUNDS = """
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60) as conn:
    for word in (b"one", b"two"):
        conn.sendall(word)
        print(conn.recv(16).decode(), flush=True)
        sys.stdin.readline()
"""


def test_a_cut_host_is_unreachable_until_restored_and_open_connections_survive(
    network: Network,
) -> None:
    a, b = network.add_host("a"), network.add_host("b")
    port = start_echo(a)
    b.wait_tcp(a.ip, port)
    client = b.python_popen(
        ["-c", TWO_ROUNDS, a.ip, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert read_line(client) == "one"
    a.cut()
    b.wait_tcp(a.ip, port, reachable=False, timeout=10)
    client.stdin.write("go\n")  # the second round trip starts while the cable is out
    client.stdin.flush()
    a.restore()
    b.wait_tcp(a.ip, port, timeout=10)
    assert read_line(client, timeout=60) == "two"


def test_a_capture_holds_what_crossed_the_bridge_in_clear_and_nothing_else(
    network: Network,
) -> None:
    a, b = network.add_host("a"), network.add_host("b")
    port = start_echo(a)
    try:
        capture = network.capture("tcp")
    except HostsUnavailable as exc:
        skip_unavailable(exc)
    crossed, stayed = (f"marker-{secrets.token_hex(8)}" for _ in range(2))
    assert echo(a, "127.0.0.1", port, stayed)[0] == stayed  # a to itself: never on the bridge
    assert echo(b, a.ip, port, crossed)[0] == crossed
    capture.wait_for(crossed.encode())
    pcap = capture.stop()
    assert pcap[:4] in (b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4")  # a pcap file
    assert capture.contains(crossed.encode()) and crossed.encode() in pcap
    assert not capture.contains(stayed.encode())


MULTICAST_RECEIVER = """
import socket, sys
group, iface = sys.argv[1], sys.argv[2]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((group, 0))
sock.setsockopt(
    socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + socket.inet_aton(iface)
)
print(sock.getsockname()[1], flush=True)
sock.settimeout(30)
data, (source, _) = sock.recvfrom(1024)
print(data.decode(), source, flush=True)
"""

# argv: group port payload; sends until killed (UDP: the receiver takes the first that lands).
MULTICAST_SENDER = """
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    sock.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.05)  # the send interval, not a wait for start-up
"""


def test_multicast_from_one_host_reaches_another(network: Network) -> None:
    a, b = network.add_host("a"), network.add_host("b")
    group, payload = "239.255.42.99", f"hello-{secrets.token_hex(4)}"
    receiver = b.python_popen(
        ["-c", MULTICAST_RECEIVER, group, b.ip], stdout=subprocess.PIPE, text=True
    )
    port = read_line(receiver)
    a.python_popen(["-c", MULTICAST_SENDER, group, port, payload])
    assert read_line(receiver, timeout=30).split() == [payload, a.ip]


# Starts a network with a host running a daemon that left its process group; prints the
# network's id and the daemon's pid, then crashes (or exits the `with`, if argv[1] == "exit").
CRASHING_RUN = """
import os, subprocess, sys
import hosts

def run(net):
    a = net.add_host("a")
    net.capture()
    a.popen(["sleep", "600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    daemon = a.python("import subprocess as s; print(s.Popen(['sleep', '600'], "
        "start_new_session=True, stdout=s.DEVNULL, stderr=s.DEVNULL).pid)").stdout
    print(net.id, daemon.strip(), flush=True)

if sys.argv[1] == "exit":
    try:
        with hosts.Network() as net:
            run(net)
            raise RuntimeError("a failing test")
    except RuntimeError:
        pass
else:
    run(hosts.Network().__enter__())
    os._exit(1)
"""


def run_elsewhere(mode: str) -> tuple[str, int]:
    """Run CRASHING_RUN in a child interpreter; the network id and the daemon pid it left."""
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_RUN, mode],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout, done.stderr
    net_id, pid = done.stdout.split()
    return net_id, int(pid)


def test_a_network_removes_its_namespaces_links_and_processes_even_when_the_test_fails(
    available: None,
) -> None:
    net_id, daemon = run_elsewhere("exit")
    assert not [n for n in namespaces() if n.startswith(net_id)]
    assert not [link for link in root_links() if link.startswith(net_id)]
    assert not running(daemon)
    assert not (LOCK_DIR / f"{net_id}.lock").exists()


def test_cleanup_stale_removes_a_crashed_runs_leftovers_and_spares_live_networks(
    network: Network,
) -> None:
    live = network.add_host("a")
    crashed, daemon = run_elsewhere("crash")
    assert f"{crashed}-a" in namespaces() and running(daemon)
    leaked = f"pp{secrets.token_hex(3)}-leak"  # no lock file at all
    subprocess.run(["ip", "netns", "add", leaked], check=True)

    removed = cleanup_stale()

    assert set(removed) >= {leaked, f"{crashed}-a", f"{crashed}-switch"}
    left = namespaces()
    assert not [n for n in left if n.startswith((crashed, leaked))]
    assert not running(daemon)
    assert not (LOCK_DIR / f"{crashed}.lock").exists()
    assert live.netns in left and network.switch in left
    port = start_echo(live)
    live.wait_tcp(live.ip, port)
