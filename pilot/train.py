"""What a training cell uses inside a rank: ``import pilot.train as pt``.

::

    model = DDP(Net().to(pt.device()))      # the process group is already initialised
    state = pt.restore()                     # this job's latest checkpoint, or None
    pt.report(step=step, loss=loss)          # one JSON line to the worker, streamed to the cell
    pt.checkpoint({"step": step, "model": model.module.state_dict()})

Everything here reads the environment the worker set for the rank (``RANK``, ``WORLD_SIZE``,
``CUDA_VISIBLE_DEVICES``, ``PILOT_METRICS_FD``/``PILOT_METRICS_PATH``,
``PILOT_CHECKPOINT_URL``, ``PILOT_CHECKPOINT_DIR``/``PILOT_CHECKPOINT_SEQ``,
``PILOT_RESTORE_PATH``); outside a rank it behaves as rank 0 of a world of one.

Two homes for checkpoints. Without a checkpoint URL (the default) the **gateway** keeps them:
``checkpoint`` writes the file whole into ``PILOT_CHECKPOINT_DIR`` (a directory of the worker's;
temporary name, then a rename) and announces it on the metrics pipe as ``{"checkpoint": PATH,
"seq": N, "size": BYTES}``; the worker stores it in the gateway's blob store and deletes it,
and the gateway hands the newest to the ranks of a restart: the worker fetches it before the
rank starts and ``restore`` loads ``PILOT_RESTORE_PATH`` (``""``: none yet). Numbers count on
from the restored checkpoint's (``PILOT_CHECKPOINT_SEQ``), so a restart's checkpoints are newer.

With a checkpoint **URL** (``--checkpoint``), they live under it (any fsspec URL, or a local
directory) as
``ckpt-<seq:08d>.pt`` plus a ``LATEST`` file naming the newest. Each file is written whole
before it becomes visible: on filesystems with a rename, to a temporary name then moved; on
object stores (and ``memory://``), where one PUT is atomic, directly. ``LATEST`` is written
last, so a reader that follows it never finds half a checkpoint. The newest
``KEEP_CHECKPOINTS`` are kept and older ones deleted. Only rank 0 writes: DDP keeps every rank's
model identical, so the others have nothing different to save, and no barrier is needed (a
rank that reaches ``restore`` later still finds a complete checkpoint). Each is announced on
the metrics pipe too (``{"checkpoint": URL, "seq": N, "size": BYTES, "url": true}``): the
worker tells the notebook, and counts it as the rank's progress.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pilot import ConfigError

if TYPE_CHECKING:
    import torch
    from fsspec import AbstractFileSystem

__all__ = [
    "KEEP_CHECKPOINTS",
    "checkpoint",
    "device",
    "rank",
    "report",
    "restore",
    "world_size",
]

KEEP_CHECKPOINTS = 3
LATEST_NAME = "LATEST"
RESTORE_ATTEMPTS = 3  # LATEST moved on and its file was pruned between our two reads: retry
_CHECKPOINT_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")
_RESERVED_KEYS = frozenset({"rank", "time"})
# Filesystems where one PUT of a whole object is atomic (and a "move" is a copy): write there
# directly. Everything else gets a temporary name and a rename.
_ATOMIC_PUT_PROTOCOLS = frozenset(
    {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2", "memory"}
)


def rank() -> int:
    """This process's global rank (``RANK``; 0 outside a DDP job)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """How many ranks the job has (``WORLD_SIZE``; 1 outside a DDP job)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def device() -> torch.device:
    """The rank's device: ``cuda:0`` (the first of the GPUs ``CUDA_VISIBLE_DEVICES`` gives
    it) when it has one and CUDA works, else ``cpu``. ``CUDA_VISIBLE_DEVICES=""`` (a CPU
    rank) means cpu even on a machine with GPUs."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if (visible is None or visible.strip()) and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


# -- metrics ---------------------------------------------------------------------------------


def _metric_value(key: str, value: Any) -> int | float | str:
    if isinstance(value, int | float | str):
        return value
    # A one-element torch tensor or numpy array/scalar: its Python number. Duck-typed so this
    # module does not import torch or numpy just to check.
    count = value.numel() if callable(getattr(value, "numel", None)) else getattr(value, "size", 0)
    if count == 1 and callable(getattr(value, "item", None)):
        item = value.item()
        if isinstance(item, int | float | str):
            return item
    raise TypeError(
        f"pt.report({key}=...): a {type(value).__name__} is not a metric; pass an int, float "
        "or str, or a one-element tensor (loss.item())"
    )


def _announce(record: dict[str, Any]) -> None:
    """A line for the worker only (a checkpoint written): nothing outside a worker's rank."""
    if os.environ.get("PILOT_METRICS_FD") or os.environ.get("PILOT_METRICS_PATH"):
        _emit(json.dumps(record))


