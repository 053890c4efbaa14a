"""%%distribute in a real stock IPython kernel, with a real gateway and workers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import pilot
from gateway.protocol import Status
from tests_support import TEST_TIMEOUTS, KernelDriver, wait_until

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def kernel(cluster: pilot.LocalCluster, tmp_path_factory) -> Iterator[KernelDriver]:
    ipydir = tmp_path_factory.mktemp("ipython")
    k = KernelDriver(env={"PILOT_HOME": str(cluster.home), "IPYTHONDIR": str(ipydir)})
    try:
        assert k.run("%load_ext pilot_magics").status == "ok"
        yield k
    finally:
        k.shutdown()


@pytest.fixture(scope="module")
def cluster() -> Iterator[pilot.LocalCluster]:
    with pilot.LocalCluster(workers=2, timeouts=TEST_TIMEOUTS) as c:
        yield c


def test_pilot_status_finds_the_gateway(kernel: KernelDriver) -> None:
    ex = kernel.run("%pilot status")
    assert ex.status == "ok"
    assert "2 workers" in ex.stdout and "local-0" in ex.stdout


def test_over_streams_labelled_lines_and_gathers_in_order(kernel: KernelDriver) -> None:
    kernel.run("import math\nscale = 3\ndef f(x):\n    return x * scale")
    ex = kernel.run(
        "%%distribute --over frame=range(1, 41) --chunk 4 --gather images\n"
        "print('rendering', frame)\n"
        "math.sqrt(f(frame))"
    )
    assert ex.status == "ok"
    lines = [line for line in ex.stdout.splitlines() if "rendering" in line]
    assert sorted(lines) == sorted(f"[frame {i}] rendering {i}" for i in range(1, 41))
    for k in range(0, 40, 4):  # within a task, its items' lines keep their order
        chunk = [f"[frame {i}] rendering {i}" for i in range(k + 1, k + 5)]
        positions = [lines.index(c) for c in chunk]
        assert positions == sorted(positions)
    assert "40 items on 2 workers" in ex.stdout and "speed-up" in ex.stdout
    check = kernel.run("assert images == [math.sqrt(3 * i) for i in range(1, 41)]; len(images)")
    assert check.status == "ok"


def test_progress_is_one_display_updated_in_place(kernel: KernelDriver) -> None:
    ex = kernel.run("%%distribute --over x=range(20) --chunk 1 --quiet\nx")
    shown = ex.of("display_data")
    updates = ex.of("update_display_data")
    assert len(shown) == 1
    display_id = shown[0]["content"]["transient"]["display_id"]
    assert updates and all(u["content"]["transient"]["display_id"] == display_id for u in updates)
    assert updates[-1]["content"]["data"]["text/plain"].startswith("20/20 tasks")
    assert "[x " not in ex.stdout, "--quiet shows only progress and summary"


def test_display_data_from_items_arrives_inline(kernel: KernelDriver) -> None:
    ex = kernel.run(
        "%%distribute --over n=[1, 2]\n"
        "from IPython.display import HTML, display\n"
        "display(HTML(f'<i>{n}</i>'))"
    )
    html = sorted(
        m["content"]["data"]["text/html"]
        for m in ex.of("display_data")
        if "text/html" in m["content"]["data"] and "<i>" in m["content"]["data"]["text/html"]
    )
    assert html == ["<i>1</i>", "<i>2</i>"]


def test_failed_item_shows_remote_traceback_with_cell_lines(kernel: KernelDriver) -> None:
    ex = kernel.run(
        "%%distribute --over x=range(6) --chunk 2 --retries 0 --async failing_job\n"
        "y = x * 2\n"
        "if x == 3:\n"
        "    raise ValueError(f'bad {x}')\n"
        "y"
    )
    assert ex.status == "ok"
    ex = kernel.run(
        "%%distribute --over x=range(6) --chunk 2 --retries 0\n"
        "y = x * 2\n"
        "if x == 3:\n"
        "    raise ValueError(f'bad {x}')\n"
        "y"
    )
    assert ex.status == "error"
    err = ex.error
    assert err["ename"] == "RemoteCellError"
    tb = "\n".join(err["traceback"])
    assert "item 3" in tb
    assert "line 3, in <module>" in tb and "raise ValueError(f'bad {x}')" in tb
    assert "ValueError: bad 3" in tb
    assert "_cell.py" not in tb and "_child.py" not in tb
    assert "[x 3] failed on" in ex.stderr
    kernel.run("import pytest\nwith pytest.raises(Exception):\n    failing_job.wait(30)")
    ok = kernel.run("failing_job.outcomes()")
    assert ok.status == "ok"
    result = ok.of("execute_result")[0]["content"]["data"]["text/plain"]
    assert result == "{0: 0, 1: 2, 4: 8, 5: 10}", "the other items stay reachable"


def test_until_stops_early_and_cancels_the_rest(kernel: KernelDriver) -> None:
    ex = kernel.run(
        "%%distribute --over k=range(200) --chunk 1 --until result >= 9 --gather hit\n"
        "import time\ntime.sleep(0.05)\nk * k"
    )
    assert ex.status == "ok", ex.messages
    assert "--until satisfied" in ex.stdout
    check = kernel.run("hit")
    data = check.of("execute_result")[0]["content"]["data"]["text/plain"]
    k, square = eval(data)
    assert square >= 9 and square == k * k
    jobs = kernel.run(
        "from pilot_magics import _loaded\n"
        "j = next(iter(_loaded.values())).last_job\n"
        "import contextlib, pilot\n"
        "with contextlib.suppress(pilot.JobCancelled):\n"
        "    j.wait(10)\n"  # the cancel's end arrives shortly after the hit
        "j.state.name"
    )
    state = jobs.of("execute_result")[0]["content"]["data"]["text/plain"]
    assert state == "'CANCELLED'"
    ran = kernel.run("sum(1 for d in j.tasks.values() if d.status == 0)")
    assert int(ran.of("execute_result")[0]["content"]["data"]["text/plain"]) < 200


def test_where_keeps_matching_results_as_a_dict(kernel: KernelDriver) -> None:
    ex = kernel.run(
        "%%distribute --over n=range(10) --chunk 3 --where result % 3 == 0 --gather kept\nn * 2"
    )
    assert ex.status == "ok"
    out = kernel.run("kept").of("execute_result")[0]["content"]["data"]["text/plain"]
    assert eval(out) == {0: 0, 3: 6, 6: 12, 9: 18}


def test_partitions_bind_partition_and_partitions(kernel: KernelDriver) -> None:
    ex = kernel.run("%%distribute --partitions 4 --gather parts\n(partition, partitions)")
    assert ex.status == "ok"
    out = kernel.run("parts").of("execute_result")[0]["content"]["data"]["text/plain"]
    assert eval(out) == [(0, 4), (1, 4), (2, 4), (3, 4)]


def test_async_returns_a_job_at_once_and_outputs_do_not_leak(kernel: KernelDriver) -> None:
    ex = kernel.run(
        "%%distribute --over i=range(4) --chunk 1 --async job\n"
        "import time\nprint('leak check', i)\ntime.sleep(0.2)\ni + 100"
    )
    assert ex.status == "ok" and "bound to job" in ex.stdout
    nxt = kernel.run("x_local = 1 + 1\nprint('next cell')")
    assert "leak check" not in nxt.stdout
    done = kernel.run("job.wait(60); job.results")
    assert done.status == "ok"
    assert done.of("execute_result")[0]["content"]["data"]["text/plain"] == "[100, 101, 102, 103]"
    assert "leak check" not in done.stdout


def test_interrupt_cancels_the_job_and_returns_control(
    kernel: KernelDriver, cluster: pilot.LocalCluster
) -> None:
    msg_id = kernel.kc.execute(
        "%%distribute --over s=range(4) --chunk 1\nimport time\nprint('go', flush=True)\n"
        "time.sleep(60)"
    )
    while True:  # wait until a task runs: its first line arrives
        msg = kernel.kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            break
    kernel.km.interrupt_kernel()
    ex = kernel.collect(msg_id, timeout=10)
    assert ex.status == "error"
    assert ex.reply["content"]["ename"] == "KeyboardInterrupt"
    client = cluster.client()
    wait_until(
        lambda: client.jobs(1)[0].state == Status.CANCELLED, timeout=10, what="job cancelled"
    )
    assert kernel.run("1 + 1").status == "ok", "the kernel is usable again"


def test_unsatisfiable_gpus_fails_at_once_listing_workers(kernel: KernelDriver) -> None:
    ex = kernel.run("%%distribute --partitions 2 --gpus 1\npartition")
    assert ex.status == "error"
    text = "\n".join(ex.error["traceback"]) + ex.error["evalue"]
    assert "No connected worker can run this job" in text and "0 GPUs" in text


def test_bad_options_are_usage_errors(kernel: KernelDriver) -> None:
    for line, expected in [
        ("--chunk 0 --over x=range(3)", "--chunk must be at least 1"),
        ("--over x", "--over needs NAME=EXPR"),
        ("--partitions 2 --over x=range(2)", "not both"),
        ("--frobnicate", "Unknown option --frobnicate"),
        ("--over x=range(3) --until result >", "not a Python expression"),
    ]:
        ex = kernel.run(f"%%distribute {line}\nx")
        assert ex.status == "error"
        reply = ex.reply["content"]  # IPython prints usage errors: no traceback message
        assert reply["ename"] == "UsageError"
        assert expected in reply["evalue"] and expected in ex.stderr, (line, reply["evalue"])


def test_unpicklable_notebook_value_is_named_before_submit(kernel: KernelDriver) -> None:
    kernel.run("import threading\nguard = threading.Lock()")
    ex = kernel.run("%%distribute --partitions 2\nwith guard:\n    partition")
    assert ex.status == "error"
    assert "guard" in ex.error["evalue"] and "cannot be pickled" in ex.error["evalue"]


def test_no_gateway_says_how_to_start_one(tmp_path) -> None:
    k = KernelDriver(env={"PILOT_HOME": str(tmp_path), "IPYTHONDIR": str(tmp_path / "ipy")})
    try:
        k.run("%load_ext pilot_magics")
        ex = k.run("%%distribute --partitions 1\npartition")
        assert ex.status == "error"
        evalue = ex.reply["content"]["evalue"]
        assert "pilot up" in evalue and "%pilot connect" in evalue
    finally:
        k.shutdown()
