"""Parallel Pilot's worker: connects out to a gateway and runs tasks in child processes.

Front door: ``Worker`` (an async context manager) and ``parse_size`` for ``--cache-size``.
"""

from worker._worker import Worker


def parse_size(text: str) -> int:
    """``"20GB"`` -> bytes (B, KB, MB, GB, TB and KiB..TiB; a bare number is bytes)."""
    units = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    t = text.strip().upper().replace(" ", "")
    binary = t.endswith("IB")
    t = t[:-2] if binary else t[:-1] if t.endswith("B") else t
    unit = t[-1] if t and t[-1] in "KMGT" else ""
    number = float(t[: len(t) - len(unit)])
    scale = 1024 ** "KMGT".index(unit) * 1024 if (binary and unit) else units[unit]
    return int(number * scale)


__all__ = ["Worker", "parse_size"]
