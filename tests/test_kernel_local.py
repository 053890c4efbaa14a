"""The Parallel Pilot kernel, run locally: kernelspec, conformance and what IDEs rely on.

Every kernel here is a real process started through jupyter_client from a kernelspec installed
into a temporary prefix; ``JUPYTER_PATH`` and ``IPYTHONDIR`` point into temporary directories so
the user's own Jupyter and IPython set-up is never read or written. Waits have deadlines.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

import pilot_kernel

# Collected here, exactly once (see the helper module's docstring).
from kernel_conformance import PilotKernelTests  # noqa: F401
from pilot_kernel import install, uninstall
from pilot_kernel._kernelspec import spec_dict

KERNEL_NAME = "parallel-pilot"
START_TIMEOUT_S = 30
REPLY_TIMEOUT_S = 15


# --- the kernelspec -------------------------------------------------------------------------


def test_spec_dict_names_this_interpreter_and_the_pilot_kernel_class() -> None:
    spec = spec_dict(KERNEL_NAME, "Parallel Pilot")

    interpreter = Path(spec["argv"][0])
    assert interpreter.is_absolute()
    assert interpreter == Path(sys.executable).absolute()
    assert spec["argv"][1:] == [
        "-m",
        "ipykernel_launcher",
        "-f",
        "{connection_file}",
        "--IPKernelApp.kernel_class=pilot_kernel.kernel.PilotKernel",
    ]
    assert spec["language"] == "python"
    assert spec["interrupt_mode"] == "signal"
    assert spec["metadata"] == {"debugger": True}


@pytest.mark.parametrize(
    ("name", "display_name"),
    [
        ("python3", "Parallel Pilot"),
        ("Python-pilot", "Parallel Pilot"),
        ("parallel pilot", "Parallel Pilot"),
        ("parallel-pilot", "Python 3"),
        ("parallel-pilot", " "),
    ],
)
def test_spec_dict_refuses_names_vs_code_hides_or_jupyter_rejects(
    name: str, display_name: str
) -> None:
    with pytest.raises(ValueError, match=r"choose|use letters"):
        spec_dict(name, display_name)


def test_install_into_a_prefix_writes_kernel_json_and_uninstall_removes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = tmp_path / "prefix"
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))

    spec_dir = Path(install(prefix=prefix))

    assert spec_dir == prefix / "share" / "jupyter" / "kernels" / KERNEL_NAME
    kernel_json = json.loads((spec_dir / "kernel.json").read_text())
    assert kernel_json == spec_dict(KERNEL_NAME, "Parallel Pilot")
    assert not KERNEL_NAME.startswith("python")
    assert kernel_json["display_name"] == "Parallel Pilot"
    assert (spec_dir / "logo-64x64.png").is_file()
    found = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    assert found.display_name == "Parallel Pilot"
    assert found.interrupt_mode == "signal"

    assert Path(uninstall(prefix=prefix)) == spec_dir
    assert not spec_dir.exists()
    with pytest.raises(FileNotFoundError, match=KERNEL_NAME):
        uninstall(prefix=prefix)


def test_install_user_writes_to_the_jupyter_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "data"))

    spec_dir = Path(install(user=True, name="pilot-test", display_name="Pilot Test"))

    assert spec_dir == tmp_path / "data" / "kernels" / "pilot-test"
    assert json.loads((spec_dir / "kernel.json").read_text())["display_name"] == "Pilot Test"
    # No location given: uninstall finds it on the Jupyter path, like `jupyter kernelspec`.
    assert Path(uninstall("pilot-test")) == spec_dir
    assert not spec_dir.exists()


def test_install_refuses_two_locations(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one kernelspec location"):
        install(user=True, prefix=tmp_path)


def test_module_command_line_installs_and_uninstalls(tmp_path: Path) -> None:
    from pilot_kernel.__main__ import main

    assert main(["install", "--prefix", str(tmp_path), "--name", "pilot-cli"]) == 0
    assert (tmp_path / "share" / "jupyter" / "kernels" / "pilot-cli" / "kernel.json").is_file()
    assert main(["uninstall", "--prefix", str(tmp_path), "--name", "pilot-cli"]) == 0
    assert main(["uninstall", "--prefix", str(tmp_path), "--name", "pilot-cli"]) == 1


def test_front_door_is_curated_and_cheap_to_import() -> None:
    assert pilot_kernel.__all__ == ["PilotKernel", "install", "uninstall"]
    # A fresh interpreter: this one has imported ipykernel already.
    probe = (
        "import sys, pilot_kernel; "
        "assert 'ipykernel' not in sys.modules, 'import pilot_kernel pulled in ipykernel'; "
        "from pilot_kernel import PilotKernel; "
        "assert PilotKernel.implementation == 'pilot_kernel'"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)


# --- a running kernel -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KernelManager, Any]]:
    """One Parallel Pilot kernel for this module's tests, from a spec in a temporary prefix."""
    scratch = tmp_path_factory.mktemp("pilot-kernel")
    prefix = scratch / "prefix"
    install(prefix=prefix)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
        env.setenv("IPYTHONDIR", str(scratch / "ipython"))
        manager = KernelManager(kernel_name=KERNEL_NAME)
        manager.start_kernel()
        try:
            client = manager.client()
            client.start_channels()
            try:
                client.wait_for_ready(timeout=START_TIMEOUT_S)
                yield manager, client
            finally:
                client.stop_channels()
        finally:
            manager.shutdown_kernel()


