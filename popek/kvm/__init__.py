"""A typed wrapper of the Linux KVM API: the only part of popek that knows ioctl numbers and struct layouts."""

from popek.kvm.api import CpuidEntry, IdleState, Kvm, KvmError, VcpuFd, VmFd
from popek.kvm.consts import (
    Cap,
    ExitReason,
    GuestDebug,
    InternalError,
    MemFlag,
    MpState,
    SyncRegs,
    SystemEvent,
    VcpuEventsValid,
)

__all__ = [
    "Cap",
    "CpuidEntry",
    "ExitReason",
    "GuestDebug",
    "IdleState",
    "InternalError",
    "Kvm",
    "KvmError",
    "MemFlag",
    "MpState",
    "SyncRegs",
    "SystemEvent",
    "VcpuEventsValid",
    "VcpuFd",
    "VmFd",
]
