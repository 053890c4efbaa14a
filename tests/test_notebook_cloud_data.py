"""notebooks/cloud-data.ipynb runs top to bottom against `pilot up` and a real S3 server.

The S3 server (``tests/s3server.py``) runs on loopback; `pilot up --workers 2` gets its
credentials and endpoint through its environment (the workers read with their own), and so does
the notebook's kernel (it lists and writes the demo data with its own).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import s3fs
from s3server import s3_server
from test_notebooks import NOTEBOOKS, run_notebook

pytestmark = pytest.mark.system

BUCKET = "pilot-demo"


@pytest.fixture(scope="module")
def pilot_up_with_s3(tmp_path_factory) -> Iterator[dict[str, str]]:
    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        s3fs.S3FileSystem(**server.storage_options()).mkdir(BUCKET)
        home = tmp_path_factory.mktemp("home")
        env = {
            **os.environ,
            **server.env(),
            "PILOT_HOME": str(home),
            "PILOT_LOG_LEVEL": "WARNING",
            "PILOT_DEMO_BUCKET": BUCKET,
        }
        env.pop("PILOT_CONNECT", None)
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
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait(10)


def test_cloud_data_notebook(pilot_up_with_s3: dict[str, str], tmp_path: Path) -> None:
    env = {**pilot_up_with_s3, "IPYTHONDIR": str(tmp_path / "ipython")}
    run_notebook(NOTEBOOKS / "cloud-data.ipynb", env)
