"""Where the time goes: a Parallel Pilot workload under py-spy, per process (issue 12).

The workload runs a ``LocalCluster`` (a gateway and two workers of one slot, as
``bench/throughput.py`` does) under ``py-spy record --subprocesses``, which samples the client,
the gateway, the workers and their task processes at ``--rate`` samples a second, CPU only
(threads waiting are not sampled), without pausing them (``--nonblocking``: pausing every
process 100 times a second halved the big argument's rate here). The workload still runs
slower than without py-spy (the no-op burst at 2,800 a second against about 4,000): read the
shares, not the rates. Then, per process kind, the table shows the CPU seconds
sampled and the functions of this package where they went (inclusive: a function and what it
calls), and the hottest leaves (any code: where the CPU was when sampled).

Workloads:

- ``noop``: ``--n`` no-op ``submit``s, each a job, then every result (throughput.py's no-op
  burst);
- ``roundtrip``: ``--n`` no-op ``submit``s one after the other, each waited for;
- ``big``: ``--n`` tasks each given a new 100 MB numpy array.

    .venv/bin/python bench/cpu_profile.py                      # noop, 20,000 jobs
    .venv/bin/python bench/cpu_profile.py --workload big --n 6 --out big.json

py-spy comes with the ``bench`` extra (``pip install -e .[bench]``); it needs to be allowed to
read other processes' memory (root, or ``kernel.yama.ptrace_scope`` 0 for its children).
Samples land in C code too (zmq, sqlite3, blake3) under the Python function that called it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: import the bench package by its name
    sys.path.insert(0, str(ROOT))

from bench._table import print_table, write_json  # noqa: E402

KINDS = {  # a process's command line -> its kind
    "pilot gateway": "gateway",
    "pilot worker": "worker",
    "worker._child": "task process",
}
OURS = ("gateway/", "worker/", "pilot/", "pilot_magics/", "pilot_kernel/")
TOP = 12  # functions per process kind in the table
TIMEOUT_S = 1800.0  # the whole workload under py-spy


def run_workload(workload: str, n: int) -> None:
    """The workload itself (in the process py-spy starts)."""
    import numpy as np

    import pilot
    from bench._baselines import nbytes_and_last, noop

    with pilot.LocalCluster(workers=2, env={"PILOT_LOG_LEVEL": "WARNING"}) as cluster:
        client = cluster.client()
        client.submit(noop, 0).result(60)
        t0 = time.perf_counter()
        if workload == "noop":
            for job in [client.submit(noop, i) for i in range(n)]:
                job.result(300)
        elif workload == "roundtrip":
            for i in range(n):
                client.submit(noop, i).result(60)
        else:
            arr = np.arange(100_000_000 // 8, dtype=np.float64)
            for i in range(n):
                arr[0] = -1.0 - i  # new content each time
                client.submit(nbytes_and_last, arr).result(120)
        took = time.perf_counter() - t0
        print(f"{workload}: {n:,} in {took:.2f} s ({n / took:,.1f} a second)", flush=True)


def _kind(process_frame: str) -> str:
    for needle, kind in KINDS.items():
        if needle in process_frame:
            return kind
    return "client"


def _ours(frame: str) -> bool:
    """A frame of this package, ``name (gateway/server/_x.py:12)``, but the entry points
    (a module's body, ``main``, the CLI), which hold every sample of their process."""
    name, _, where = frame.rpartition(" (")
    if name in ("<module>", "main") or where.startswith("pilot/_cli.py"):
        return False
    return where.startswith(OURS)


def summarize(raw: Path, rate: int) -> dict[str, dict]:
    """Per process kind: CPU seconds sampled, and the top functions (inclusive) and leaves."""
    samples: Counter[str] = Counter()
    inclusive: dict[str, Counter[str]] = defaultdict(Counter)
    leaves: dict[str, Counter[str]] = defaultdict(Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        at = max((i for i, f in enumerate(frames) if f.startswith("process ")), default=-1)
        kind = _kind(frames[at]) if at >= 0 else "client"
        rest = frames[at + 1 :]
        n = int(count)
        samples[kind] += n
        if rest:
            leaves[kind][_function(rest[-1])] += n
        for name in {_function(f) for f in rest if _ours(f)}:
            inclusive[kind][name] += n
    out = {}
    for kind, total in samples.most_common():
        out[kind] = {
            "cpu_s": total / rate,
            "functions": [(f, n / total) for f, n in inclusive[kind].most_common(TOP)],
            "leaves": [(f, n / total) for f, n in leaves[kind].most_common(TOP // 2)],
        }
    return out


def _function(frame: str) -> str:
    """``Class.method (path/file.py:12)`` -> ``Class.method (path/file.py)``: lines merged."""
    name, _, where = frame.rpartition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if name else frame


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=["noop", "roundtrip", "big"], default="noop")
    ap.add_argument("--n", type=int, help="jobs (default: noop 20000, roundtrip 3000, big 6)")
    ap.add_argument("--rate", type=int, default=100, help="samples a second")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu_profile.json"))
    ap.add_argument("--run", action="store_true", help=argparse.SUPPRESS)  # under py-spy
    args = ap.parse_args(argv)
    n = args.n or {"noop": 20_000, "roundtrip": 3_000, "big": 6}[args.workload]
    if args.run:
        run_workload(args.workload, n)
        return 0
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        sys.exit("py-spy is not installed: pip install -e '.[bench]'")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "stacks.txt"
        cmd = [spy, "record", "--subprocesses", "--nonblocking", "--format", "raw"]
        cmd += ["-r", str(args.rate)]
        cmd += ["-o", str(raw), "--", sys.executable, __file__, "--run"]
        cmd += ["--workload", args.workload, "--n", str(n)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
        print("\n".join(ln for ln in done.stdout.splitlines() if not ln.startswith("py-spy>")))
        if done.returncode != 0 or not raw.exists():
            sys.exit(f"py-spy failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        found = summarize(raw, args.rate)
    for kind, got in found.items():
        print(f"\n{kind}: {got['cpu_s']:.2f} CPU seconds sampled")
        for column, key in (("function (inclusive)", "functions"), ("leaf", "leaves")):
            rows = [{column: f, "share": f"{100 * s:.1f}%"} for f, s in got[key]]
            print_table(rows, [column, "share"])
    path = write_json(args.out, {"workload": args.workload, "n": n, "rate": args.rate, **found})
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