@pytest.fixture
def kc(kernel: tuple[KernelManager, BlockingKernelClient]) -> BlockingKernelClient:
    return kernel[1]


def run(
    kc: BlockingKernelClient, code: str, **kwargs: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Execute ``code``; return the execute_reply and the cell's iopub messages (not status)."""
    outputs: list[dict[str, Any]] = []

    def collect(msg: dict[str, Any]) -> None:
        if msg["msg_type"] not in {"status", "execute_input"}:
            outputs.append(msg)

    kwargs.setdefault("timeout", REPLY_TIMEOUT_S)
    reply = kc.execute_interactive(code, output_hook=collect, **kwargs)
    return reply, outputs


def stdout_of(outputs: list[dict[str, Any]]) -> str:
    return "".join(
        msg["content"]["text"]
        for msg in outputs
        if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout"
    )


@pytest.mark.system
def test_kernel_info_names_the_pilot_kernel(kc: BlockingKernelClient) -> None:
    msg_id = kc.kernel_info()
    reply = kc.get_shell_msg(timeout=REPLY_TIMEOUT_S)

    assert reply["parent_header"]["msg_id"] == msg_id
    content = reply["content"]
    assert content["implementation"] == "pilot_kernel"
    assert content["implementation_version"]
    assert content["language_info"]["name"] == "python"
    assert "Parallel Pilot" in content["banner"]
    # ipykernel 7 advertises the debugger in supported_features (protocol 5.5), 6.x in "debugger".
    assert "debugger" in content.get("supported_features", []) or content.get("debugger") is True


@pytest.mark.system
def test_pilot_magics_are_loaded_at_start(kc: BlockingKernelClient) -> None:
    # pilot_magics is imported in any case; it is registered as loaded once it defines
    # load_ipython_extension (until then the kernel logs a warning and starts anyway).
    reply, outputs = run(
        kc,
        "import sys; ip = get_ipython(); m = sys.modules.get('pilot_magics'); "
        "print(m is not None, "
        "hasattr(m, 'load_ipython_extension') == ('pilot_magics' in ip.extension_manager.loaded))",
    )
    assert reply["content"]["status"] == "ok"
    assert stdout_of(outputs).split() == ["True", "True"]


@pytest.mark.system
def test_comm_info_lists_comms_by_target(kc: BlockingKernelClient) -> None:
    msg_id = kc.comm_info(target_name="jupyter.widget")
    reply = kc.get_shell_msg(timeout=REPLY_TIMEOUT_S)
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "ok"
    assert isinstance(reply["content"]["comms"], dict)

    reply, _ = run(
        kc, "from comm import create_comm; probe = create_comm(target_name='pilot.probe')"
    )
    assert reply["content"]["status"] == "ok"
    kc.comm_info(target_name="pilot.probe")
    comms = kc.get_shell_msg(timeout=REPLY_TIMEOUT_S)["content"]["comms"]
    assert [entry["target_name"] for entry in comms.values()] == ["pilot.probe"]


@pytest.mark.system
def test_input_is_answered_through_stdin(kc: BlockingKernelClient) -> None:
    prompts: list[str] = []

    def answer(msg: dict[str, Any]) -> None:
        assert msg["msg_type"] == "input_request"
        prompts.append(msg["content"]["prompt"])
        kc.input("pilot")

    reply, outputs = run(kc, "print(input('name? ').upper())", allow_stdin=True, stdin_hook=answer)

    assert reply["content"]["status"] == "ok"
    assert prompts == ["name? "]
    assert stdout_of(outputs) == "PILOT\n"


@pytest.mark.system
def test_display_handles_update_in_place(kc: BlockingKernelClient) -> None:
    reply, outputs = run(
        kc,
        "from IPython.display import display\n"
        "handle = display('first', display_id=True)\n"
        "handle.update('second')\n",
    )

    assert reply["content"]["status"] == "ok"
    kinds = [msg["msg_type"] for msg in outputs]
    assert kinds == ["display_data", "update_display_data"]
    shown, updated = outputs
    assert shown["content"]["data"]["text/plain"] == "'first'"
    assert updated["content"]["data"]["text/plain"] == "'second'"
    display_id = shown["content"]["transient"]["display_id"]
    assert updated["content"]["transient"]["display_id"] == display_id


@pytest.mark.system
def test_interrupt_stops_a_sleeping_cell(
    kernel: tuple[KernelManager, BlockingKernelClient],
) -> None:
    manager, kc = kernel
    interrupted: list[bool] = []

    def interrupt_once_asleep(msg: dict[str, Any]) -> None:
        # The marker is printed right before the sleep: interrupting then hits the sleep.
        if msg["msg_type"] == "stream" and "going to sleep" in msg["content"]["text"]:
            manager.interrupt_kernel()
            interrupted.append(True)

    reply = kc.execute_interactive(
        "import time\nprint('going to sleep', flush=True)\ntime.sleep(30)\n",
        output_hook=interrupt_once_asleep,
        timeout=REPLY_TIMEOUT_S,
    )

    assert interrupted == [True]
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt"
    # The kernel survives the interrupt.
    reply, outputs = run(kc, "print(6 * 7)")
    assert reply["content"]["status"] == "ok"
    assert stdout_of(outputs) == "42\n"
