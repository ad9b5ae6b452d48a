"""The one exception type the engine raises for bad input.

The CLI turns it into a one-line message and exit code 2; the Slicer module
into an error dialog. Its message always names the problem and the file.
"""
from __future__ import annotations


class URSAMError(Exception):
    """Bad input or an unusable resource. ``str(err)`` is the user message."""

    def __init__(self, message, path=None):
        self.path = None if path is None else str(path)
        if self.path and self.path not in message:
            message = f"{message}: {self.path}"
        super().__init__(message)


class Cancelled(Exception):
    """Raised inside a run when the caller's cancel callback says stop."""
