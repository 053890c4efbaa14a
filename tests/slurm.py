"""A real single-node Slurm on this machine, for system tests.

Who uses it: the Slurm tests (``tests/test_slurm.py``), through the ``slurm`` fixture
(``from slurm import slurm_fixture``). Needs root and Debian's ``slurm-wlm`` and ``munge``
(``scripts/test`` installs them when missing). Where something is missing, ``SlurmUnavailable``
says what; tests skip on it, or fail where ``PILOT_TEST_REQUIRE_SLURM=1`` (set it in CI).

The contract::

    with SlurmCluster() as slurm:             # or the `slurm` fixture (one per test module)
        slurm.env                             # {"SLURM_CONF": ...}: for sbatch, squeue, scancel
        slurm.run("squeue", "-h")             # a Slurm command against this cluster
        slurm.partition, slurm.cpus           # the one partition, the node's CPUs
        slurm.cancel_all()                    # every job gone (a deadline, never a sleep)

What it starts, all as children of the test process, in the foreground, each with a deadline to
be ready: ``munged`` (a fresh key, its socket under the temp dir), ``slurmctld`` and ``slurmd``
(``-D -f slurm.conf``), on free TCP ports, every state, spool, log and pid file under one temp
dir. The ``slurm.conf`` describes this machine (``slurmd -C``: its CPUs and memory) as one node
on 127.0.0.1 in one partition, with ``ProctrackType=proctrack/linuxproc`` and
``TaskPlugin=task/none`` (no cgroups needed), ``SelectType=select/cons_tres``, and
``SlurmdParameters=config_overrides`` so the node may offer more CPUs than it has (``cpus``):
worker jobs idle most of the time, and a 2-core machine still holds several.

Ownership: ``__exit__`` (on failure too) cancels every job and waits for them to end, stops
``slurmd``, ``slurmctld`` and ``munged`` (SIGTERM, then SIGKILL past ``KILL_GRACE_S``), kills
any job process that outlived them (a process whose environment names this cluster's
``SLURM_CONF``), and removes the temp dir. Nothing is installed outside it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import psutil
import pytest

REQUIRE_ENV = "PILOT_TEST_REQUIRE_SLURM"  # "1": an unavailable Slurm fails tests instead of skip
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "scontrol")
READY_TIMEOUT_S = 60.0
DAEMONS = ("munged", "slurmctld", "slurmscriptd", "slurmd")
KILL_GRACE_S = 10.0
JOBS_GONE_TIMEOUT_S = 60.0
PARTITION = "pilot"
NODE = "pilotnode"
CLUSTER_CPUS = 4  # offered by the node, whatever the machine has (config_overrides)
KILL_WAIT_S = 30  # Slurm's SIGTERM-to-SIGKILL delay for a cancelled or timed-out job


class SlurmUnavailable(Exception):
    """Slurm cannot run here (not root, a binary missing): what, and how to fix it."""


def skip_unavailable(exc: SlurmUnavailable) -> NoReturn:
    """Skip the test with the reason, or fail it where ``PILOT_TEST_REQUIRE_SLURM=1``."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"Slurm unavailable but {REQUIRE_ENV}=1: {exc}")
    pytest.skip(f"Slurm unavailable: {exc}")


