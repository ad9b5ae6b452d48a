"""The ``ursam`` command line: one module per command in :mod:`URSAMLib.commands`.

Every command reports bad input as one line, ``ursam: error: ...``, naming the
problem and the file, and exits with code 2; nothing partial is left behind.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from . import __version__
from .errors import Cancelled, URSAMError

#: modules that each add one subcommand: ``add_parser(subparsers)`` and ``main(args)``
COMMAND_MODULES = [
    "URSAMLib.commands.segment",
    "URSAMLib.commands.batch",
    "URSAMLib.commands.boxes_from_labels",
    "URSAMLib.commands.templates",
    "URSAMLib.commands.localize",
    "URSAMLib.commands.evaluate",
    "URSAMLib.commands.demo",
    "URSAMLib.commands.train_localizer",
    "URSAMLib.commands.bench",
    "URSAMLib.commands.correct",
]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="ursam",
        description="UR-SAM: automatic organ segmentation of CT with the Segment Anything Model, "
                    "prompt augmentation, uncertainty and rectification.")
    parser.add_argument("--version", action="version", version=f"ursam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    # A kill (SIGTERM) unwinds like Ctrl-C, so staged outputs are removed, not left half-written.

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return args.func(args) or 0
    except URSAMError as err:
        print(f"ursam: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # A full disk or a folder without write permission: one line, not a traceback.
        where = f": {err.filename}" if err.filename else ""
        print(f"ursam: error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print("ursam: interrupted; no outputs were written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