def _emit(line: str) -> None:
    fd = os.environ.get("PILOT_METRICS_FD")
    path = os.environ.get("PILOT_METRICS_PATH")
    if fd:
        data = (line + "\n").encode()
        # One write per line: up to PIPE_BUF bytes, a pipe never interleaves it with another.
        while data:
            data = data[os.write(int(fd), data) :]
    elif path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    else:
        print(f"[metrics] {line}", flush=True)


def report(**metrics: Any) -> dict[str, Any]:
    """Report this step's metrics: one JSON line ``{"rank": .., "time": .., **metrics}`` to the
    worker's metrics pipe (``PILOT_METRICS_FD``), else appended to ``PILOT_METRICS_PATH``, else
    printed as ``[metrics] {...}``. Values are ints, floats or strs; a one-element tensor or
    numpy value is converted with ``.item()``. Returns the record. Raises ``TypeError`` for
    any other value and ``ValueError`` for the reserved keys ``rank`` and ``time``."""
    reserved = _RESERVED_KEYS.intersection(metrics)
    if reserved:
        raise ValueError(f"pt.report(): {', '.join(sorted(reserved))} is set by pilot itself")
    record: dict[str, Any] = {"rank": rank(), "time": time.time()}
    for key, value in metrics.items():
        record[key] = _metric_value(key, value)
    _emit(json.dumps(record))
    return record


# -- checkpoints -----------------------------------------------------------------------------


def _no_checkpoint_location() -> ConfigError:
    return ConfigError(
        "This job has no checkpoint location: launch it with `--checkpoint URL` (or "
        "`checkpoint=URL`), or set PILOT_CHECKPOINT_URL to a directory or fsspec URL."
    )


def _checkpoint_root() -> tuple[AbstractFileSystem, str]:
    from fsspec.core import url_to_fs

    url = os.environ.get("PILOT_CHECKPOINT_URL")
    if not url:
        raise _no_checkpoint_location()
    fs, root = url_to_fs(url)
    return fs, root.rstrip("/")


_seq: int | None = None  # the number of this process's next gateway checkpoint


def _next_seq(step: int | None) -> int:
    """``step`` when given, else one more than the last (from ``PILOT_CHECKPOINT_SEQ``)."""
    global _seq
    if _seq is None:
        _seq = int(os.environ.get("PILOT_CHECKPOINT_SEQ", "0"))
    seq = _seq if step is None else step
    _seq = max(_seq, seq + 1)
    return seq


def _checkpoint_to_worker(data: bytes, step: int | None, directory: str) -> str:
    """Write the checkpoint for the worker to store in the gateway (module docstring)."""
    seq = _next_seq(step)
    if seq < 0:
        raise ValueError(f"pt.checkpoint(step={seq}): steps count from 0")
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"ckpt-{seq:08d}.pt"
    tmp = root / f".{path.name}.tmp-{uuid.uuid4().hex}"
    tmp.write_bytes(data)
    os.replace(tmp, path)
    _announce({"checkpoint": str(path), "seq": seq, "size": len(data)})
    return str(path)


