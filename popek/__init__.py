"""popek, a programmable virtual machine monitor. ``popek.VM`` is its Python API (popek/api.py)::

    with popek.VM(mem="512M") as vm:
        print(vm.exec(["uname", "-a"]).stdout)

The names below are imported on first use, so ``import popek`` (and the ``popek`` command) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from popek.agent import (
        AgentDisconnected,
        AgentError,
        AgentUnavailable,
        CommandFailed,
        CommandStartError,
        CommandTimeout,
        ExecResult,
        FileInfo,
        RemoteError,
        RemoteFileError,
    )
    from popek.api import VM, BootTimeout, GuestFiles, GuestProcess, VMError, VMStopped
    from popek.daemon.client import ApiError, Client, DaemonUnavailable, RemoteVM
    from popek.devices.virtio.blk import DiskSpec
    from popek.errors import ConfigError, PopekError

_EXPORTS = {
    "VM": "popek.api",
    "VMError": "popek.api",
    "VMStopped": "popek.api",
    "BootTimeout": "popek.api",
    "GuestFiles": "popek.api",
    "GuestProcess": "popek.api",
    "Client": "popek.daemon.client",
    "RemoteVM": "popek.daemon.client",
    "ApiError": "popek.daemon.client",
    "DaemonUnavailable": "popek.daemon.client",
    "ExecResult": "popek.agent",
    "FileInfo": "popek.agent",
    "AgentError": "popek.agent",
    "AgentUnavailable": "popek.agent",
    "AgentDisconnected": "popek.agent",
    "CommandFailed": "popek.agent",
    "CommandStartError": "popek.agent",
    "CommandTimeout": "popek.agent",
    "RemoteError": "popek.agent",
    "RemoteFileError": "popek.agent",
    "DiskSpec": "popek.devices.virtio.blk",
    "ConfigError": "popek.errors",
    "PopekError": "popek.errors",
}

__all__ = [
    "VM",
    "AgentDisconnected",
    "AgentError",
    "AgentUnavailable",
    "ApiError",
    "BootTimeout",
    "Client",
    "CommandFailed",
    "CommandStartError",
    "CommandTimeout",
    "ConfigError",
    "DaemonUnavailable",
    "DiskSpec",
    "ExecResult",
    "FileInfo",
    "GuestFiles",
    "GuestProcess",
    "PopekError",
    "RemoteError",
    "RemoteFileError",
    "RemoteVM",
    "VMError",
    "VMStopped",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'popek' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
