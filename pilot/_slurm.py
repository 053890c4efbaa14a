"""``SlurmWorkers``: Parallel Pilot workers as Slurm jobs, placed by the cluster's own scheduler.

Who calls it: ``pilot scale slurm`` (``pilot._scale_cli``) and users, the way dask-jobqueue's
``SLURMCluster`` is used::

    workers = pilot.SlurmWorkers(partition="gpu", gpus=1, cpus=8, mem="32G", time="4:00:00")
    print(workers.script())          # the batch script each worker job runs (keep it, edit it)
    workers.scale(4)                 # four worker jobs in Slurm's queue (submits or drains)
    workers.jobs()                   # ours, as squeue sees them
    controller = workers.adapt(min=0, max=16)   # grow with waiting tasks, shrink when idle

Each worker job runs ``pilot worker --connect FILE --slots CPUS`` (``exec``-ed, so the worker is
the job's batch shell), connects out to the gateway with the keys of the connection file (which
every node must read: a shared home directory) and registers its Slurm job id
(``PILOT_SLURM_JOB_ID``), which ``pilot status`` shows and the adaptive controller matches.

Ending well: the script asks Slurm for ``--signal=B:TERM@WARNING_S``, so the worker gets SIGTERM
before its time limit and drains (hands back queued tasks, finishes running ones within its
stop grace, says goodbye). ``drain()`` sends the same signal on demand (``scancel --batch
--signal=TERM``), which is how ``scale`` and the controller shrink the pool without killing a
task. ``cancel()`` is plain ``scancel``: Slurm signals every process of the job, running tasks
die and the gateway runs them again elsewhere (each result is still recorded once).

Errors: ``ConfigError`` when ``sbatch`` (or ``squeue``/``scancel``) is not on ``PATH``, when
Slurm refuses a request (a partition that does not exist, a time limit or account it rejects:
Slurm's own message is in ours), or when the options make no sense; ``NoGateway`` when the
connection file is missing; ``PilotTimeout`` when a Slurm command does not answer.

Networking: the gateway must listen on an address the compute nodes reach (``pilot gateway
--bind 0.0.0.0``). A gateway bound to every interface writes ``tcp://0.0.0.0:PORT`` in its
connection file, which only works on its own host; for the workers, ``submit`` then writes a copy
of the file (``LOG_DIR/connection.json``, mode 0600) whose URLs name ``gateway_host`` (default:
this host's name, where ``pilot scale`` runs beside the gateway), and the script points there.

Settings are values: the environment (``PATH``, ``PILOT_HOME``, ``SLURM_CONF``) is read once, at
construction, from ``env`` (default ``os.environ``); the Slurm commands run with it.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from gateway.protocol import (
    ConfigError,
    ConnectionInfo,
    NoGateway,
    PilotTimeout,
    Resources,
    default_home,
)
from pilot._adapt import Adaptive

__all__ = ["SlurmJob", "SlurmWorkers"]

log = logging.getLogger("pilot.slurm")

JOB_NAME = "pilot-worker"
WARNING_S = 120  # SIGTERM this long before the time limit: the worker's stop grace and a margin
EXIT_MARGIN_S = 20  # of the warning, what a worker needs after its stop grace to hand back and go
SLURM_COMMAND_TIMEOUT_S = 60.0  # sbatch/squeue/scancel retry a silent slurmctld for a long time
# Node-local, shared by this user's workers on a node (the cache coordinates them by file locks).
DEFAULT_CACHE_DIR = "${TMPDIR:-/tmp}/pilot-cache-$(id -u)"
# Job states after which a job holds no worker any more (squeue shows some of them briefly).
_FAILURES = ("BOOT_FAIL", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")
_ENDINGS = ("CANCELLED", "COMPLETED", "COMPLETING", "REVOKED", "SPECIAL_EXIT", "TIMEOUT")
ENDED_STATES = frozenset(_FAILURES + _ENDINGS)
WILDCARDS = ("0.0.0.0", "*", "[::]", "::")
LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")
# scancel's complaints about a job that has already gone: the wanted outcome, not an error.
_GONE = ("already completing or completed", "Invalid job id specified")


@dataclass(frozen=True, slots=True)
class SlurmJob:
    """One of our worker jobs as ``squeue`` sees it. ``state`` is Slurm's (``PENDING``,
    ``RUNNING``, ...); ``reason`` why it is pending, or the node it runs on."""

    job_id: str
    state: str
    reason: str = ""

    @property
    def active(self) -> bool:
        """Pending or running: it holds, or will hold, a worker."""
        return self.state not in ENDED_STATES

    @property
    def pending(self) -> bool:
        return self.state == "PENDING"


class SlurmWorkers:
    """Worker jobs of one shape (resources per job) in Slurm; see the module docstring.

    ``cpus`` is both ``--cpus-per-task`` and the worker's slots; ``gpus`` asks ``--gres=gpu:G``
    (the worker sees the GPUs Slurm gives it); ``mem``, ``time``, ``partition``, ``account``,
    ``qos`` and ``constraint`` are passed as Slurm spells them (``"32G"``, ``"4:00:00"``);
    ``sbatch_args`` are more ``#SBATCH`` directives (``"--exclusive"``, ``"--mail-type=END"``);
    ``worker_args`` more ``pilot worker`` options (``"--cache-size=100GB"``).
    ``connection`` is the gateway's connection file (default ``$PILOT_HOME/connection.json``);
    ``python`` the interpreter that runs ``pilot worker`` on the nodes (this one by default: a
    virtual environment on a shared file system). ``job_name`` marks our jobs in the queue:
    ``jobs()``, ``scale()`` and the controller count only jobs of this name and user.
    ``log_dir`` gets one output file per job (default ``$PILOT_HOME/slurm``).
    ``gateway_host``: the gateway's address as the nodes reach it, for a gateway bound to every
    interface (see the module docstring).
    """

    def __init__(
        self,
        *,
        partition: str | None = None,
        cpus: int = 1,
        gpus: int = 0,
        mem: str | None = None,
        time: str | None = None,
        account: str | None = None,
        qos: str | None = None,
        constraint: str | None = None,
        sbatch_args: Sequence[str] = (),
        connection: str | Path | None = None,
        python: str = sys.executable,
        tags: Sequence[str] = (),
        worker_args: Sequence[str] = (),
        job_name: str = JOB_NAME,
        log_dir: str | Path | None = None,
        cache_dir: str = DEFAULT_CACHE_DIR,
        warning_s: int = WARNING_S,
        gateway_host: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if cpus < 1:
            raise ConfigError(f"A worker job needs at least 1 CPU (got cpus={cpus}).")
        if gpus < 0 or warning_s < 0:
            raise ConfigError("gpus and warning_s cannot be negative.")
        for arg in sbatch_args:
            if not arg.startswith("-") or "\n" in arg:
                raise ConfigError(
                    f"sbatch argument {arg!r}: give each as Slurm spells it on the command "
                    "line, e.g. --sbatch-arg=--exclusive or --sbatch-arg=--mail-type=END."
                )
        self.env = dict(os.environ if env is None else env)
        if connection is not None and str(connection).startswith(("tcp://", "ipc://")):
            raise ConfigError(
                "Slurm workers connect with the gateway's connection file (it holds the key, "
                "which must not be written into a job script): pass its path, on a file system "
                "the compute nodes share."
            )
        home = default_home(self.env)
        self.connection = Path(connection or home / "connection.json").expanduser().absolute()
        self.partition, self.cpus, self.gpus = partition, cpus, gpus
        self.mem, self.time, self.account, self.qos = mem, time, account, qos
        self.constraint = constraint
        self.sbatch_args = tuple(sbatch_args)
        self.python = python
        self.tags = tuple(tags)
        self.worker_args = tuple(worker_args)
        self.job_name = job_name
        self.log_dir = Path(log_dir or home / "slurm").expanduser().absolute()
        self.cache_dir = cache_dir
        self.warning_s = warning_s
        self.gateway_host = gateway_host

    def can_run(self, resources: Resources) -> bool:
        """Whether one of these workers can run a task that needs ``resources``."""
        return (
            max(1, resources.cpus) <= self.cpus
            and resources.gpus <= self.gpus
            and set(resources.tags) <= set(self.tags)
        )

    # -- the script --------------------------------------------------------------------------

    def script(self) -> str:
        """The batch script of one worker job: ``scale(n)`` submits it ``n`` times."""
        directives = [
            f"--job-name={self.job_name}",
            "--nodes=1",
            "--ntasks=1",
            f"--cpus-per-task={self.cpus}",
        ]
        named = {
            "partition": self.partition,
            "mem": self.mem,
            "time": self.time,
            "account": self.account,
            "qos": self.qos,
            "constraint": self.constraint,
        }
        directives += [f"--{k}={v}" for k, v in named.items() if v]
        if self.gpus:
            directives.append(f"--gres=gpu:{self.gpus}")
        directives.append(f"--output={self.log_dir / (self.job_name + '-%j.out')}")
        directives.append(f"--signal=B:TERM@{self.warning_s}")
        directives += self.sbatch_args
        worker = [
            self.python,
            "-m",
            "pilot",
            "worker",
            "--connect",
            str(self._worker_connection()[0]),
            "--slots",
            str(self.cpus),
        ]
        if self.tags:
            worker += ["--tags", ",".join(self.tags)]
        if self.warning_s:  # running tasks may use the warning, but for the margin to leave
            worker += ["--stop-grace", str(max(1, self.warning_s - EXIT_MARGIN_S))]
        worker += self.worker_args
        command = " ".join(shlex.quote(a) for a in worker)
        return "\n".join(
            [
                "#!/bin/bash",
                "# A Parallel Pilot worker as a Slurm job (written by `pilot scale slurm`; keep",
                "# it, edit it, submit it with `sbatch FILE`). The worker connects out to the",
                "# gateway with the keys of the connection file, which the nodes must be able",
                "# to read (a shared home directory), and needs no inbound port.",
                *(f"#SBATCH {d}" for d in directives),
                f"# --signal: SIGTERM to the worker {self.warning_s} s before the time limit: it",
                "# hands back queued tasks, finishes running ones, says goodbye and exits.",
                'export PILOT_SLURM_JOB_ID="$SLURM_JOB_ID"',
                "# exec: the worker is the batch shell, the process --signal=B: reaches.",
                f'exec {command} --name "slurm-$SLURM_JOB_ID" --cache-dir "{self.cache_dir}"',
                "",
            ]
        )

    # -- Slurm commands ----------------------------------------------------------------------

    def submit(self, n: int = 1) -> list[str]:
        """Submit ``n`` worker jobs; return their Slurm job ids. Raises ``NoGateway`` when
        the connection file is missing, ``ConfigError`` with Slurm's message when it refuses
        (after the jobs it took: their ids are in the message)."""
        if n <= 0:
            return []
        if not self.connection.exists():
            raise NoGateway(
                f"No gateway found: {self.connection} does not exist. Start the gateway first "
                "(`pilot gateway --bind 0.0.0.0` on a host the compute nodes reach), or give "
                "its connection file with --connect."
            )
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path, info = self._worker_connection()
        if info is not None:
            info.save(path)
            log.info("workers reach the gateway at %s (see gateway_host)", info.worker_url)
        elif _host(ConnectionInfo.load(path).worker_url) in LOOPBACK:
            log.warning(
                "the gateway listens on the loopback interface only: workers on other nodes "
                "cannot reach it. Start it with `pilot gateway --bind 0.0.0.0` (or an address "
                "the nodes reach)."
            )
        script = self.script()
        ids: list[str] = []
        for _ in range(n):
            try:
                out = self._run("sbatch", "--parsable", stdin=script)
            except ConfigError as exc:
                if not ids:
                    raise
                raise ConfigError(
                    f"Submitted {len(ids)} of {n} worker jobs ({', '.join(ids)}); {exc}"
                ) from exc
            ids.append(out.strip().split(";")[0])
        log.info("submitted %d worker job(s): %s", len(ids), ", ".join(ids))
        return ids

    def jobs(self) -> list[SlurmJob]:
        """Our worker jobs in Slurm's queue (this user, this job name), oldest first."""
        uid = str(os.getuid())  # sbatch submits as this user, whatever $USER says
        out = self._run("squeue", "-h", "-u", uid, "-n", self.job_name, "-o", "%i|%T|%R")
        jobs = []
        for line in out.splitlines():
            job_id, state, reason = [*line.split("|", 2), "", ""][:3]
            if job_id.strip():
                jobs.append(SlurmJob(job_id.strip(), state.strip(), reason.strip()))
        return sorted(jobs, key=lambda j: _id_key(j.job_id))

    def cancel(self, job_ids: Iterable[str]) -> None:
        """``scancel``: pending jobs leave the queue; running ones get Slurm's SIGTERM (every
        process: running tasks die and run again elsewhere), then SIGKILL after KillWait."""
        ids = list(job_ids)
        if ids:
            self._scancel(*ids)

    def drain(self, jobs: Iterable[SlurmJob]) -> None:
        """End workers gently: a pending job is cancelled; a running one's worker gets SIGTERM
        (``scancel --batch --signal=TERM``) and drains: it hands back queued tasks, finishes
        running ones, says goodbye and ends its job."""
        jobs = list(jobs)
        pending = [j.job_id for j in jobs if j.pending]
        running = [j.job_id for j in jobs if not j.pending and j.active]
        if pending:
            self._scancel(*pending)
        if running:
            self._scancel("--batch", "--signal=TERM", *running)

    def scale(self, n: int) -> list[str]:
        """Have ``n`` worker jobs in the queue: submit the missing ones (their ids are
        returned), or drain the surplus (pending ones first, then the newest)."""
        if n < 0:
            raise ConfigError(f"Cannot scale to {n} workers.")
        active = [j for j in self.jobs() if j.active]
        if len(active) < n:
            return self.submit(n - len(active))
        surplus = sorted(active, key=lambda j: (not j.pending, -_id_key(j.job_id)))
        self.drain(surplus[: len(active) - n])
        return []

    def adapt(
        self,
        min: int = 0,  # dask-jobqueue's names
        max: int = 16,
        *,
        idle_grace_s: float = 60.0,
        interval_s: float = 2.0,
    ) -> Adaptive:
        """Start the adaptive controller in a background thread and return it (``stop()`` it,
        or use it as a context manager): see ``pilot._adapt``."""
        controller = Adaptive(
            self, minimum=min, maximum=max, idle_grace_s=idle_grace_s, interval_s=interval_s
        )
        controller.start()
        return controller

    def _scancel(self, *args: str) -> None:
        try:
            self._run("scancel", *args)
        except ConfigError as exc:
            if not any(g in str(exc) for g in _GONE):
                raise

    def _run(self, command: str, *args: str, stdin: str | None = None) -> str:
        path = shutil.which(command, path=self.env.get("PATH"))
        if path is None:
            raise ConfigError(
                f"`{command}` was not found on PATH: Slurm's commands are needed here. Run "
                "this on the cluster's login node (or load Slurm's module: `module load slurm`)."
            )
        try:
            proc = subprocess.run(
                [path, *args],
                input=stdin,
                capture_output=True,
                text=True,
                env=self.env,
                timeout=SLURM_COMMAND_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            raise PilotTimeout(
                f"`{command}` did not answer within {SLURM_COMMAND_TIMEOUT_S:.0f}s: is Slurm's "
                "controller (slurmctld) up? `sinfo` says."
            ) from None
        if proc.returncode != 0:
            said = proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}"
            raise ConfigError(f"Slurm refused `{command}`: {said}")
        return proc.stdout

    def _worker_connection(self) -> tuple[Path, ConnectionInfo | None]:
        """The connection file the workers use, and its contents when it must be written (a
        gateway bound to every interface: see the module docstring)."""
        try:
            info = ConnectionInfo.load(self.connection)
        except (ConfigError, NoGateway):
            return self.connection, None  # not there yet (a dry run), or the worker says why
        host = _host(info.worker_url)
        if host not in WILDCARDS:
            return self.connection, None
        there = self.gateway_host or socket.gethostname()
        moved = replace(
            info,
            client_url=info.client_url.replace(_host(info.client_url), there, 1),
            worker_url=info.worker_url.replace(host, there, 1),
        )
        return self.log_dir / "connection.json", moved


def _host(url: str) -> str:
    return url.rsplit(":", 1)[0].removeprefix("tcp://")


def _id_key(job_id: str) -> int:
    head = job_id.split("_")[0]
    return int(head) if head.isdigit() else 0
