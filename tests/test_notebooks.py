"""The notebooks in notebooks/ run top to bottom against `pilot up`, through nbclient."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests_support import pilot_up as running_pilot_up
from tests_support import run_notebook

pytestmark = pytest.mark.system

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


@pytest.fixture(scope="module")
def pilot_up(tmp_path_factory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("home")
    with running_pilot_up({**os.environ, "PILOT_HOME": str(home)}) as env:
        yield env


def test_quickstart_notebook(pilot_up: dict[str, str], tmp_path) -> None:
    env = {**pilot_up, "IPYTHONDIR": str(tmp_path / "ipython")}
    run_notebook(NOTEBOOKS / "quickstart.ipynb", env)
