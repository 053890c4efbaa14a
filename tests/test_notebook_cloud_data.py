"""notebooks/cloud-data.ipynb runs top to bottom against `pilot up` and a real S3 server.

The S3 server (``tests/s3server.py``) runs on loopback; `pilot up --workers 2` gets its
credentials and endpoint through its environment (the workers read with their own), and so does
the notebook's kernel (it lists and writes the demo data with its own).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import s3fs
from s3server import s3_server
from test_notebooks import NOTEBOOKS, run_notebook

from tests_support import pilot_up

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
            "PILOT_DEMO_BUCKET": BUCKET,
        }
        with pilot_up(env) as ready_env:
            yield ready_env


def test_cloud_data_notebook(pilot_up_with_s3: dict[str, str], tmp_path: Path) -> None:
    env = {**pilot_up_with_s3, "IPYTHONDIR": str(tmp_path / "ipython")}
    run_notebook(NOTEBOOKS / "cloud-data.ipynb", env)
