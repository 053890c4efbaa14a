"""Install and remove the "Parallel Pilot" kernelspec.

Called by ``pilot kernel install|uninstall`` and ``python -m pilot_kernel``; safe to call from
any Python code. Each function writes or deletes one directory named after the kernel and
returns its path; the caller owns nothing afterwards.

Where a spec goes (at most one of the three may be chosen):

- nothing chosen, or ``sys_prefix=True``: ``<sys.prefix>/share/jupyter/kernels/<name>``, i.e. the
  active virtual or conda environment (like ``jupyter kernelspec install --sys-prefix``);
- ``user=True``: the user's Jupyter data dir (``jupyter --data-dir``, honours
  ``JUPYTER_DATA_DIR``);
- ``prefix=PATH``: ``PATH/share/jupyter/kernels/<name>``.

The spec starts the kernel with the absolute path of the interpreter that installed it, so a
front end running from another environment (VS Code, PyCharm, a system JupyterLab) still gets
this environment and its ``pilot_magics``.

Naming: VS Code hides kernelspecs whose name starts with ``python`` and those displayed as
"Python 3" (it lists interpreters itself instead), so such names are refused with `ValueError`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_DISPLAY_NAME", "DEFAULT_NAME", "install", "spec_dict", "uninstall"]

DEFAULT_NAME = "parallel-pilot"
DEFAULT_DISPLAY_NAME = "Parallel Pilot"

KERNEL_CLASS = "pilot_kernel.kernel.PilotKernel"

# Jupyter's own rule for kernel names (jupyter_client.kernelspec._kernel_name_pat).
_VALID_NAME = re.compile(r"^[a-z0-9._\-]+$", re.IGNORECASE)
_LOGO_FILES = ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg")


def spec_dict(name: str = DEFAULT_NAME, display_name: str = DEFAULT_DISPLAY_NAME) -> dict[str, Any]:
    """Return the ``kernel.json`` content for a spec that will be installed as ``name``.

    Raises `ValueError` when ``name`` is not a valid Jupyter kernel name or would be hidden by
    VS Code, or when ``display_name`` is empty or "Python 3".
    """
    _check_names(name, display_name)
    return {
        "argv": [
            # Not resolved: resolving a venv's symlinked python would escape the venv.
            os.path.abspath(sys.executable),
            "-m",
            "ipykernel_launcher",
            "-f",
            "{connection_file}",
            f"--IPKernelApp.kernel_class={KERNEL_CLASS}",
        ],
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {"debugger": True},
    }


def install(
    *,
    user: bool = False,
    sys_prefix: bool = False,
    prefix: str | os.PathLike[str] | None = None,
    name: str = DEFAULT_NAME,
    display_name: str = DEFAULT_DISPLAY_NAME,
) -> str:
    """Write the kernelspec (``kernel.json`` and logos) and return the directory it is in.

    An existing spec of the same name at that location is replaced. Raises `ValueError` for
    conflicting locations or bad names (see `spec_dict`), `OSError` when the location is not
    writable.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    target_prefix = _target_prefix(user=user, sys_prefix=sys_prefix, prefix=prefix)
    spec = spec_dict(name, display_name)
    with tempfile.TemporaryDirectory(prefix="pilot-kernelspec-") as staging:
        staging_dir = Path(staging)
        (staging_dir / "kernel.json").write_text(json.dumps(spec, indent=1) + "\n")
        _copy_logos(staging_dir)
        return KernelSpecManager().install_kernel_spec(
            staging, kernel_name=name, user=user, prefix=target_prefix
        )


def uninstall(
    name: str = DEFAULT_NAME,
    *,
    user: bool = False,
    sys_prefix: bool = False,
    prefix: str | os.PathLike[str] | None = None,
) -> str:
    """Delete the kernelspec ``name`` and return the directory that was removed.

    With a location flag only that location is looked at. With none, the spec is removed from
    wherever Jupyter finds it first (like ``jupyter kernelspec uninstall``). Raises
    `FileNotFoundError` when there is no such spec.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    manager = KernelSpecManager()
    if not (user or sys_prefix or prefix is not None):
        try:
            return manager.remove_kernel_spec(name.lower())
        except KeyError:
            msg = (
                f"No kernelspec named {name!r} on the Jupyter path; "
                "`jupyter kernelspec list` shows the installed ones."
            )
            raise FileNotFoundError(msg) from None

    target_prefix = _target_prefix(user=user, sys_prefix=sys_prefix, prefix=prefix)
    if target_prefix is None:
        spec_dir = Path(manager.user_kernel_dir) / name.lower()
    else:
        spec_dir = Path(target_prefix, "share", "jupyter", "kernels", name.lower())
    if not (spec_dir / "kernel.json").is_file():
        msg = f"No kernelspec named {name!r} in {spec_dir.parent}."
        raise FileNotFoundError(msg)
    shutil.rmtree(spec_dir)
    return str(spec_dir)


def _target_prefix(
    *, user: bool, sys_prefix: bool, prefix: str | os.PathLike[str] | None
) -> str | None:
    """The prefix to pass to KernelSpecManager: None means the user dir."""
    chosen = [flag for flag, on in (("user", user), ("sys_prefix", sys_prefix)) if on]
    if prefix is not None:
        chosen.append("prefix")
    if len(chosen) > 1:
        msg = f"Choose one kernelspec location, not {' and '.join(chosen)}."
        raise ValueError(msg)
    if user:
        return None
    if prefix is not None:
        return os.path.abspath(prefix)
    return sys.prefix


def _check_names(name: str, display_name: str) -> None:
    if not _VALID_NAME.match(name):
        msg = (
            f"Invalid kernel name {name!r}: use letters, digits, '.', '_' and '-' only "
            f"(e.g. {DEFAULT_NAME!r})."
        )
        raise ValueError(msg)
    if name.lower().startswith("python"):
        msg = (
            f"Kernel name {name!r} starts with 'python', and VS Code hides such kernelspecs; "
            f"choose another name (e.g. {DEFAULT_NAME!r})."
        )
        raise ValueError(msg)
    if not display_name.strip() or display_name.strip().lower() == "python 3":
        msg = (
            f"Display name {display_name!r} would be hidden or ambiguous in VS Code; "
            f"choose another (e.g. {DEFAULT_DISPLAY_NAME!r})."
        )
        raise ValueError(msg)


def _copy_logos(destination: Path) -> None:
    # The logos are a nicety: an ipykernel build without them still gets a working spec.
    logos = resources.files("ipykernel").joinpath("resources")
    for filename in _LOGO_FILES:
        logo = logos.joinpath(filename)
        if logo.is_file():
            (destination / filename).write_bytes(logo.read_bytes())
