"""The magics: ``%pilot`` (connect, status, jobs) and ``%%distribute``.

One ``Client`` per kernel (the sync facade shared with the Python API), found by itself from
``PILOT_CONNECT`` or ``$PILOT_HOME/connection.json``, or set with ``%pilot connect``.

``%%distribute`` submits one of three kinds of job: a map (``--over``, ``--partitions``, or the
cell once; shown by ``CellRun``), training (``--ddp N``: ``Client.train``, shown by
``TrainRun``) or rendering (``--render FILE``: ``Client.render``, shown by ``RenderRun``). The
magic keeps the last job, and the last render job of each scene (by its absolute path) for
``--missing-only``.
"""

from __future__ import annotations

import ast
import shlex
import time
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, line_magic, magics_class

from gateway.client import Client, Job
from gateway.protocol import ConfigError, DataError, PilotError, Status, find_connection
from pilot_magics._dashboard import show_dashboard
from pilot_magics._frames_view import RenderRun, carry_frames
from pilot_magics._options import DistributeOptions, RenderOptions, TrainOptions, parse_options
from pilot_magics._packaging import build_cell_function
from pilot_magics._render import CellRun
from pilot_magics._train_view import TrainRun

__all__ = ["PilotMagics"]

STATES = {s.value: s.name.lower() for s in Status}


