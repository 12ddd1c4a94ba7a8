"""popek's error types. The CLI turns each into one line and an exit status; their messages are their docs."""

from __future__ import annotations


class PopekError(Exception):
    """Base of every error popek reports to a user instead of crashing."""


class ConfigError(PopekError):
    """A VM description that cannot be built (bad size, bad count, conflicting options)."""


class BootError(PopekError):
    """A kernel, initrd or command line that cannot be loaded as asked."""


class GuestMemoryError(PopekError):
    """A guest-physical access outside guest RAM: never turned into a host access."""


class VmStateError(PopekError):
    """An operation the VM cannot do in its present run state (pause a VM that is not running, snapshot one
    that is not paused), or on its backend (lockstep keeps no snapshot)."""
