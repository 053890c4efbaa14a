"""The Parallel Pilot Jupyter kernel: a stock IPython kernel with the pilot magics loaded.

`PilotKernel` is what ``kernel.json`` names through
``--IPKernelApp.kernel_class=pilot_kernel.kernel.PilotKernel``; `ipykernel`'s kernel app
constructs it, owns its sockets and runs its event loop. Nothing here is called directly by
user code.

Contract:

- Everything a front end relies on (execution, completion, inspection, history, comms and
  widgets, ``input()``, interrupts, the debugger) is inherited unchanged from
  `ipykernel.ipkernel.IPythonKernel`, so VS Code, PyCharm and JupyterLab treat it like the
  stock Python kernel.
- On construction it loads the IPython extension ``pilot_magics`` into its shell, so
  ``%%distribute`` and ``%pilot`` work without ``%load_ext``. An import error from
  ``pilot_magics`` propagates (the kernel fails to start and says why); a ``pilot_magics``
  without ``load_ipython_extension`` is logged as a warning and the kernel starts without the
  magics.
- Remote sessions: after ``%pilot remote [--gpus N] [--tags T]`` the cells run in one
  persistent namespace on a worker (see `pilot_kernel._remote`), until ``%pilot local``. Only
  cells the user runs go there: silent executions and those that do not store history (what
  VS Code and PyCharm send by themselves), and ``%pilot`` lines, always run locally, so the
  kernel never hangs an IDE. Shutdown or restart releases the session.
"""

from __future__ import annotations

import inspect
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ipykernel.ipkernel import IPythonKernel
from IPython.core.error import UsageError

from gateway.protocol import PilotError
from pilot_kernel._remote import RemoteSession, SessionLost
from pilot_magics import PilotMagics

__all__ = ["PilotKernel"]

#: The IPython extension this kernel loads at start-up.
MAGICS_EXTENSION = "pilot_magics"


def _distribution_version() -> str:
    try:
        return version("parallel-pilot")
    except PackageNotFoundError:
        # Running from a source tree that was never installed.
        return "0.0"


class PilotKernel(IPythonKernel):
    """`IPythonKernel` with ``pilot_magics`` loaded; see the module docstring for the contract."""

    implementation = "pilot_kernel"
    implementation_version = _distribution_version()
    # language_info is inherited: the kernel speaks Python, like ipykernel.

    remote: RemoteSession | None = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._load_magics()
        self.shell.register_magics(_KernelMagics(self.shell, kernel=self))

    # -- remote sessions ----------------------------------------------------------------------

    async def do_execute(  # type: ignore[override]
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict[str, Any] | None = None,
        allow_stdin: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        if self.remote is None or silent or not store_history or _runs_here(code):
            return await super().do_execute(
                code, silent, store_history, user_expressions, allow_stdin, **kwargs
            )
        return self._execute_remote(code, allow_stdin)

    def _execute_remote(self, code: str, allow_stdin: bool) -> dict[str, Any]:
        assert self.remote is not None
        self._forward_input(allow_stdin)  # as ipykernel does per cell: input() asks the frontend
        try:
            outcome = self.remote.execute(code, self)
        except SessionLost as exc:
            self.remote = None
            return self._error_reply("SessionLost", str(exc), [f"SessionLost: {exc}"])
        except KeyboardInterrupt:
            self.remote = None
            msg = "Interrupted twice: the remote session was ended."
            return self._error_reply("KeyboardInterrupt", msg, [msg])
        finally:
            self._restore_input()
        if not outcome.ok:
            return self._error_reply(
                outcome.ename or "Error", outcome.evalue, list(outcome.traceback)
            )
        return {
            "status": "ok",
            "execution_count": self.execution_count,
            "payload": [],
            "user_expressions": {},
        }

    def _error_reply(self, ename: str, evalue: str, traceback: list[str]) -> dict[str, Any]:
        content = {"ename": ename, "evalue": evalue, "traceback": traceback}
        self.send_response(self.iopub_socket, "error", content)
        return {"status": "error", "execution_count": self.execution_count, **content}

    def start_remote(self, gpus: int, tags: tuple[str, ...], client: Any) -> RemoteSession:
        self.stop_remote()
        self.remote = RemoteSession(client, gpus=gpus, tags=tags)
        return self.remote

    def stop_remote(self) -> None:
        if self.remote is not None:
            self.remote.close()
            self.remote = None

    async def do_shutdown(self, restart: bool) -> dict[str, Any]:  # type: ignore[override]
        self.stop_remote()  # a restart or shutdown releases the worker at once
        reply = super().do_shutdown(restart)  # a coroutine in some ipykernel versions only
        return await reply if inspect.isawaitable(reply) else reply

    @property
    def banner(self) -> str:  # type: ignore[override]
        """The text a console front end prints at start: IPython's banner plus ours."""
        shell_banner = self.shell.banner if self.shell is not None else ""
        return (
            f"{shell_banner}"
            f"Parallel Pilot {self.implementation_version}: "
            "%distribute and %pilot are ready (no %load_ext needed).\n"
        )

    def _load_magics(self) -> None:
        # load_extension returns None on success, "already loaded" when a config file listed the
        # extension too, and "no load function" when the module defines no
        # load_ipython_extension. Errors raised while importing or loading propagate.
        outcome = self.shell.extension_manager.load_extension(MAGICS_EXTENSION)
        if outcome == "no load function":
            self.log.warning(
                "%s has no load_ipython_extension(); %%distribute and %%pilot are unavailable "
                "in this kernel. Reinstall parallel-pilot, or run `%%load_ext %s` once it has one.",
                MAGICS_EXTENSION,
                MAGICS_EXTENSION,
            )


def _runs_here(code: str) -> bool:
    """``%pilot ...`` always runs in the kernel itself (``%pilot local`` must reach it), and so
    does inspection (``zip?``, ``?zip``): the pager is the local kernel's, like completion."""
    text = code.strip()
    return text.startswith(("%pilot", "?")) or (text.endswith("?") and "\n" not in text)


class _KernelMagics(PilotMagics):
    """``%pilot`` with the kernel's own commands: ``remote [--gpus N] [--tags T]``, ``local``."""

    def __init__(self, shell: Any, *, kernel: PilotKernel) -> None:
        super().__init__(shell)
        self.kernel = kernel

    def _extra_command(self, command: str, args: list[str]) -> Any:
        if command == "local":
            was = self.kernel.remote is not None
            self.kernel.stop_remote()
            print("cells run locally" + (" (remote session released)" if was else ""))
            return None
        if command != "remote":
            return super()._extra_command(command, args)
        gpus, tags = 0, ()
        rest = list(args)
        while rest:
            flag = rest.pop(0)
            if flag == "--gpus" and rest and rest[0].isdigit():
                gpus = int(rest.pop(0))
            elif flag == "--tags" and rest:
                tags = tuple(t for t in rest.pop(0).split(",") if t)
            else:
                raise UsageError("%pilot remote [--gpus N] [--tags a,b]")
        try:
            session = self.kernel.start_remote(gpus, tags, self.client())
        except PilotError as exc:
            raise UsageError(str(exc)) from None
        info = session.info
        print(
            f"cells now run on {info.host} (pid {info.pid}, Python {info.python}), in one "
            "namespace; `%pilot local` comes back"
        )
        return None
