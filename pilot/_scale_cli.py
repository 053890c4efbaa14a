"""``pilot scale slurm``: workers as Slurm jobs, from the command line (``pilot._slurm``).

::

    pilot scale slurm N [--partition P --cpus C --gpus G --mem M --time T --account A --qos Q
                         --constraint C --sbatch-arg ARG ... --tags T --worker-arg ARG ...
                         --connect FILE --gateway-host HOST] [--dry-run]
    pilot scale slurm --adapt --min A --max B [--idle-grace S] [the same resource options]

``N`` is the number of worker jobs wanted in Slurm's queue: the missing ones are submitted, a
surplus is drained. ``--dry-run`` prints the batch script instead (keep it: ``sbatch FILE``).
``--adapt`` runs the adaptive controller in the foreground until Ctrl-C; the workers it started
stay (``pilot scale slurm 0`` drains them).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from gateway.protocol import ConfigError

__all__ = ["add_scale_parser"]


def add_scale_parser(sub: Any) -> None:
    """Add ``scale`` (with its one backend, ``slurm``) to the ``pilot`` subcommands."""
    scale = sub.add_parser("scale", help="start workers through a cluster's scheduler")
    backends = scale.add_subparsers(required=True, metavar="SCHEDULER")
    p = backends.add_parser("slurm", help="workers as Slurm jobs (sbatch)")
    p.add_argument("n", nargs="?", type=int, default=None, help="worker jobs wanted")
    p.add_argument("--partition", default=None)
    p.add_argument("--cpus", type=int, default=1, help="CPUs per job = the worker's slots")
    p.add_argument("--gpus", type=int, default=0, help="GPUs per job (--gres=gpu:G)")
    p.add_argument("--mem", default=None, help="memory per job, as Slurm spells it (32G)")
    p.add_argument("--time", default=None, help="time limit per job (4:00:00)")
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument(
        "--sbatch-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="another #SBATCH directive, e.g. --sbatch-arg=--exclusive (repeatable)",
    )
    p.add_argument("--tags", default="", help="the workers' tags (a,b)")
    p.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="another `pilot worker` option, e.g. --worker-arg=--cache-size=100GB (repeatable)",
    )
    p.add_argument("--job-name", default="pilot-worker", help="marks our jobs in the queue")
    p.add_argument("--connect", type=Path, default=None, help="the gateway's connection file")
    p.add_argument("--gateway-host", default=None, help="the gateway's address for the nodes")
    p.add_argument("--python", default=sys.executable, help="the nodes' Python with pilot")
    p.add_argument("--dry-run", action="store_true", help="print the batch script, submit none")
    p.add_argument("--adapt", action="store_true", help="grow and shrink with the work")
    p.add_argument("--min", type=int, default=0, help="with --adapt: fewest worker jobs")
    p.add_argument("--max", type=int, default=16, help="with --adapt: most worker jobs")
    p.add_argument(
        "--idle-grace", type=float, default=60.0, help="with --adapt: seconds idle before a drain"
    )
    p.add_argument("--interval", type=float, default=2.0, help=argparse.SUPPRESS)
    p.set_defaults(run=_scale_slurm)


def _scale_slurm(args: argparse.Namespace) -> int:
    from pilot._slurm import SlurmWorkers

    if args.adapt == (args.n is not None):
        raise ConfigError(
            "Give a number of worker jobs (`pilot scale slurm 4`) or --adapt (`pilot scale "
            "slurm --adapt --min 0 --max 16`), not both."
        )
    workers = SlurmWorkers(
        partition=args.partition,
        cpus=args.cpus,
        gpus=args.gpus,
        mem=args.mem,
        time=args.time,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        sbatch_args=args.sbatch_arg,
        connection=args.connect,
        python=args.python,
        tags=[t for t in args.tags.split(",") if t],
        worker_args=args.worker_arg,
        job_name=args.job_name,
        gateway_host=args.gateway_host,
    )
    if args.dry_run:
        what = "--adapt submits it as needed" if args.adapt else f"`scale` submits it {args.n}x"
        print(f"# {what}; submit it yourself with `sbatch FILE`.")
        print(workers.script(), end="")
        return 0
    if args.adapt:
        return _adapt(workers, args)
    ids = workers.scale(args.n)
    if ids:
        print(f"submitted {len(ids)} worker job(s): {', '.join(ids)}")
        print("`pilot status` lists them once they connect; `squeue` shows them until then.")
    else:
        print(f"{args.n} worker job(s) wanted: the surplus, if any, is draining.")
    return 0


def _adapt(workers: Any, args: argparse.Namespace) -> int:
    from pilot._adapt import Adaptive

    controller = Adaptive(
        workers,
        minimum=args.min,
        maximum=args.max,
        idle_grace_s=args.idle_grace,
        interval_s=args.interval,
    )

    def on_signal(signum: int, frame: Any) -> None:
        controller.stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(
        f"adaptive scaling: {args.min} to {args.max} worker jobs of {args.cpus} CPU(s), idle "
        f"grace {args.idle_grace:.0f}s. Press Ctrl-C to stop.",
        flush=True,
    )
    controller.run()
    left = [j.job_id for j in workers.jobs() if j.active]
    print(f"stopped. Worker jobs left: {', '.join(left) or 'none'} (`pilot scale slurm 0`).")
    return 0