@magics_class
class PilotMagics(Magics):
    """Registered by ``load_ipython_extension``; holds this kernel's client."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self._client: Client | None = None
        self.last_job: Job | None = None
        self.renders: dict[str, Job] = {}  # the last render job of each scene, by its path

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
        """%pilot connect [FILE|tcp://HOST:PORT] | status | jobs [N] | cancel JOB |
        dashboard [link] | help"""
        words = shlex.split(line)
        command, args = (words[0], words[1:]) if words else ("help", [])
        match command:
            case "connect":
                return self._connect(args[0] if args else None)
            case "status":
                return self._status()
            case "jobs":
                return self._jobs(int(args[0]) if args else 20)
            case "dashboard":
                return show_dashboard(self.client(), embed="link" not in args)
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
            f"Unknown %pilot command {command!r}: use connect, status, jobs, cancel JOB, dashboard."
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

    @line_cell_magic
    def distribute(self, line: str, cell: str | None = None) -> Any:
        """Run the cell on the pool: once, once per item (--over), per partition, on every
        rank of a training group (--ddp N), or as Blender Python before rendering frames of a
        scene (--render FILE). A render needs no Python: ``%distribute --render ...`` (one %)
        renders with the scene's own settings and the options'."""
        opts = parse_options(line)
        if opts.render is not None:
            return self._render(opts, opts.render, cell or "")
        if cell is None:
            raise UsageError(
                "%distribute without a cell runs nothing: write %%distribute and the code to "
                "run under it (only --render FILE needs no cell)."
            )
        if opts.train is not None:
            return self._train(opts, opts.train, cell)
        ns = self.shell.user_ns
        source = self.shell.transform_cell(cell)
        label_name, items, bind, constants, chunk = self._plan(opts, ns)
        datasets = tuple(name for name, _ in opts.data)  # bound on the worker, not shipped
        fn = build_cell_function(source, ns, bind=bind, constants=constants, provided=datasets)
        job = self._submit(opts, fn, items, chunk, sharded=bool(bind))
        self.last_job = job
        if opts.async_var:
            return self._bind_job(opts, job, f"{len(items)} items in {job.n_tasks} tasks")
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

    def _bind_job(self, opts: DistributeOptions, job: Job, what: str) -> None:
        assert opts.async_var is not None
        self.shell.user_ns[opts.async_var] = job
        print(f"job {job.id}: {what}, bound to {opts.async_var}")

    # -- --ddp N ------------------------------------------------------------------------------

    def _train(self, opts: DistributeOptions, t: TrainOptions, cell: str) -> Any:
        """The cell runs on every rank (no names bound; ``pilot.train`` gives the rank)."""
        ns = self.shell.user_ns
        fn = build_cell_function(self.shell.transform_cell(cell), ns)
        try:
            job = self.client().train(
                fn,
                ranks=t.ranks,
                cpus=opts.cpus,
                gpus=opts.gpus,
                tags=opts.tags,
                restarts=t.restarts,
                min_ranks=t.min_ranks,
                checkpoint=t.checkpoint,
                backend=t.backend,
                init_timeout=t.init_timeout,
                timeout=opts.timeout,
                name="%%distribute --ddp",
            )
        except (DataError, ConfigError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        self.last_job = job
        if opts.async_var:
            return self._bind_job(opts, job, f"{t.ranks} ranks")
        run = TrainRun(
            job, ranks=t.ranks, rank_output=t.rank_output, quiet=opts.quiet, rich=self._rich()
        )
        run.follow()
        print(run.summary())
        error = run.error()
        if error is not None:
            raise error
        job.wait()
        if opts.gather:
            ns[opts.gather] = job.results
        return None

    # -- --render FILE ------------------------------------------------------------------------

    def _render(self, opts: DistributeOptions, r: RenderOptions, cell: str) -> Any:
        """The cell (maybe empty) is Blender Python, run as it is typed before rendering."""
        scene = Path(r.scene).expanduser()
        if not scene.is_file():
            raise UsageError(f"--render {r.scene}: no such .blend file in {Path.cwd()}.")
        body = cell.strip()
        try:
            ast.parse(body)
        except SyntaxError as exc:
            raise UsageError(
                f"The cell (Blender Python) has a syntax error (line {exc.lineno}): {exc.msg}"
            ) from None
        key = str(scene.resolve())
        previous, frames = self._frames_to_render(opts, r, key)
        if previous is not None and not frames:
            print(f"--missing-only: every frame of job {previous.id} is there; nothing to render.")
            if opts.async_var:
                self.shell.user_ns[opts.async_var] = previous
            if opts.gather:
                self.shell.user_ns[opts.gather] = previous.frames
            return None
        try:
            job = self.client().render(
                scene,
                frames,
                chunk=opts.chunk,
                video=r.video or None,
                fps=r.fps,
                engine=r.engine,
                samples=r.samples,
                resolution=r.resolution,
                file_format=r.file_format,
                body=body,
                ship=opts.ship,
                results=opts.results or "",
                cpus=opts.cpus,
                gpus=opts.gpus,
                tags=opts.tags,
                timeout=opts.timeout,
                retries=opts.retries,
            )
        except (DataError, ConfigError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        assert job.render is not None
        rendering = job.render.frames_asked
        if previous is not None:
            carry_frames(job, previous)
        self.last_job = self.renders[key] = job
        if opts.async_var:
            return self._bind_job(opts, job, f"{len(rendering)} frames in {job.n_tasks} chunks")
        run = RenderRun(job, rendering, quiet=opts.quiet, rich=self._rich())
        run.follow()
        print(run.summary())
        error = run.error()
        if error is not None:
            raise error
        job.wait()
        run.finish(video=bool(r.video))
        if opts.gather:
            self.shell.user_ns[opts.gather] = job.frames
        return None

    def _frames_to_render(
        self, opts: DistributeOptions, r: RenderOptions, key: str
    ) -> tuple[Job | None, str | list[int]]:
        """(the render that ``--missing-only`` completes, or None; the frames to render)."""
        if not r.missing_only:
            return None, r.frames
        previous = self.renders.get(key)
        if previous is None:
            raise UsageError(
                f"--missing-only renders again what the last render of {r.scene} in this "
                "kernel left out, and there is none: run the cell without --missing-only."
            )
        if not previous.done():
            raise UsageError(
                f"The last render of {r.scene} (job {previous.id}) is still running: wait for "
                "it (job.wait()) or cancel it (job.cancel()) first."
            )
        return previous, previous.missing_frames()

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
