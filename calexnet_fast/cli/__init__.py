"""The ``calexnet`` command line: one module per command, on top of the library.

Typical order: ``train-backbone`` (optional) -> ``train`` -> ``calibrate`` -> ``evaluate`` (-> ``measure``);
``compare`` runs methods x seeds end to end. Each command module holds its arguments (``add_arguments``) and
``run(args)``, which turns them into library records and calls; nothing in the package imports this one.
Errors of the input, the run directory or the disk end the command with one ``error:`` line (set
``CALEXNET_TRACEBACK=1`` to see the traceback instead).
"""

from __future__ import annotations

import argparse
import os
import sys

from . import calibrate, compare, evaluate, measure, predict, train, train_backbone

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = (train_backbone, train, calibrate, evaluate, compare, measure, predict)


def build_parser() -> argparse.ArgumentParser:
    """The ``calexnet`` argument parser with every command."""
    parser = argparse.ArgumentParser(
        prog="calexnet",
        description="Early-exit branches on frozen CNN backbones: train (CalexNet and the reference "
        "recipes), calibrate (CPM), evaluate (accuracy vs FLOPs), compare methods, measure speed. Typical order: "
        "train-backbone (optional) -> train -> calibrate -> evaluate.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        sp = sub.add_parser(
            command.NAME,
            help=command.HELP,
            description=command.DESCRIPTION,
            epilog=command.EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(sp)
        sp.set_defaults(_run=command.run)
    return parser


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        text = f"{e.filename}: {e.strerror or e}"
    elif isinstance(e, OSError) and e.strerror:
        text = e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Run ``calexnet`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Raises:
        SystemExit: ``error: ...`` (status 1) when the command fails on its input, a run directory or the disk.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        status = args._run(args)
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as e:
        if os.environ.get("CALEXNET_TRACEBACK"):
            raise
        raise SystemExit(f"error: {_one_line(e)}") from None
    return int(status or 0)
