"""Typed exits and the one place that maps them onto the machine's buses.

Every backend turns its own exit record (KVM's kvm_run, the software CPU's trap) into these values and calls
`handle_exit`, so device dispatch and `--stats` accounting are the same whichever backend runs the guest, and
testable without /dev/kvm.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from popek.bus import Bus


@dataclass(slots=True)
class PioIn:
    port: int
    size: int


@dataclass(slots=True)
class PioOut:
    port: int
    data: bytes


@dataclass(slots=True)
class MmioRead:
    addr: int
    size: int


@dataclass(slots=True)
class MmioWrite:
    addr: int
    data: bytes


Exit = PioIn | PioOut | MmioRead | MmioWrite


def handle_exit(exit: Exit, pio: Bus, mmio: Bus) -> bytes | None:
    """Perform the access; a read returns the bytes the guest must see."""
    if isinstance(exit, PioOut):
        pio.write(exit.port, exit.data)
        return None
    if isinstance(exit, PioIn):
        return pio.read(exit.port, exit.size)
    if isinstance(exit, MmioWrite):
        mmio.write(exit.addr, exit.data)
        return None
    return mmio.read(exit.addr, exit.size)


class StopReason(str, Enum):
    """Why a VM ended; the CLI maps each to an exit status."""

    POWEROFF = "poweroff"
    RESET = "reset"
    DEBUG_EXIT = "debug-exit"
    TRIPLE_FAULT = "triple-fault"
    INTERNAL_ERROR = "internal-error"
    FAIL_ENTRY = "fail-entry"
    SIGNAL = "signal"
    TIMEOUT = "timeout"
    USER_QUIT = "user-quit"
    ERROR = "error"
    DIVERGENCE = "divergence"  # lockstep: the software CPU and KVM disagreed
    HALTED = "halted"  # the guest halted with interrupts disabled: nothing can wake it
    MIGRATED = "migrated"  # the guest goes on in another popek (popek.migrate)


@dataclass(frozen=True)
class Stop:
    reason: StopReason
    detail: str = ""
    status: int | None = None  # a guest-chosen exit status (debug-exit port, guest command)
    signum: int | None = None  # StopReason.SIGNAL: the host signal that stopped the VM