def _put_whole(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees all of it or nothing."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if _ATOMIC_PUT_PROTOCOLS.intersection(protocols):
        fs.pipe_file(path, data)
        return
    parent, _, name = path.rpartition("/")
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex}"
    fs.pipe_file(tmp, data)
    try:
        fs.mv(tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm_file(tmp)
        raise


def _latest_name(fs: AbstractFileSystem, root: str) -> str | None:
    try:
        name = fs.cat_file(f"{root}/{LATEST_NAME}").decode().strip()
    except FileNotFoundError:
        return None
    return name if _CHECKPOINT_NAME.match(name) else None


def _prune(fs: AbstractFileSystem, root: str, current: str) -> None:
    names = [p.rpartition("/")[2] for p in fs.ls(root, detail=False)]
    seqs = sorted(int(m[1]) for m in map(_CHECKPOINT_NAME.match, names) if m)
    keep = {f"ckpt-{seq:08d}.pt" for seq in seqs[-KEEP_CHECKPOINTS:]} | {current}
    for name in names:
        if _CHECKPOINT_NAME.match(name) and name not in keep:
            fs.rm_file(f"{root}/{name}")


def checkpoint(obj: Any, step: int | None = None) -> str | None:
    """Save ``obj`` (``torch.save``) as this job's newest checkpoint and return its URL; on
    ranks other than 0, do nothing and return ``None`` (see the module docstring). ``step``
    numbers the file (``ckpt-<step:08d>.pt``); without it, one more than the newest. Keeps the
    newest ``KEEP_CHECKPOINTS``. Without a checkpoint URL, in a rank, the gateway keeps it
    (module docstring) and the path written is returned. Raises ``ConfigError`` when the job
    has neither (outside a rank, without ``PILOT_CHECKPOINT_URL``)."""
    if rank() != 0:
        return None
    import torch

    local = os.environ.get("PILOT_CHECKPOINT_DIR")
    if not os.environ.get("PILOT_CHECKPOINT_URL") and local:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return _checkpoint_to_worker(buf.getvalue(), step, local)
    fs, root = _checkpoint_root()
    fs.makedirs(root, exist_ok=True)
    if step is None:
        latest = _latest_name(fs, root)
        step = int(_CHECKPOINT_NAME.match(latest)[1]) + 1 if latest else 0  # type: ignore[index]
    if step < 0:
        raise ValueError(f"pt.checkpoint(step={step}): steps count from 0")
    buf = io.BytesIO()
    torch.save(obj, buf)  # before anything is written: an object that fails to save leaves no trace
    name = f"ckpt-{step:08d}.pt"
    path = f"{root}/{name}"
    _put_whole(fs, path, buf.getvalue())
    _put_whole(fs, f"{root}/{LATEST_NAME}", f"{name}\n".encode())
    _prune(fs, root, current=name)
    url = fs.unstrip_protocol(path)
    _announce({"checkpoint": url, "seq": step, "size": buf.getbuffer().nbytes, "url": True})
    return url


def restore() -> Any | None:
    """The object of this job's newest checkpoint (``torch.load`` onto ``device()``, with
    ``weights_only=False``: it is the job's own data), or ``None`` when there is none yet.
    Every rank may call it. Without a checkpoint URL, in a rank, it is the checkpoint the
    gateway kept (``PILOT_RESTORE_PATH``). Raises ``ConfigError`` when the job has neither."""
    import torch

    if not os.environ.get("PILOT_CHECKPOINT_URL") and "PILOT_RESTORE_PATH" in os.environ:
        path = os.environ["PILOT_RESTORE_PATH"]
        if not path:
            return None
        return torch.load(path, map_location=device(), weights_only=False)
    fs, root = _checkpoint_root()
    for _ in range(RESTORE_ATTEMPTS):
        name = _latest_name(fs, root)
        if name is None:
            return None
        try:
            data = fs.cat_file(f"{root}/{name}")
        except FileNotFoundError:
            continue  # pruned after we read LATEST: LATEST names a newer one now
        return torch.load(io.BytesIO(data), map_location=device(), weights_only=False)
    raise FileNotFoundError(f"{root}/{LATEST_NAME} names no checkpoint that still exists")
