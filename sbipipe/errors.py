"""One error type for everything a user can get wrong."""

from __future__ import annotations

__all__ = ["SbipipeError"]


class SbipipeError(Exception):
    """A user-facing error: the message says what was expected, what was found and what to do.

    The CLI prints it on one line and exits with status 1.
    """
