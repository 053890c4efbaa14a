"""Where one task's round trip goes, hop by hop (issue 12: a round trip of 0.7 ms at most).

A ``LocalCluster`` (a gateway and two workers of one slot, as ``bench/throughput.py`` runs it)
with every process stamping the clock (``time.perf_counter_ns``, one clock on one machine) as
it starts to encode a message and as it has decoded one; the gateway also stamps each commit of
its database (a ``StateStore.flush`` that wrote rows), and the client when ``submit`` is called
and when ``result()`` returns. The stamps come from a ``sitecustomize`` module this script
writes into a temporary directory on the processes' ``PYTHONPATH``: nothing in the product
changes, and nothing is stamped unless this script runs it.

Then ``--n`` round trips of a no-op, one after the other (after ``--warm`` untimed ones). Each
round trip's stamps, in time order, make a path (client, gateway, worker, task process and
back); the table shows each step of the most common path with its median and p90 over the
round trips, its share of the median round trip, and what the step is: a hop (a message
encoded in one process and decoded in the next: the encoding, signing, ZeroMQ, the receiver's
wake-up and the decoding), a process's own work between two messages, or the gateway's
commit. Stamping costs a few microseconds a stamp: the round trip here is a little slower than
``bench/throughput.py``'s.

    .venv/bin/python bench/hops.py                 # 500 round trips
    .venv/bin/python bench/hops.py --n 2000 --out hops.json
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: import the bench package by its name
    sys.path.insert(0, str(ROOT))

from bench._table import print_table, write_json  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "hops.json"

# Written into a temporary directory on the cluster's PYTHONPATH: each process stamps into
# ``$PILOT_HOPS_DIR/<pid>.txt``, one line a stamp: "<ns> <what> <message type>".
_SITECUSTOMIZE = """
import os, sys, time
_dir = os.environ.get("PILOT_HOPS_DIR")
if _dir:
    from bench.hops import stamp_codec, stamp_commits
    _out = open(os.path.join(_dir, f"{os.getpid()}.txt"), "a", buffering=1)
    _out.write("0 argv " + " ".join(sys.argv) + "\\n")
    stamp_codec(_out.write)
    if "gateway" in sys.argv:
        stamp_commits(_out.write)
"""


def stamp_codec(write: Any) -> None:
    """Stamp every ``Codec.encode`` (as it starts) and ``Codec.decode`` (once done)."""
    from gateway.protocol import _wire

    encode, decode = _wire.Codec.encode, _wire.Codec.decode
    clock = time.perf_counter_ns

    def stamped_encode(self: Any, msg: Any) -> Any:
        write(f"{clock()} enc {type(msg).__name__}\n")
        return encode(self, msg)

    def stamped_decode(self: Any, frames: Any) -> Any:
        envelope = decode(self, frames)
        write(f"{clock()} dec {type(envelope.msg).__name__}\n")
        return envelope

    _wire.Codec.encode, _wire.Codec.decode = stamped_encode, stamped_decode


def stamp_commits(write: Any) -> None:
    """Stamp the start and the end of each gateway commit that wrote rows."""
    from gateway.server import _state

    flush = _state.StateStore.flush
    clock = time.perf_counter_ns

    def stamped_flush(self: Any) -> bool:
        if not self._pending and not self._running:
            return flush(self)
        start = clock()
        durable = flush(self)
        write(f"{start} commit begins\n{clock()} commit ends\n")
        return durable

    _state.StateStore.flush = stamped_flush


def _kind(argv: str) -> str:
    if "ipc://" in argv:  # python -m worker._child ipc://...: a worker's task process
        return "task process"
    for kind in ("gateway", "worker"):
        if kind in argv:
            return kind
    return "client"


def read_stamps(folder: Path) -> list[tuple[int, str, str, str]]:
    """Every stamp of every process, in time order: (ns, process kind, what, message type)."""
    stamps = []
    for path in folder.glob("*.txt"):
        kind = "client"
        for line in path.read_text().splitlines():
            ns, what, rest = line.split(" ", 2)
            if what == "argv":
                kind = _kind(rest)
            else:
                stamps.append((int(ns), kind, what, rest))
    stamps.sort()
    return stamps


def round_trips(stamps: list[tuple[int, str, str, str]]) -> list[list[tuple[int, str]]]:
    """The stamps of each round trip, from the client's submit to its result: (ns, label)."""
    trips, current = [], None
    for ns, kind, what, name in stamps:
        label = f"{kind}: {what} {name}"
        if kind == "client" and what == "user" and name == "submit":
            current = [(ns, label)]
        elif current is not None:
            current.append((ns, label))
            if kind == "client" and what == "user" and name == "result":
                trips.append(current)
                current = None
    return trips


