"""Rendering: one plain ``blender -b`` on one thread next to ``client.render`` on 2 workers.

The same 48-frame scene (made here by Blender's own Python: a cube that slides and turns under
a sun, 128x128, Cycles on the CPU, ``--samples`` 384 so that one frame takes about 0.4 s on
one thread of an idle core, denoising off) is rendered in each repeat (``--repeats``, default
3), both ways in the same run:

(a) by ONE plain ``blender -b scene.blend -t 1 -o DIR/frame_###### -a`` (one thread);
(b) through the system: a ``LocalCluster`` of 2 workers of 1 slot each (started once, before
    the first repeat; its start-up is not timed), ``client.render(scene, "1-48", chunk=24,
    cpus=1)``: each chunk is one Blender with one thread. Timed from the call to the job's
    final ``JobUpdate``; the scene is shipped (by content hash) in the first repeat only, as
    it would be for a user rendering the same scene again. Likewise a task process that has
    rendered keeps a spare Blender started for its next chunk (``worker._blender_spare``): the
    first repeat starts its Blenders (``cold``), later ones find them started (``warm``), and
    the summary gives the speed-up of each kind apart.

The frames of (b) are then fetched and compared with (a)'s pixel for pixel (at most 1/255 per
channel); a difference ends the run with exit code 1 (a fast but wrong render must not count).

Figures per repeat, then their median over the repeats and the worst repeat:

- **speed-up**: (a)'s wall time / (b)'s (target: at least 1.8, i.e. 0.9 per worker).
- **chunk overhead s**: per chunk, the task's wall time (``TaskDone.duration_s``: from the task
  process starting the chunk to its result, so Blender's start-up, the scene load, storing and
  announcing each frame, and Blender's exit) minus the render time of its frames. A frame's
  render time is what Blender itself printed for that frame in the plain run of the same
  repeat (the ``Time:`` after its ``Saved:`` line: render plus save, one thread). The median
  over the chunks of a repeat is reported. It includes Blender's own start-up, which the plain
  run pays once too: ``plain fixed s`` (plain wall time minus the sum of its frames' times) is
  shown beside it, so ``overhead - fixed`` is what the system adds per chunk. Two Blenders on
  a 2-core machine also render each frame somewhat slower than one Blender alone (shared caches
  and memory bandwidth, and the gateway, workers and this client need the same cores): that
  shows as ``frame ms`` in the system (the median gap between two frames saved in a row by one
  chunk, from the files' mtimes, see below) next to the plain run's median ``Time:``, and it
  counts in the overhead.
- **preview latency ms**: from a frame being saved on the worker to its FRAME ``Output`` (the
  preview thumbnail) being yielded by ``job.events()`` in this client (target: median under
  200 ms). Nothing in the protocol carries the save time, so it is observed from outside,
  without touching the workers: the workers are on this machine, and a thread here polls each
  chunk's frame folder (``$PILOT_HOME/cache/WORKER/jobs/JOB/.pilot-frames/*``, every
  ``POLL_S``) and keeps each frame file's ``st_mtime_ns`` (the time Blender last wrote it; the
  poll rate only has to catch the file before the chunk ends and removes it, not time it). The
  arrival is ``time.time_ns()`` when ``job.events()`` yields the Output. Both are the realtime
  clock; file times come from the kernel's coarse clock, which lags by up to one tick (4 ms at
  HZ=250), so the latency reads up to that much long. Median and worst over the 48 frames.
- **CPU**: ``pilot cpu s`` is what the gateway, the 2 workers and their task processes spent
  (user + system, from ``/proc``) during (b), Blender excluded: Parallel Pilot's own cost.
  ``cores a/b`` is Blender's CPU time over the wall time: about 1.0 for (a), and at most 2.0
  for (b) on a 2-core machine; less means other processes had the cores.

What bounds the speed-up: with one chunk per worker each worker pays Blender's start-up ``S``
(``plain fixed s``) as the plain run does, so even with no overhead and two free cores it is
``(S + 48 f) / (S + 24 f)`` for frames of ``f`` s: 1.84 for S = 1.2 s and f = 0.26 s, 1.89 for
f = 0.4 s. On a shared 2-core machine the two Blenders also compete with everything else that
runs (``load`` is the 1-minute load average when the repeat started).

Chunking: 24 frames per chunk, one chunk per worker, so each worker pays Blender's start-up
once, as the plain run does (``--chunk`` to change; ``--chunk 0`` lets ``client.render`` choose,
which assumes 1 s frames and picks 9 here: 3 start-ups per worker). With smaller chunks the
speed-up falls by one start-up per extra chunk on a worker, and, as the scheduler stands, its
prefetch may queue several chunks on one worker while the other idles (docs/render.md, Limits).

    .venv/bin/python bench/render.py                       # 3 repeats, ~2 minutes
    .venv/bin/python bench/render.py --repeats 1 --samples 64

Needs ``blender`` on PATH (or ``--blender``); JSON goes to ``bench/results/render.json``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: import the bench package by its name
    sys.path.insert(0, str(ROOT))

import pilot  # noqa: E402
from bench._blender_plain import make_scene, plain_run  # noqa: E402
from bench._render_watch import ClusterCpu, FrameFileWatcher  # noqa: E402
from bench._table import print_table, write_json  # noqa: E402
from gateway.protocol import JobUpdate, Output, OutputKind, Status  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "render.json"
FRAMES = 48
SIZE_PX = 128
SAMPLES = 384  # about 0.4 s a frame on one idle thread (0.26 s at 256 samples)
CHUNK = 24
WORKERS = 2
RENDER_TIMEOUT_S = 600.0
SPEEDUP_TARGET = 1.8
LATENCY_TARGET_MS = 200.0


class WrongResult(Exception):
    """The system's frames differ from the plain run's."""


def system_run(
    client: pilot.Client,
    scene: Path,
    watcher: FrameFileWatcher,
    cpu: ClusterCpu,
    plain: dict[str, Any],
    frames: int,
    chunk: int | None,
) -> tuple[dict[str, Any], pilot.Job]:
    """``client.render`` on the cluster, followed live; its figures (see the docstring)."""
    arrived_ns: dict[int, int] = {}
    spares = cpu.spares()
    cpu_before = cpu.take()
    t0 = time.perf_counter()
    job = client.render(scene, frames=f"1-{frames}", chunk=chunk, cpus=1, name="bench")
    watcher.watch(job.id)
    for ev in job.events(timeout=RENDER_TIMEOUT_S):
        if isinstance(ev, Output) and ev.kind == OutputKind.FRAME:
            arrived_ns[ev.item] = time.time_ns()
        elif isinstance(ev, JobUpdate) and Status(ev.state).finished:
            break
    wall = time.perf_counter() - t0
    pilot_cpu, blender_cpu = cpu.since(cpu_before, cpu.take())
    job.wait(0)  # raises if the job failed or is not over

    overheads = []
    for index in sorted(job.tasks):
        done = job.tasks[index]
        rendered = job.value(index)
        overheads.append(done.duration_s - sum(plain["frame_s"][f] for f in rendered))
    latencies = [
        (arrived_ns[f] - saved) / 1e6 for f, saved in watcher.saved_ns.items() if f in arrived_ns
    ]
    gaps = []  # consecutive frames of one chunk: the system's per-frame time
    for folder in set(watcher.chunk_of.values()):
        times = sorted(watcher.saved_ns[f] for f, c in watcher.chunk_of.items() if c == folder)
        gaps += [(b - a) / 1e6 for a, b in itertools.pairwise(times)]
    return {
        "job": job.id,
        "wall_s": wall,
        "spares_ready": spares,  # idle spare Blenders when the job was submitted
        "chunks": len(job.tasks),
        "chunk_frames": job.chunk,
        "workers_used": len({d.worker for d in job.tasks.values()}),
        "chunk_duration_s": [job.tasks[i].duration_s for i in sorted(job.tasks)],
        "chunk_overhead_s": overheads,
        "pilot_cpu_s": pilot_cpu,
        "blender_cores": blender_cpu / wall,
        "median_chunk_overhead_s": statistics.median(overheads),
        "median_frame_ms": statistics.median(gaps) if gaps else None,
        "latency_ms": latencies,
        "frames_timed": len(latencies),
        "median_latency_ms": statistics.median(latencies) if latencies else None,
        "worst_latency_ms": max(latencies) if latencies else None,
    }, job


def max_pixel_difference(files: list[str], plain_dir: Path) -> int:
    import numpy as np
    from PIL import Image

    worst = 0
    for path in files:
        with Image.open(path) as ours, Image.open(plain_dir / Path(path).name) as theirs:
            a = np.asarray(ours, dtype=np.int16)
            b = np.asarray(theirs, dtype=np.int16)
        worst = max(worst, int(np.abs(a - b).max()))
    return worst


def one_repeat(
    n: int,
    blender: str,
    scene: Path,
    client: pilot.Client,
    watcher: FrameFileWatcher,
    cpu: ClusterCpu,
    work: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    load = os.getloadavg()[0]
    plain_dir = work / f"plain-{n}"
    plain = plain_run(blender, scene, plain_dir, args.frames)
    print(f"  run {n}: plain {plain['wall_s']:.2f}s", end="", flush=True)
    system, job = system_run(client, scene, watcher, cpu, plain, args.frames, args.chunk or None)
    print(f", system {system['wall_s']:.2f}s", flush=True)
    files = job.frames
    if len(files) != args.frames:
        raise WrongResult(f"the system gave {len(files)} frames of {args.frames}")
    diff = max_pixel_difference(files, plain_dir)
    if diff > 1:
        raise WrongResult(f"a frame differs from the plain run's by {diff}/255")
    shutil.rmtree(plain_dir, ignore_errors=True)
    return {
        "run": n,
        "load_1min": load,
        "speedup": plain["wall_s"] / system["wall_s"],
        "plain": {k: v for k, v in plain.items() if k != "frame_s"}
        | {"frame_s": list(plain["frame_s"].values())},
        "system": system,
        "max_pixel_difference": diff,
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """(figure, median of runs, worst run, target, met) rows; a figure no run has is ``-``."""
    plain = [r["plain"] for r in runs]
    system = [r["system"] for r in runs]
    figures: list[tuple[str, list[Any], bool, float | None]] = [
        ("speed-up", [r["speedup"] for r in runs], True, SPEEDUP_TARGET),
        ("speed-up, cold", [r["speedup"] for r in runs if not cold_or_warm(r)], True, None),
        ("speed-up, warm", [r["speedup"] for r in runs if cold_or_warm(r)], True, None),
        ("plain s", [p["wall_s"] for p in plain], False, None),
        ("system s", [x["wall_s"] for x in system], False, None),
        ("chunk overhead s", [x["median_chunk_overhead_s"] for x in system], False, None),
        ("plain fixed s", [p["fixed_s"] for p in plain], False, None),
        ("plain frame ms", [p["median_frame_ms"] for p in plain], False, None),
        ("system frame ms", [x["median_frame_ms"] for x in system], False, None),
        ("plain blender cores", [p["blender_cores"] for p in plain], True, None),
        ("system blender cores", [x["blender_cores"] for x in system], True, None),
        ("pilot cpu s", [x["pilot_cpu_s"] for x in system], False, None),
        ("preview median ms", [x["median_latency_ms"] for x in system], False, LATENCY_TARGET_MS),
        ("preview worst ms", [x["worst_latency_ms"] for x in system], False, None),
    ]
    rows = []
    for figure, values, higher, bound in figures:
        known = [v for v in values if v is not None]
        median = statistics.median(known) if known else None
        worst = (min(known) if higher else max(known)) if known else None
        met = None
        if bound is not None and median is not None:
            met = median >= bound if higher else median < bound
        rows.append(
            {
                "figure": figure,
                "median": median,
                "worst": worst,
                "target": "" if bound is None else f"{'>=' if higher else '<'} {bound:g}",
                "met": {None: "", True: "yes", False: "NO"}[met],
            }
        )
    return rows


def cold_or_warm(run: dict[str, Any]) -> bool:
    """Whether every chunk of the run's system render had a spare Blender waiting (warm), or
    some started Blender (cold: the first run, on task processes that had not rendered)."""
    return run["system"]["spares_ready"] >= run["system"]["chunks"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=FRAMES)
    parser.add_argument("--size", type=int, default=SIZE_PX, help="pixels a side")
    parser.add_argument("--samples", type=int, default=SAMPLES, help="Cycles samples")
    parser.add_argument("--chunk", type=int, default=CHUNK, help="frames per chunk; 0: auto")
    parser.add_argument("--blender", default=os.environ.get("PILOT_BLENDER") or "blender")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    args = parser.parse_args(argv)
    blender = shutil.which(args.blender)
    if blender is None:
        print(f"No Blender at {args.blender!r}: apt-get install blender, or --blender PATH.")
        return 2

    runs: list[dict[str, Any]] = []
    error = ""
    with tempfile.TemporaryDirectory(prefix="bench-render-") as tmp:
        work = Path(tmp)
        scene = make_scene(work / "scene.blend", blender, args.size, args.samples, args.frames)
        print(f"scene: {args.frames} frames, {args.size}x{args.size}, {args.samples} samples")
        env = {"PILOT_LOG_LEVEL": os.environ.get("PILOT_LOG_LEVEL", "WARNING")}
        with (
            pilot.LocalCluster(WORKERS, slots=1, home=work / "home", env=env, blender=blender) as c,
            FrameFileWatcher(work / "home") as watcher,
        ):
            client, cpu = c.client(), ClusterCpu(c)
            for n in range(1, args.repeats + 1):
                try:
                    runs.append(one_repeat(n, blender, scene, client, watcher, cpu, work, args))
                except WrongResult as exc:
                    error = f"WrongResult: {exc}"
                    print(f"\n{error}", file=sys.stderr)
                    break

    if not runs:
        return 1
    rows = [
        {
            "run": r["run"],
            "load": r["load_1min"],
            "plain s": r["plain"]["wall_s"],
            "system s": r["system"]["wall_s"],
            "speed-up": r["speedup"],
            "chunks": r["system"]["chunks"],
            "blender": "warm" if cold_or_warm(r) else "cold",
            "overhead s": r["system"]["median_chunk_overhead_s"],
            "fixed s": r["plain"]["fixed_s"],
            "frame ms a/b": f"{r['plain']['median_frame_ms']:.0f}/"
            f"{r['system']['median_frame_ms'] or 0:.0f}",
            "cores a/b": f"{r['plain']['blender_cores']:.2f}/{r['system']['blender_cores']:.2f}",
            "pilot cpu s": r["system"]["pilot_cpu_s"],
            "preview ms": r["system"]["median_latency_ms"],
            "worst ms": r["system"]["worst_latency_ms"],
            "timed": f"{r['system']['frames_timed']}/{args.frames}",
        }
        for r in runs
    ]
    chunk = runs[0]["system"]["chunk_frames"]
    print(
        f"\n{args.frames} frames, chunk {chunk}; (a) one blender -t 1, (b) {WORKERS} workers x "
        f"1 slot, cpus=1; {os.cpu_count()} cores"
    )
    print_table(rows, list(rows[0]))
    summary = summarise(runs)
    print(f"\nover {len(runs)} run(s): the median, and the worst run")
    print_table(summary, ["figure", "median", "worst", "target", "met"])
    path = write_json(
        args.out,
        {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": sys.version.split()[0],
                "blender": subprocess.run(
                    [blender, "-v"], capture_output=True, text=True
                ).stdout.splitlines()[0],
            },
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "scene": {"frames": args.frames, "size_px": args.size, "samples": args.samples},
            "chunk": chunk,
            "workers": WORKERS,
            "repeats": args.repeats,
            "summary": summary,
            "runs": runs,
            "error": error,
        },
    )
    print(f"\nwritten to {path}")
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
