"""The notebooks in notebooks/ run top to bottom against `pilot up`, through nbclient."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.system

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


@pytest.fixture(scope="module")
def pilot_up(tmp_path_factory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "PILOT_HOME": str(home), "PILOT_LOG_LEVEL": "WARNING"}
    up = subprocess.Popen([sys.executable, "-m", "pilot", "up", "--workers", "2"], env=env)
    try:
        ready = subprocess.run(
            [sys.executable, "-m", "pilot", "status", "--wait-workers", "2", "--timeout", "60"],
            env=env,
            capture_output=True,
            timeout=90,
        )
        assert ready.returncode == 0, ready.stderr
        yield env
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(30)


def run_notebook(path: Path, env: dict[str, str], kernel_name: str = "python3") -> None:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=120, kernel_name=kernel_name, resources={"metadata": {"path": str(path.parent)}}
    )
    old = dict(os.environ)
    os.environ.update(env)  # the kernel inherits PILOT_HOME
    try:
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_quickstart_notebook(pilot_up: dict[str, str], tmp_path) -> None:
    env = {**pilot_up, "IPYTHONDIR": str(tmp_path / "ipython")}
    run_notebook(NOTEBOOKS / "quickstart.ipynb", env)