@pytest.fixture(name="slurm", scope="module")
def slurm_fixture() -> Iterator[SlurmCluster]:
    """A ``SlurmCluster`` for one test module; skips where unavailable. The environment of the
    test process gets ``SLURM_CONF`` while it runs (so ``pilot.SlurmWorkers`` finds it)."""
    try:
        cluster = SlurmCluster()
        cluster.start()
    except SlurmUnavailable as exc:
        skip_unavailable(exc)
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        cluster.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SlurmCluster:
    """See the module docstring."""

    def __init__(self, cpus: int = CLUSTER_CPUS) -> None:
        self.cpus = cpus
        self.partition = PARTITION
        self.dir = Path(tempfile.mkdtemp(prefix="pilot-slurm-"))
        self.conf = self.dir / "slurm.conf"
        self.socket = self.dir / "munge" / "munge.socket"
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- start ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start munged, slurmctld and slurmd; return when the node is idle. Raises
        ``SlurmUnavailable`` (nothing started) or ``RuntimeError`` (what failed, its log)."""
        if os.geteuid() != 0:
            self._remove_dir()
            raise SlurmUnavailable("the Slurm daemons run as root here; run the tests as root")
        missing = [b for b in BINARIES if shutil.which(b) is None]
        if missing:
            self._remove_dir()
            raise SlurmUnavailable(
                f"{', '.join(missing)} not found: install Debian's slurm-wlm and munge"
            )
        try:
            self._start_munge()
            self._write_conf()
            self._daemon("slurmctld", "-D", "-f", str(self.conf))
            self._daemon("slurmd", "-D", "-f", str(self.conf), "-N", NODE)
            self._wait_idle()
        except BaseException:
            self.stop()
            raise

    def _start_munge(self) -> None:
        mdir = self.socket.parent
        mdir.mkdir()
        for d in (self.dir, mdir):
            d.chmod(0o711)  # clients reach the socket; the key stays the owner's (0400)
        key = mdir / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(1024))
        self._daemon(
            "munged",
            "--foreground",
            "--force",  # root, and a temp dir under /tmp: fine for a test
            f"--socket={self.socket}",
            f"--key-file={key}",
            f"--pid-file={mdir / 'munged.pid'}",
            f"--seed-file={mdir / 'munged.seed'}",
            f"--log-file={self.dir / 'munged.log'}",
        )
        self._wait(lambda: self.socket.exists(), "munged's socket", "munged.log")

    def _write_conf(self) -> None:
        hw = _node_hardware()
        for d in ("state", "spool", "log"):
            (self.dir / d).mkdir()
        lines = [
            "ClusterName=pilottest",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/builtin",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            f"KillWait={KILL_WAIT_S}",
            "MinJobAge=2",  # finished jobs leave squeue/scontrol quickly
            "MailProg=/bin/true",
            f"StateSaveLocation={self.dir / 'state'}",
            f"SlurmdSpoolDir={self.dir / 'spool'}",
            f"SlurmctldPidFile={self.dir / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.dir / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.dir / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.dir / 'log' / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} "
            f"CPUs={self.cpus} RealMemory={hw['RealMemory']} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _daemon(self, *cmd: str) -> None:
        log = open(self.dir / f"{cmd[0]}.out", "wb")  # noqa: SIM115 (closed with the process)
        with log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env},
                start_new_session=True,  # a Ctrl-C at the terminal is the fixture's to handle
            )
        self._procs.append(proc)

    def _wait_idle(self) -> None:
        def idle() -> bool:
            out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
            return out.strip() in ("idle", "idle~")

        self._wait(idle, f"node {NODE} idle in sinfo", "log/slurmd.log")

    def _wait(self, predicate: Callable[[], bool], what: str, log: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not predicate():
            for p in self._procs:
                if p.poll() is not None:
                    raise RuntimeError(
                        f"{p.args[0]} exited with {p.returncode} while waiting for {what}:\n"
                        + self._tail(f"{p.args[0]}.out")
                        + self._tail(log)
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}:\n{self._tail(log)}")
            time.sleep(0.1)  # a poll interval under a deadline

    def _tail(self, name: str, lines: int = 30) -> str:
        try:
            text = (self.dir / name).read_text(errors="replace")
        except OSError:
            return ""
        return f"--- {name}\n" + "\n".join(text.splitlines()[-lines:]) + "\n"

    # -- use --------------------------------------------------------------------------------

    def run(self, *cmd: str, check: bool = True) -> str:
        """A Slurm command against this cluster; its stdout. Raises ``RuntimeError`` with its
        stderr when it fails and ``check``."""
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, **self.env}, timeout=60
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def job_ids(self) -> list[str]:
        """The ids of the jobs in the queue (any state but gone)."""
        return self.run("squeue", "-h", "-o", "%i", check=False).split()

    def job_state(self, job_id: str) -> str:
        """``PENDING``, ``RUNNING``, ... or "" once the job has left the queue."""
        return self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).strip()

    def cancel_all(self, timeout: float = JOBS_GONE_TIMEOUT_S) -> None:
        """Cancel every job; return once none is left (their processes have ended)."""
        ids = self.job_ids()
        if ids:
            self.run("scancel", *ids, check=False)
        deadline = time.monotonic() + timeout
        while self.job_ids() or self._job_processes():
            if time.monotonic() > deadline:
                raise RuntimeError(f"jobs still there after {timeout}s: {self.job_ids()}")
            time.sleep(0.1)  # a poll interval under a deadline

    # -- stop -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Everything started, stopped; the temp dir removed. Safe to call twice."""
        try:
            if self._procs and all(p.poll() is None for p in self._procs[:3]):
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    self.cancel_all()
        finally:
            for p in reversed(self._procs):
                _terminate(p)
            self._procs.clear()
            for proc in self._job_processes():  # what a dead slurmd left behind
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            self._remove_dir()

    def _job_processes(self) -> list[psutil.Process]:
        """Processes of this cluster's jobs: a ``slurmstepd`` of our ``slurmd`` (it has our
        ``SLURM_CONF``), or what a job runs (our ``SLURM_CONF`` and a ``SLURM_JOB_ID``; the
        test process and a gateway it started have the first, not the second)."""
        mine = f"SLURM_CONF={self.conf}\n"
        found = []
        for proc in psutil.process_iter(["pid", "name"]):
            if proc.pid == os.getpid() or proc.info["name"] in DAEMONS:
                continue
            try:
                env = _environ_text(proc.pid)
            except OSError:
                continue
            if mine in env and (proc.info["name"] == "slurmstepd" or "\nSLURM_JOB_ID=" in env):
                found.append(proc)
        return found

    def _remove_dir(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _environ_text(pid: int) -> str:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        return "\n" + fh.read().decode(errors="replace").replace("\0", "\n")


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _node_hardware() -> dict[str, str]:
    """This machine as ``slurmd -C`` sees it (``CPUs``, ``RealMemory``, ...)."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
    if "RealMemory" not in fields:
        raise RuntimeError(f"`slurmd -C` said nothing usable: {out!r}")
    return fields
