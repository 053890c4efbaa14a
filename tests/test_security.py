"""A secure gateway (issue 11): CurveZMQ on every socket, users who own their jobs, dataset
secrets that never reach the disk. Real gateway and worker processes on loopback, real
handshakes: a key that is not a user's gets no answer, and the gateway counts it."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

import pilot
from gateway.client import Client
from gateway.protocol import (
    AuthenticationError,
    Codec,
    ConfigError,
    ConnectionInfo,
    JobCancelled,
    JobError,
    KeyPair,
    NoGateway,
    NotYourJob,
    WorkerHello,
    curve_client,
)
from pilot._cli import main
from tests_support import TEST_TIMEOUTS, wait_until

pytestmark = pytest.mark.system

QUICK = dataclasses.replace(TEST_TIMEOUTS, request_s=2.0)  # a refused client gives up soon


def pilot_cli(*argv: str) -> str:
    """``pilot ARGV...`` in this process; its stdout. Fails the test on a non-zero exit."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    assert code == 0, f"pilot {' '.join(argv)} exited {code}"
    return out.getvalue()


def add_user(cluster: pilot.LocalCluster, name: str, *extra: str) -> ConnectionInfo:
    """``pilot user add NAME`` on the cluster's state; the connection file it wrote."""
    home = cluster.home
    out = pilot_cli(
        "user", "add", name, "--state", str(home / "state"),
        "--connection-file", str(cluster.connection_file),
        "--out", str(home / f"{name}.json"), *extra,
    )  # fmt: skip
    path = Path(out.strip())
    assert path == home / f"{name}.json"
    assert path.stat().st_mode & 0o777 == 0o600
    return ConnectionInfo.load(path)


def remove_user(cluster: pilot.LocalCluster, name: str) -> None:
    pilot_cli("user", "remove", name, "--state", str(cluster.home / "state"))


def counter(admin: Client, name: str) -> int:
    return admin.status().counters.get(name, 0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pilot.LocalCluster]:
    home = tmp_path_factory.mktemp("secure")
    with pilot.LocalCluster(
        workers=1, home=home, secure=True, timeouts=TEST_TIMEOUTS, http=False
    ) as c:
        yield c


@pytest.fixture(scope="module")
def admin(cluster: pilot.LocalCluster) -> Client:
    return cluster.client()


def test_the_admins_file_holds_the_gateways_public_key_and_the_admins_keys_mode_0600(
    cluster: pilot.LocalCluster, admin: Client
) -> None:
    info = cluster.connection
    assert info is not None and info.secure and info.user == "admin"
    assert len(info.server_key) == 40 and info.secret_key and info.worker_secret_key
    assert cluster.connection_file.stat().st_mode & 0o777 == 0o600
    keys = cluster.home / "state" / "keys.json"
    assert keys.stat().st_mode & 0o777 == 0o600
    shown = repr(info) + json.dumps(info.public())
    for secret in (info.key, info.secret_key, info.worker_secret_key):
        assert secret not in shown
    assert admin.map(lambda x: x * 2, range(4)).wait(30).results == [0, 2, 4, 6]


def test_a_gateway_logs_and_prints_no_secret(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "PILOT_HOME": str(home), "PILOT_LOG_LEVEL": "DEBUG"}
    log = tmp_path / "gateway.log"
    with open(log, "wb") as err:
        gw = subprocess.Popen(
            [sys.executable, "-m", "pilot", "gateway", "--secure", "--ready-line",
             "--http-port", "none"],
            stdout=subprocess.PIPE, stderr=err, env=env,
        )  # fmt: skip
        try:
            assert gw.stdout is not None
            ready = gw.stdout.readline().decode()
            info = ConnectionInfo.load(home / "connection.json")
            with Client(info, timeouts=QUICK) as c:  # a handshake and a few messages
                c.status()
            with pytest.raises(NoGateway):  # a refused one, logged
                Client(dataclasses.replace(info, **_keys()), timeouts=QUICK)
        finally:
            gw.terminate()
            gw.wait(30)
            if gw.stdout is not None:
                gw.stdout.close()
    logged = log.read_text()
    assert ready.startswith("READY ") and info.server_key in ready
    assert "refused a handshake" in logged
    for secret in (info.key, info.secret_key, info.worker_secret_key):
        assert secret not in ready and secret not in logged


def _keys() -> dict[str, str]:
    pair = KeyPair.new()
    return {"public_key": pair.public, "secret_key": pair.secret}


