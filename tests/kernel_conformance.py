"""The official Jupyter kernel conformance suite, configured for the Parallel Pilot kernel.

Imported by ``tests/test_kernel_local.py``, which is where pytest collects `PilotKernelTests`
(this module's name does not match ``test_*.py``, so it is collected exactly once). The base
class is reached through the module (``jkt.KernelTests``) so pytest never sees it as a test
class of its own.

`PilotKernelTests` owns a temporary Jupyter prefix and IPython dir for the life of the class:
``setUpClass`` installs the kernelspec there and points ``JUPYTER_PATH`` and ``IPYTHONDIR`` at
them *before* the base class starts the kernel; ``tearDownClass`` shuts the kernel down,
restores the environment and deletes the directories.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import jupyter_kernel_test as jkt
import pytest

from pilot_kernel import install

KERNEL_NAME = "parallel-pilot"


@pytest.mark.system
class PilotKernelTests(jkt.KernelTests):
    """jupyter_kernel_test's samples for a Python kernel, run against ``parallel-pilot``."""

    kernel_name = KERNEL_NAME
    language_name = "python"
    file_extension = ".py"

    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples = ["import = 7q"]
    code_page_something = "zip?"
    code_generate_error = "raise"
    code_execute_result = [
        {"code": "1+2+3", "result": "6"},
        {"code": "[n*n for n in range(1, 4)]", "result": "[1, 4, 9]"},
    ]
    code_display_data = [
        {
            "code": "from IPython.display import HTML, display; display(HTML('<b>test</b>'))",
            "mime": "text/html",
        },
        {
            "code": "from IPython.display import Math, display; display(Math('\\frac{1}{2}'))",
            "mime": "text/latex",
        },
    ]
    code_history_pattern = "1?2*"
    # Not "range": ipykernel answers it with session 0 (IPython's "current session") rather than
    # the absolute session number that tail reported, so the suite's range check cannot pass for
    # any ipykernel-based kernel; its own ipykernel example leaves it out too.
    supported_history_operations = ("tail", "search")
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"

    _scratch: Path
    _saved_env: dict[str, str | None]

    @classmethod
    def setUpClass(cls) -> None:
        cls._scratch = Path(tempfile.mkdtemp(prefix="pilot-conformance-"))
        prefix = cls._scratch / "prefix"
        install(prefix=prefix, name=KERNEL_NAME)
        env = {
            "JUPYTER_PATH": str(prefix / "share" / "jupyter"),
            "IPYTHONDIR": str(cls._scratch / "ipython"),
        }
        cls._saved_env = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            super().setUpClass()
        except BaseException:
            cls._restore()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        try:
            super().tearDownClass()
        finally:
            cls._restore()

    @classmethod
    def _restore(cls) -> None:
        for key, value in cls._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(cls._scratch)
