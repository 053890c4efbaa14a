"""pilot_kernel's remote sessions: cells run in one namespace on a worker, with a real gateway,
real workers and a real kernel (the installed "parallel-pilot" kernelspec)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

import kernel_conformance as conformance
import pilot
from gateway.protocol import Status
from pilot_kernel import install
from tests_support import TEST_TIMEOUTS, KernelDriver, wait_until

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory) -> Iterator[str]:
    prefix = tmp_path_factory.mktemp("prefix")
    install(prefix=prefix)
    path = str(prefix / "share" / "jupyter")
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = path  # the kernel spec manager of this process looks here
    yield path
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


@pytest.fixture(scope="module")
def cluster() -> Iterator[pilot.LocalCluster]:
    with pilot.LocalCluster(workers=2, timeouts=TEST_TIMEOUTS) as c:
        yield c


def start_kernel(cluster: pilot.LocalCluster, tmp: Path) -> KernelDriver:
    return KernelDriver(
        "parallel-pilot", env={"PILOT_HOME": str(cluster.home), "IPYTHONDIR": str(tmp)}
    )


@pytest.fixture
def kernel(cluster, jupyter_path, tmp_path) -> Iterator[KernelDriver]:
    k = start_kernel(cluster, tmp_path)
    try:
        yield k
    finally:
        k.shutdown()


def result(ex) -> str:
    got = ex.of("execute_result")
    assert got, [(m["msg_type"], m["content"]) for m in ex.messages]
    return got[0]["content"]["data"]["text/plain"]


def test_cells_run_remotely_in_one_namespace_until_local(kernel: KernelDriver) -> None:
    kernel.run("import os\nlocal_pid = os.getpid()")
    ex = kernel.run("%pilot remote")
    assert ex.status == "ok" and "cells now run on" in ex.stdout
    ex = kernel.run("import os\nx = 41\nprint('hello from', os.getpid())")
    assert ex.status == "ok" and ex.stdout.startswith("hello from ")
    remote_pid = int(ex.stdout.split()[-1])
    assert result(kernel.run("x + 1")) == "42", "the namespace persists between cells"
    assert result(kernel.run("'local_pid' in globals()")) == "False", "not the local namespace"
    assert kernel.run("%pilot local").status == "ok"
    assert result(kernel.run("os.getpid() == local_pid")) == "True"
    assert remote_pid != int(result(kernel.run("local_pid")))


def test_rich_display_and_updates_arrive_in_the_cell(kernel: KernelDriver) -> None:
    assert kernel.run("%pilot remote").status == "ok"
    ex = kernel.run(
        "from IPython.display import HTML, display\n"
        "h = display(HTML('<b>one</b>'), display_id=True)\n"
        "h.update(HTML('<b>two</b>'))"
    )
    shown = ex.of("display_data")
    updated = ex.of("update_display_data")
    assert shown[0]["content"]["data"]["text/html"] == "<b>one</b>"
    assert updated[0]["content"]["data"]["text/html"] == "<b>two</b>"
    display_id = shown[0]["content"]["transient"]["display_id"]
    assert updated[0]["content"]["transient"]["display_id"] == display_id


def test_error_leaves_the_session_alive(kernel: KernelDriver) -> None:
    assert kernel.run("%pilot remote").status == "ok"
    kernel.run("y = 7")
    ex = kernel.run("def f():\n    return 1 / 0\nf()")
    assert ex.status == "error"
    assert ex.error["ename"] == "ZeroDivisionError"
    assert any("return 1 / 0" in line for line in ex.error["traceback"])
    assert result(kernel.run("y")) == "7"


def test_input_is_answered_from_the_notebook(kernel: KernelDriver) -> None:
    assert kernel.run("%pilot remote").status == "ok"
    msg_id = kernel.kc.execute("name = input('who? ')\nprint('hi', name)", allow_stdin=True)
    request = kernel.kc.get_stdin_msg(timeout=30)
    assert request["content"]["prompt"] == "who? "
    kernel.kc.input("pilot")
    ex = kernel.collect(msg_id)
    assert ex.status == "ok" and "hi pilot" in ex.stdout


def test_interrupt_stops_the_remote_cell_and_keeps_the_session(kernel: KernelDriver) -> None:
    assert kernel.run("%pilot remote").status == "ok"
    kernel.run("kept = 'still here'")
    msg_id = kernel.kc.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(60)")
    while True:
        msg = kernel.kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            break
    kernel.km.interrupt_kernel()
    ex = kernel.collect(msg_id, timeout=15)
    assert ex.status == "error" and ex.reply["content"]["ename"] == "KeyboardInterrupt"
    assert result(kernel.run("kept")) == "'still here'"


def test_ide_silent_executions_stay_local(kernel: KernelDriver) -> None:
    assert kernel.run("%pilot remote").status == "ok"
    msg_id = kernel.kc.execute("import os as _os\n_ide_probe = _os.getpid()", silent=True)
    kernel.collect(msg_id)
    msg_id = kernel.kc.execute("print(_ide_probe == _os.getpid())", store_history=False)
    assert kernel.collect(msg_id).stdout.strip() == "True", "ran in the local kernel"
    assert result(kernel.run("'_ide_probe' in globals()")) == "False", "the remote never saw it"


def test_distribute_works_in_the_pilot_kernel_without_load_ext(kernel: KernelDriver) -> None:
    ex = kernel.run("%%distribute --over i=range(4) --gather out\ni * 10")
    assert ex.status == "ok"
    assert result(kernel.run("out")) == "[0, 10, 20, 30]"


def _session_jobs(client: pilot.Client) -> list:
    return [j for j in client.jobs(50) if j.name == "remote session"]


def test_restart_releases_the_remote_session(
    kernel: KernelDriver, cluster: pilot.LocalCluster
) -> None:
    assert kernel.run("%pilot remote").status == "ok"
    client = cluster.client()
    job_id = _session_jobs(client)[0].job_id
    kernel.km.restart_kernel(now=False)
    wait_until(
        lambda: next(j for j in client.jobs(50) if j.job_id == job_id).state == Status.CANCELLED,
        timeout=30,
        what="session released",
    )


def test_killed_kernel_session_is_reclaimed_by_its_lease(
    cluster: pilot.LocalCluster, jupyter_path, tmp_path
) -> None:
    k = start_kernel(cluster, tmp_path)
    try:
        assert k.run("%pilot remote").status == "ok"
        client = cluster.client()
        job_id = _session_jobs(client)[0].job_id
        os.kill(k.km.provisioner.process.pid, signal.SIGKILL)
        wait_until(
            lambda: (
                next(j for j in client.jobs(50) if j.job_id == job_id).state == Status.CANCELLED
            ),
            timeout=30,
            what="lease expired",
        )
    finally:
        k.shutdown()


def test_worker_dying_mid_cell_gives_a_clear_message(jupyter_path, tmp_path) -> None:
    with pilot.LocalCluster(workers=1, timeouts=TEST_TIMEOUTS) as cluster:
        k = start_kernel(cluster, tmp_path)
        try:
            assert k.run("%pilot remote").status == "ok"
            msg_id = k.kc.execute("import time\nprint('busy', flush=True)\ntime.sleep(60)")
            while True:
                msg = k.kc.get_iopub_msg(timeout=30)
                if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
                    break
            cluster.workers[0].kill()
            ex = k.collect(msg_id, timeout=60)
            assert ex.status == "error"
            assert ex.error["ename"] == "SessionLost"
            assert "%pilot remote" in ex.error["evalue"]
            assert k.run("1 + 1").status == "ok", "cells run locally again"
            cluster.add_worker(name="local-new")
            cluster.wait_for_workers(1)
            assert k.run("%pilot remote").status == "ok", "a fresh session starts"
            assert result(k.run("2 + 2")) == "4"
        finally:
            k.shutdown()


def test_notebook_runs_in_the_installed_kernel(
    cluster: pilot.LocalCluster, jupyter_path, tmp_path
) -> None:
    import nbformat
    from nbclient import NotebookClient

    notebook = Path(__file__).parent.parent / "notebooks" / "quickstart.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    saved = {k: os.environ.get(k) for k in ("PILOT_HOME", "IPYTHONDIR")}
    os.environ.update({"PILOT_HOME": str(cluster.home), "IPYTHONDIR": str(tmp_path)})
    try:
        NotebookClient(nb, timeout=120, kernel_name="parallel-pilot").execute()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class RemoteKernelConformance(conformance.PilotKernelTests):
    """jupyter_kernel_test's execute, stream, error and display samples with cells running
    on a worker (completion, inspection and the pager stay local by design)."""

    # Remote cells are not in the local kernel's history: the history checks do not apply.
    supported_history_operations = ()
    _cluster: pilot.LocalCluster
    _home: str | None

    @classmethod
    def setUpClass(cls) -> None:
        cls._cluster = pilot.LocalCluster(workers=1, timeouts=TEST_TIMEOUTS)
        cls._cluster.__enter__()
        cls._home = os.environ.get("PILOT_HOME")
        os.environ["PILOT_HOME"] = str(cls._cluster.home)
        try:
            super().setUpClass()
            reply = cls.kc.execute_interactive("%pilot remote", timeout=60)
            assert reply["content"]["status"] == "ok"
            printed: list[str] = []

            def keep(msg: dict) -> None:
                if msg["msg_type"] == "stream":
                    printed.append(msg["content"]["text"])

            cls.kc.execute_interactive("import os; print(os.getpid())", output_hook=keep)
            assert int("".join(printed)) != cls.km.provisioner.process.pid, "runs remotely"
        except BaseException:
            cls._stop_cluster()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        try:
            super().tearDownClass()
        finally:
            cls._stop_cluster()

    @classmethod
    def _stop_cluster(cls) -> None:
        cls._cluster.__exit__(None, None, None)
        if cls._home is None:
            os.environ.pop("PILOT_HOME", None)
        else:
            os.environ["PILOT_HOME"] = cls._home


def test_an_interrupt_while_the_kernel_waits_for_input_keeps_the_session(
    kernel: KernelDriver,
) -> None:
    """The interrupt lands while the kernel is in the middle of relaying an event (here it
    waits for the notebook's answer to the remote cell's ``input()``), not while it waits for
    the next event: the remote cell is interrupted all the same, and the session lives on."""
    assert kernel.run("%pilot remote").status == "ok"
    kernel.run("kept = 'still here'")
    msg_id = kernel.kc.execute("name = input('who? ')", allow_stdin=True)
    assert kernel.kc.get_stdin_msg(timeout=30)["content"]["prompt"] == "who? "
    kernel.km.interrupt_kernel()  # instead of an answer
    ex = kernel.collect(msg_id, timeout=30)
    assert ex.status == "error" and ex.reply["content"]["ename"] == "KeyboardInterrupt"
    assert result(kernel.run("kept")) == "'still here'", "the session was ended"
