"""Progress reporting and cancellation, shared by the CLI and the Slicer logic.

The engine calls ``Progress.stage(name, total)`` when a named stage begins and
``Progress.step(i, n)`` as it goes; the CLI shows a tqdm bar on stderr, Slicer
maps the same calls onto its progress bar (``callback(stage, i, n)``).
``check_cancel`` is called between slices so a cancel takes effect within one
slice's work.
"""
from __future__ import annotations

import sys

from .errors import Cancelled

# The named stages of a run, in order. The engine reports them, the Slicer logic and panel show them;
# a stage may carry a detail after its name ("loading model litemedsam").
STAGE_MODEL = "loading model"
STAGE_LOCALIZE = "localizing"
STAGE_SCREEN = "screening support scans"
STAGE_REGISTER = "registering support scans"
STAGE_DEFORM = "deformable registration"
STAGE_EMBED = "embedding slices"
STAGE_RECTIFY = "rectifying"
STAGE_WRITE = "writing results"
STAGES = (STAGE_MODEL, STAGE_LOCALIZE, STAGE_SCREEN, STAGE_REGISTER, STAGE_DEFORM, STAGE_EMBED, STAGE_RECTIFY, STAGE_WRITE)


def stage_of(name):
    """The named stage a reported stage belongs to (its name may carry a detail), or None."""
    for stage in STAGES:
        if name == stage or (name or "").startswith(stage + " "):
            return stage
    return None


class Progress:
    def __init__(self, callback=None, cancel=None, quiet=True):
        self.callback = callback
        self.cancel = cancel
        self.quiet = quiet
        self._bar = None
        self._stage = None
        self.warnings = []

    def stage(self, name, total=None):
        self.check_cancel()
        self._close_bar()
        self._stage = name
        if self.callback:
            self.callback(name, 0, total or 0)
        if not self.quiet:
            if total:
                from tqdm import tqdm  # noqa: PLC0415 (not bundled with Slicer, whose panel loads this module first)

                self._bar = tqdm(total=total, desc=name, file=sys.stderr, unit="slice", leave=False,
                                 dynamic_ncols=True)
            else:
                print(f"[ursam] {name}", file=sys.stderr, flush=True)

    def step(self, i, n):
        self.check_cancel()
        if self.callback:
            self.callback(self._stage, i, n)
        if self._bar is not None:
            self._bar.update(1)

    def info(self, message):
        if not self.quiet:
            print(f"[ursam] {message}", file=sys.stderr, flush=True)

    def warn(self, message):
        # Warnings are shown even with --quiet: they change what the output means.
        self.warnings.append(message)
        print(f"[ursam] warning: {message}", file=sys.stderr, flush=True)

    def check_cancel(self):
        if self.cancel is not None and self.cancel():
            self._close_bar()
            raise Cancelled("cancelled by the user")

    def done(self):
        self._close_bar()

    def _close_bar(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
