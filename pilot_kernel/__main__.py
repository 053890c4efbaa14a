"""``python -m pilot_kernel install|uninstall``: manage the "Parallel Pilot" kernelspec.

The same operations as ``pilot kernel install|uninstall``, for when the ``pilot`` script is not
on PATH. `main` returns a process exit status and prints the directory it touched.
"""

from __future__ import annotations

import argparse
import sys

from ._kernelspec import DEFAULT_DISPLAY_NAME, DEFAULT_NAME, install, uninstall


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pilot_kernel", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for command in ("install", "uninstall"):
        sub = commands.add_parser(command, help=f"{command} the kernelspec")
        where = sub.add_mutually_exclusive_group()
        where.add_argument("--user", action="store_true", help="the user's Jupyter data dir")
        where.add_argument(
            "--sys-prefix",
            action="store_true",
            help="the active environment (the default for install)",
        )
        where.add_argument("--prefix", help="PREFIX/share/jupyter/kernels")
        sub.add_argument("--name", default=DEFAULT_NAME, help=f"kernel name ({DEFAULT_NAME})")
        if command == "install":
            sub.add_argument(
                "--display-name",
                default=DEFAULT_DISPLAY_NAME,
                help=f"name shown in kernel pickers ({DEFAULT_DISPLAY_NAME})",
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return 0 on success, 1 with a message on stderr otherwise."""
    args = _parser().parse_args(argv)
    where = {"user": args.user, "sys_prefix": args.sys_prefix, "prefix": args.prefix}
    try:
        if args.command == "install":
            path = install(name=args.name, display_name=args.display_name, **where)
            print(f"Installed kernelspec {args.name!r} in {path}")
        else:
            path = uninstall(args.name, **where)
            print(f"Removed kernelspec {args.name!r} from {path}")
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