def test_a_peer_without_the_right_keys_gets_no_answer_and_is_counted(
    cluster: pilot.LocalCluster, admin: Client
) -> None:
    info = cluster.connection
    assert info is not None
    before = counter(admin, "refused_handshakes")
    with pytest.raises(NoGateway, match="does not answer keys it does not know"):
        Client(dataclasses.replace(info, **_keys()), timeouts=QUICK)  # a stranger's keys
    other = dataclasses.replace(info, server_key=KeyPair.new().public)
    with pytest.raises(NoGateway):
        Client(other, timeouts=QUICK)  # another gateway's file: the handshake cannot finish
    plain = dataclasses.replace(info, server_key="")
    with pytest.raises(NoGateway):
        Client(plain, timeouts=QUICK)  # no encryption at all
    wait_until(lambda: counter(admin, "refused_handshakes") > before, 10, "a counted refusal")


def test_users_see_attach_to_read_and_cancel_only_their_own_jobs(
    cluster: pilot.LocalCluster, admin: Client
) -> None:
    alice_info, bob_info = add_user(cluster, "alice"), add_user(cluster, "bob")
    assert alice_info.user == "alice" and not alice_info.worker_secret_key
    with Client(alice_info) as alice, Client(bob_info) as bob:
        done = alice.map(lambda x: print("alice says", x) or x + 1, range(3), name="mine")
        assert done.wait(30).results == [1, 2, 3]
        assert [j.job_id for j in alice.jobs()] == [done.id]
        assert alice.jobs()[0].owner == "alice"
        assert done.id not in [j.job_id for j in bob.jobs()]
        admin_view = {j.job_id: j.owner for j in admin.jobs()}
        assert admin_view[done.id] == "alice"
        with pytest.raises(NotYourJob, match="not yours"):
            bob.attach(done.id)
        with pytest.raises(NotYourJob):
            bob.logs(done.id)
        assert any(b"alice says" in o.data for o in admin.logs(done.id))
        assert admin.attach(done.id).wait(10).results == [1, 2, 3]

        running = alice.submit(time.sleep, 60)
        wait_until(lambda: [j.job_id for j in alice.status().jobs] == [running.id], 20)
        assert alice.status().jobs[0].owner == "alice"
        assert bob.status().jobs == ()
        assert running.id in [j.job_id for j in admin.status().jobs]
        refused = counter(admin, "not_yours")
        bob.cancel(running.id)
        wait_until(lambda: counter(admin, "not_yours") > refused, 10, "bob's cancel refused")
        assert not running.done()
        alice.cancel(running.id)
        with pytest.raises(JobCancelled):
            running.wait(30)


def test_worker_credentials_cannot_submit_and_user_credentials_cannot_register(
    cluster: pilot.LocalCluster, admin: Client
) -> None:
    rack = add_user(cluster, "rack1", "--worker")
    carol = add_user(cluster, "carol")
    with pytest.raises(ConfigError, match="cannot submit"):
        Client(rack)
    before = counter(admin, "refused_handshakes")
    forced = dataclasses.replace(rack, public_key=rack.worker_public_key,
                                 secret_key=rack.worker_secret_key)  # fmt: skip
    with pytest.raises(NoGateway):
        Client(forced, timeouts=QUICK)  # a worker key on the client socket
    assert not hello_is_answered(rack.worker_url, rack, KeyPair(carol.public_key, carol.secret_key))
    wait_until(lambda: counter(admin, "refused_handshakes") >= before + 2, 10, "two refusals")
    refused = subprocess.run(
        [sys.executable, "-m", "pilot", "worker", "--connect", str(cluster.home / "carol.json")],
        capture_output=True, text=True, timeout=60, env=cluster.env,
    )  # fmt: skip
    assert refused.returncode == 1 and "cannot register a worker" in refused.stderr

    # The worker credential registers a worker; removing it sends that worker away.
    worker = cluster.add_worker("--connect", str(cluster.home / "rack1.json"), name="rack1-w")
    cluster.wait_for_workers(2)
    remove_user(cluster, "rack1")
    assert worker.wait(30) == 0
    assert "rack1-w" not in [w.name for w in admin.status().workers]


