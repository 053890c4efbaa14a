"""The magics: ``%pilot`` (connect, status, jobs) and ``%%distribute``.

One ``Client`` per kernel (the sync facade shared with the Python API), found by itself from
``PILOT_CONNECT`` or ``$PILOT_HOME/connection.json``, or set with ``%pilot connect``.
"""

from __future__ import annotations

import shlex
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from gateway.client import Client, Job
from gateway.protocol import ConfigError, DataError, PilotError, Status, find_connection
from pilot_magics._options import DistributeOptions, parse_options
from pilot_magics._packaging import build_cell_function
from pilot_magics._render import CellRun

__all__ = ["PilotMagics"]

STATES = {s.value: s.name.lower() for s in Status}


@magics_class
class PilotMagics(Magics):
    """Registered by ``load_ipython_extension``; holds this kernel's client."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self._client: Client | None = None
        self.last_job: Job | None = None

    # -- the connection -----------------------------------------------------------------------

    def client(self) -> Client:
        if self._client is None:
            try:
                self._client = Client(find_connection(), name="notebook")
            except PilotError as exc:
                raise UsageError(str(exc)) from None
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    @line_magic
    def pilot(self, line: str) -> Any:
        """%pilot connect [FILE|tcp://HOST:PORT] | status | jobs [N] | cancel JOB | help"""
        words = shlex.split(line)
        command, args = (words[0], words[1:]) if words else ("help", [])
        match command:
            case "connect":
                return self._connect(args[0] if args else None)
            case "status":
                return self._status()
            case "jobs":
                return self._jobs(int(args[0]) if args else 20)
            case "cancel" if args:
                self.client().cancel(args[0])
                print(f"cancelled {args[0]}")
                return None
            case "help":
                print(self.pilot.__doc__)
                return None
            case _:
                return self._extra_command(command, args)

    def _extra_command(self, command: str, args: list[str]) -> Any:
        raise UsageError(
            f"Unknown %pilot command {command!r}: use connect, status, jobs, cancel JOB."
        )

    def _connect(self, target: str | None) -> None:
        try:
            client = Client(find_connection(target), name="notebook")
        except PilotError as exc:
            raise UsageError(str(exc)) from None
        self.close()
        self._client = client
        reply = client.status()
        print(f"connected to gateway {reply.gateway_id}: {len(reply.workers)} workers")

    def _status(self) -> None:
        reply = self.client().status()
        print(f"gateway {reply.gateway_id}: {len(reply.workers)} workers, {len(reply.jobs)} jobs")
        for w in reply.workers:
            gpus = f", {len(w.gpus)} GPUs" if w.gpus else ""
            tags = f", tags {','.join(w.tags)}" if w.tags else ""
            print(f"  {w.name}: {w.running}/{w.slots} slots busy{gpus}{tags}")
        for j in reply.jobs:
            print(f"  job {j.job_id}: {STATES[j.state]} {j.done}/{j.n_tasks}")

    def _jobs(self, limit: int) -> None:
        for j in self.client().jobs(limit):
            when = time.strftime("%H:%M:%S", time.localtime(j.created))
            print(f"{j.job_id}  {when}  {STATES[j.state]:9}  {j.done}/{j.n_tasks}  {j.name}")

    # -- %%distribute -------------------------------------------------------------------------

    @cell_magic
    def distribute(self, line: str, cell: str) -> Any:
        """Run the cell on the pool: once, once per item (--over), or per partition."""
        opts = parse_options(line)
        ns = self.shell.user_ns
        source = self.shell.transform_cell(cell)
        label_name, items, bind, constants, chunk = self._plan(opts, ns)
        datasets = tuple(name for name, _ in opts.data)  # bound on the worker, not shipped
        fn = build_cell_function(source, ns, bind=bind, constants=constants, provided=datasets)
        job = self._submit(opts, fn, items, chunk, sharded=bool(bind))
        self.last_job = job
        if opts.async_var:
            ns[opts.async_var] = job
            what = f"{len(items)} items in {job.n_tasks} tasks"
            print(f"job {job.id}: {what}, bound to {opts.async_var}")
            return None
        return self._follow(opts, job, items, label_name, bind)

    def _submit(
        self, opts: DistributeOptions, fn: Any, items: list[Any], chunk: int | None, sharded: bool
    ) -> Job:
        try:
            return self.client().map(
                fn,
                items,
                chunk=chunk,
                cpus=opts.cpus,
                gpus=opts.gpus,
                tags=opts.tags,
                timeout=opts.timeout,
                retries=opts.retries,
                retry_errors=opts.retry_errors,
                name="%%distribute",
                data=dict(opts.data),
                data_mode=opts.data_mode,
                ship=opts.ship,
                results=opts.results or "",
                shard_data=sharded,
            )
        except (DataError, ConfigError) as exc:
            raise UsageError(str(exc)) from None

    def _follow(
        self,
        opts: DistributeOptions,
        job: Job,
        items: list[Any],
        label_name: str | None,
        bind: tuple[str, ...],
    ) -> Any:
        ns = self.shell.user_ns
        run = CellRun(
            job,
            label_name=label_name,
            quiet=opts.quiet,
            until=self._until(opts, ns, items, label_name),
            rich=self._rich(),
        )
        run.follow()
        print(run.summary())
        if run.found is not None:
            index, value = run.found
            print(f"--until satisfied by {label_name} {items[index]!r}")
            if opts.gather:
                ns[opts.gather] = (items[index], value)
            return None
        error = run.error()
        if error is not None:
            raise error
        job.wait()
        files = job.files()
        if files:
            count = sum(len(v) for v in files.values())
            first = next(iter(files.values()))[0]
            print(f"{count} result files, e.g. {first} (all: job.files())")
        if opts.gather:
            ns[opts.gather] = self._gathered(opts, ns, job, items, label_name, bind)
        return None

    def _plan(
        self, opts: DistributeOptions, ns: dict[str, Any]
    ) -> tuple[str | None, list[Any], tuple[str, ...], dict[str, Any], int | None]:
        """(label name, items, names bound per item, constants, chunk). A chunk of None leaves
        it to the client's scheduling policy (``SchedulingPolicy.auto_chunk``)."""
        if opts.over is not None:
            name, expr = opts.over
            try:
                items = list(eval(expr, ns))
            except Exception as exc:
                raise UsageError(f"--over {name}={expr}: {type(exc).__name__}: {exc}") from None
            if not items:
                raise UsageError(f"--over {name}={expr} has no items.")
            return name, items, (name,), {}, opts.chunk
        if opts.partitions is not None:
            n = opts.partitions
            return "partition", list(range(n)), ("partition",), {"partitions": n}, 1
        return None, [None], (), {}, 1

    def _until(
        self,
        opts: DistributeOptions,
        ns: dict[str, Any],
        items: list[Any],
        name: str | None,
    ) -> Any:
        if opts.until is None:
            return None
        code = compile(opts.until, "<--until>", "eval")

        def until(index: int, result: Any) -> bool:
            return bool(eval(code, ns, {name or "item": items[index], "result": result}))

        return until

    def _gathered(
        self,
        opts: DistributeOptions,
        ns: dict[str, Any],
        job: Job,
        items: list[Any],
        name: str | None,
        bind: tuple[str, ...],
    ) -> Any:
        results = job.results
        if not bind:
            return results[0]
        if opts.where is None:
            return results
        code = compile(opts.where, "<--where>", "eval")
        key = name or "item"
        return {
            item: result
            for item, result in zip(items, results, strict=True)
            if eval(code, ns, {key: item, "result": result})
        }

    def _rich(self) -> bool:
        """Jupyter frontends render display updates; a terminal IPython does not."""
        return type(self.shell).__name__ != "TerminalInteractiveShell"
