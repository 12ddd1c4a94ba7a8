"""The one error the guest-image subsystem raises: its message tells the user what to do next."""

from __future__ import annotations

from popek.errors import PopekError


class ImageError(PopekError):
    """The default guest cannot be built or used here: a missing package, a failed build, a bad request.

    A PopekError so the CLI reports it as one line and an exit status instead of a traceback.
    """
