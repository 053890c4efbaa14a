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
- Remote sessions (``%pilot remote``) will be added by overriding ``do_execute``; until then
  every cell runs locally, exactly as in `IPythonKernel`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from ipykernel.ipkernel import IPythonKernel

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

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._load_magics()

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