def hello_is_answered(url: str, info: ConnectionInfo, keys: KeyPair) -> bool:
    """Whether the gateway's worker socket answers a signed hello sent with ``keys``."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.ROUTING_ID, b"intruder")
        sock.setsockopt(zmq.LINGER, 0)
        curve_client(sock, info.server_key, keys)
        sock.connect(url)
        sock.send_multipart(Codec(info.key).encode(WorkerHello("intruder", 1, 1, 1 << 30)))
        return bool(sock.poll(2000))
    finally:
        sock.close(0)
        ctx.term()


def test_a_user_added_is_let_in_at_once_and_a_user_removed_is_refused_at_once(
    cluster: pilot.LocalCluster,
) -> None:
    dave_info = add_user(cluster, "dave")
    listed = pilot_cli("user", "list", "--state", str(cluster.home / "state"))
    assert "dave" in listed and "user" in listed and dave_info.secret_key not in listed
    with Client(dave_info) as dave:
        assert dave.jobs() == []
        remove_user(cluster, "dave")
        with pytest.raises(AuthenticationError, match="removed from this gateway"):
            dave.jobs()
    with pytest.raises(NoGateway):
        Client(dave_info, timeouts=QUICK)
    assert "dave" not in pilot_cli("user", "list", "--state", str(cluster.home / "state"))


def secret_job(client: Client, tmp_path: Path, secret: str, seconds: float = 0.0) -> pilot.Job:
    """A job over a local dataset whose storage options hold ``secret``; each item reads its
    file (and sleeps ``seconds``)."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for i in range(3):
        (data / f"{i}.txt").write_text(f"row {i}")

    def read(item: int, rows: list[str]) -> str:
        time.sleep(seconds)
        return "".join(Path(p).read_text() for p in rows)

    return client.map(read, range(3), data={"rows": str(data)},
                      storage_options={"token": secret})  # fmt: skip


def test_dataset_secrets_travel_encrypted_and_never_reach_the_disk(
    cluster: pilot.LocalCluster, admin: Client, tmp_path: Path
) -> None:
    secret = f"tok-{os.urandom(8).hex()}"
    job = secret_job(admin, tmp_path, secret)
    assert job.wait(60).results == ["row 0", "row 1", "row 2"]
    assert secret not in repr(job.spec)
    replayed = admin.attach(job.id).spec
    assert replayed is not None and replayed.data is not None
    assert replayed.data.refs[0].storage_options == {"token": "***"}
    stored = b"".join(p.read_bytes() for p in (cluster.home / "state").glob("state.sqlite*"))
    assert job.id.encode() in stored  # the job is there (so the test can fail)...
    assert secret.encode() not in stored  # ...its secret is not


def test_an_insecure_gateway_takes_no_dataset_secret(tmp_path: Path) -> None:
    with pilot.LocalCluster(workers=1, home=tmp_path / "plain", http=False) as c:
        client = c.client()
        with pytest.raises(ConfigError, match="start it with --secure"):
            secret_job(client, tmp_path, "tok-plain")


def test_a_gateway_restart_loses_the_secrets_and_the_job_says_so(tmp_path: Path) -> None:
    home = tmp_path / "restart"
    with pilot.LocalCluster(
        workers=1, home=home, secure=True, timeouts=TEST_TIMEOUTS, http=False
    ) as c:
        client = c.client()
        job = secret_job(client, tmp_path, "tok-restart", seconds=30)
        wait_until(lambda: client.status().jobs and client.status().jobs[0].state > 0, 20)
        c.kill_gateway()
        c.start_gateway()
        with pytest.raises(JobError, match="kept in the gateway's memory only"):
            job.wait(60)
        # the same keys after the restart: this client reconnected by itself
        assert client.map(abs, [-1]).wait(60).results == [1]


def test_a_stored_spec_has_its_secrets_redacted_and_marked(tmp_path: Path) -> None:
    from gateway.protocol import DataRef, JobData, JobKind, JobSpec
    from gateway.server._secrets import for_disk, has_secrets, lost_secrets

    ref = DataRef("d", "s3://b/x", ("s3://b/x/1",), "local", {"key": "AKIA", "region": "eu"})
    spec = JobSpec("j1", "f", JobKind.MAP, "digest", 1, data=JobData((ref,)))
    stored = for_disk(spec)
    assert has_secrets(spec) and not lost_secrets(spec)
    assert stored.data is not None and stored.data.refs[0].storage_options == {
        "key": "***",
        "region": "eu",
    }
    assert lost_secrets(stored) and spec.data is not None  # the original is untouched
    plain = dataclasses.replace(spec, data=None)
    assert for_disk(plain) is plain


def test_user_names_are_checked_and_each_is_added_once(tmp_path: Path) -> None:
    from gateway.server import add_user, list_users, remove_user

    entry, keys = add_user(tmp_path, "erin")
    assert entry.public_key == keys.public and keys.secret not in repr(keys)
    assert (tmp_path / "users.json").stat().st_mode & 0o777 == 0o600
    assert keys.secret not in (tmp_path / "users.json").read_text()
    for bad in ("admin", "", "a b", "../x"):
        with pytest.raises(ConfigError):
            add_user(tmp_path, bad)
    with pytest.raises(ConfigError, match="exists"):
        add_user(tmp_path, "erin")
    assert [u.name for u in list_users(tmp_path)] == ["erin"]
    assert remove_user(tmp_path, "erin") and not remove_user(tmp_path, "erin")