def _what(a: str, b: str) -> str:
    if a.split(":")[0] != b.split(":")[0]:
        return "hop"
    if a.endswith("commit begins"):
        return "commit"
    return "work"


def steps(trips: list[list[tuple[int, str]]]) -> tuple[list[dict[str, Any]], list[float], int]:
    """Per step of the most common path: its median and p90 in µs; and every round trip's
    total (µs) along that path, and how many round trips took it."""
    paths = collections.Counter(tuple(label for _, label in t) for t in trips)
    path = paths.most_common(1)[0][0]
    same = [t for t in trips if tuple(label for _, label in t) == path]
    totals = [(t[-1][0] - t[0][0]) / 1e3 for t in same]
    median_total = statistics.median(totals)
    rows = []
    for i in range(1, len(path)):
        took = sorted((t[i][0] - t[i - 1][0]) / 1e3 for t in same)
        median = statistics.median(took)
        rows.append(
            {
                "step": f"{path[i - 1]} -> {path[i]}",
                "is": _what(path[i - 1], path[i]),
                "median us": round(median, 1),
                "p90 us": round(took[int(0.9 * (len(took) - 1))], 1),
                "share": f"{median / median_total:.0%}",
            }
        )
    return rows, totals, len(same)


def run(n: int, warm: int, folder: Path) -> None:
    """The cluster, stamped, and ``warm + n`` round trips (stamps land in ``folder``)."""
    import pilot
    from bench._baselines import noop

    site = folder / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    path = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {"PILOT_LOG_LEVEL": "WARNING", "PILOT_HOPS_DIR": str(folder), "PYTHONPATH": path}
    clock = time.perf_counter_ns
    with open(folder / f"{os.getpid()}.txt", "a", buffering=1) as out:
        out.write("0 argv client\n")
        with pilot.LocalCluster(workers=2, env=env) as cluster:
            client = cluster.client()
            for i in range(warm):
                client.submit(noop, i).result(30)
            stamp_codec(out.write)  # the client's codec lives in this process
            for i in range(n):
                out.write(f"{clock()} user submit\n")
                client.submit(noop, i).result(30)
                out.write(f"{clock()} user result\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="round trips measured")
    parser.add_argument("--warm", type=int, default=200, help="round trips first, not measured")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="pilot-hops-") as tmp:
        run(args.n, args.warm, Path(tmp))
        trips = round_trips(read_stamps(Path(tmp)))
    rows, totals, taken = steps(trips)
    by_kind: dict[str, float] = collections.defaultdict(float)
    for row in rows:
        by_kind[row["is"]] += row["median us"]
    print(f"\n{taken} of {len(trips)} round trips took the most common path")
    print(f"round trip: median {statistics.median(totals):.0f} µs, worst {max(totals):.0f} µs")
    print(", ".join(f"{kind}: {us:.0f} µs" for kind, us in sorted(by_kind.items())))
    print("(sums of the steps' medians)\n")
    print_table(rows, ["step", "is", "median us", "p90 us", "share"])
    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "n": args.n,
        "round_trips": len(trips),
        "on_the_common_path": taken,
        "median_us": statistics.median(totals),
        "worst_us": max(totals),
        "sum_of_medians_us": dict(by_kind),
        "steps": rows,
    }
    print(f"\nwritten to {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
