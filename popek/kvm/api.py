"""File-descriptor types of the KVM API (Documentation/virt/kvm/api.rst): `Kvm` (/dev/kvm) → `VmFd` → `VcpuFd`.

Each type owns its descriptor (and the vCPU its kvm_run mapping): `close()`, a context manager, and a
`weakref.finalize` fallback so that a forgotten VM never leaks a descriptor. Every ioctl goes through `_ioctl`,
which turns an OSError into a `KvmError` that names the request and keeps the errno. `fcntl.ioctl` releases the
GIL, so a vCPU thread blocked in KVM_RUN does not stop the others.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import fcntl
import mmap
import os
import struct
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from popek.kvm import consts as c
from popek.kvm import structs as s


class KvmError(Exception):
    """A KVM request failed; `op` names the ioctl (or step) and `errno` says why."""

    def __init__(self, op: str, err: int, detail: str = "") -> None:
        self.op = op
        self.errno = err
        why = os.strerror(err) if err else "failed"
        super().__init__(f"{op}: {why}{' (' + detail + ')' if detail else ''}")


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int


def _ioctl(fd: int, request: int, arg: Any = 0) -> int:
    name = c.IOCTL_NAMES.get(request, hex(request))
    if isinstance(arg, int) and arg > 0x7FFFFFFF:
        # fcntl.ioctl takes a C int; a full unsigned long argument needs the libc call
        ret = _libc.ioctl(fd, request, arg)
        if ret < 0:
            raise KvmError(name, ctypes.get_errno())
        return int(ret)
    try:
        if isinstance(arg, int):
            return int(fcntl.ioctl(fd, request, arg))
        return int(fcntl.ioctl(fd, request, arg, True))
    except OSError as e:
        raise KvmError(name, e.errno or 0) from None


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class _FdOwner:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._finalizer = weakref.finalize(self, _close_fd, fd)

    def close(self) -> None:
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> _FdOwner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class CpuidEntry:
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def _cpuid_to_struct(entries: Sequence[CpuidEntry]) -> s.kvm_cpuid2:
    buf = s.with_entries(s.kvm_cpuid2, len(entries))
    buf.nent = len(entries)
    for slot, e in zip(buf.entries, entries):
        slot.function, slot.index, slot.flags = e.function, e.index, e.flags
        slot.eax, slot.ebx, slot.ecx, slot.edx = e.eax, e.ebx, e.ecx, e.edx
    return buf


def _cpuid_from_struct(buf: s.kvm_cpuid2) -> list[CpuidEntry]:
    return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in list(buf.entries)[: buf.nent]]


RFLAGS_IF = 1 << 9
KERNEL_SIGSET_BITS = 64  # the kernel's sigset_t on x86-64 (_NSIG), which KVM_SET_SIGNAL_MASK's len must equal
# the XSAVE image's legacy (FXSAVE) area and header (Intel SDM vol. 1 §10.5.1, §13.4)
FXSAVE_ST, FXSAVE_XMM, XSAVE_HEADER = 32, 160, 512
XFEATURE_X87_SSE = 0x3


@dataclass(frozen=True)
class IdleState:
    mp_state: c.MpState | int  # an int for states this wrapper does not name
    interrupts_enabled: bool
    event_pending: bool


class Kvm(_FdOwner):
    """The system descriptor: capabilities, supported CPUID and MSRs, and VM creation."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            hint = {
                errno_mod.ENOENT: "no KVM on this host: load kvm_intel or kvm_amd",
                errno_mod.EACCES: "no permission: add your user to the kvm group",
                errno_mod.EPERM: "no permission: add your user to the kvm group",
            }.get(e.errno or 0, "")
            raise KvmError(f"open {path}", e.errno or 0, hint) from None
        super().__init__(fd)
        try:
            version = _ioctl(fd, c.KVM_GET_API_VERSION)
        except KvmError as e:
            self.close()
            raise KvmError(f"open {path}", e.errno, "not a KVM device") from None
        if version != c.KVM_API_VERSION:
            self.close()
            raise KvmError("KVM_GET_API_VERSION", 0, f"API version {version}, popek needs {c.KVM_API_VERSION}")
        self.vcpu_mmap_size = _ioctl(fd, c.KVM_GET_VCPU_MMAP_SIZE)

    def check_extension(self, cap: c.Cap) -> int:
        return _ioctl(self.fd, c.KVM_CHECK_EXTENSION, int(cap))

    def supported_cpuid(self) -> list[CpuidEntry]:
        return self._cpuid_query(c.KVM_GET_SUPPORTED_CPUID)

    def emulated_cpuid(self) -> list[CpuidEntry]:
        return self._cpuid_query(c.KVM_GET_EMULATED_CPUID)

    def _cpuid_query(self, request: int) -> list[CpuidEntry]:
        count = c.KVM_MAX_CPUID_ENTRIES
        while True:
            buf = s.with_entries(s.kvm_cpuid2, count)
            buf.nent = count
            try:
                _ioctl(self.fd, request, buf)
            except KvmError as e:
                if e.errno == errno_mod.E2BIG and count < 4096:
                    count *= 2
                    continue
                raise
            return _cpuid_from_struct(buf)

    def msr_index_list(self) -> list[int]:
        probe = s.with_entries(s.kvm_msr_list, 0)
        try:
            _ioctl(self.fd, c.KVM_GET_MSR_INDEX_LIST, probe)
        except KvmError as e:
            if e.errno != errno_mod.E2BIG:
                raise
        buf = s.with_entries(s.kvm_msr_list, probe.nmsrs)
        buf.nmsrs = probe.nmsrs
        _ioctl(self.fd, c.KVM_GET_MSR_INDEX_LIST, buf)
        return list(buf.indices)[: buf.nmsrs]

    def create_vm(self) -> VmFd:
        return VmFd(self, _ioctl(self.fd, c.KVM_CREATE_VM, 0))


class VmFd(_FdOwner):
    """A VM: memory slots, the in-kernel irqchip and PIT, interrupt lines, eventfds, vCPU creation."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        super().__init__(fd)
        self.kvm = kvm

    def check_extension(self, cap: c.Cap) -> int:
        return _ioctl(self.fd, c.KVM_CHECK_EXTENSION, int(cap))

    def enable_cap(self, cap: c.Cap, *args: int) -> None:
        req = s.kvm_enable_cap(cap=int(cap))
        for i, a in enumerate(args):
            req.args[i] = a
        _ioctl(self.fd, c.KVM_ENABLE_CAP, req)

    def deny_msrs(self, msrs: Iterable[int]) -> None:
        """Make the guest's RDMSR and WRMSR of each of `msrs` raise #GP(0), every other MSR as KVM handles it
        (KVM_X86_SET_MSR_FILTER, default allow, one range per MSR whose only bit is clear; "KVM API" §4.126).
        At most 16 MSRs; an empty list removes the filter."""
        wanted = sorted(set(msrs))
        if len(wanted) > 16:
            raise KvmError("KVM_X86_SET_MSR_FILTER", errno_mod.E2BIG, f"{len(wanted)} MSRs, at most 16")
        filt = s.kvm_msr_filter(flags=c.KVM_MSR_FILTER_DEFAULT_ALLOW)
        denied = (s.u8 * 1)(0)  # KVM copies the bitmaps during the ioctl
        for slot, msr in zip(filt.ranges, wanted):
            slot.flags, slot.nmsrs, slot.base = c.KVM_MSR_FILTER_READ | c.KVM_MSR_FILTER_WRITE, 1, msr
            slot.bitmap = ctypes.cast(denied, ctypes.POINTER(s.u8))
        _ioctl(self.fd, c.KVM_X86_SET_MSR_FILTER, filt)

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, size: int, host_addr: int, flags: int = 0
    ) -> None:
        region = s.kvm_userspace_memory_region(
            slot=slot, flags=flags, guest_phys_addr=guest_phys_addr, memory_size=size, userspace_addr=host_addr
        )
        _ioctl(self.fd, c.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, addr: int) -> None:
        _ioctl(self.fd, c.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        _ioctl(self.fd, c.KVM_SET_IDENTITY_MAP_ADDR, s.u64(addr))

    def create_irqchip(self) -> None:
        _ioctl(self.fd, c.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = c.KVM_PIT_SPEAKER_DUMMY) -> None:
        _ioctl(self.fd, c.KVM_CREATE_PIT2, s.kvm_pit_config(flags=flags))

    def set_boot_cpu_id(self, vcpu_id: int) -> None:
        _ioctl(self.fd, c.KVM_SET_BOOT_CPU_ID, vcpu_id)

    def irq_line(self, irq: int, level: int) -> None:
        _ioctl(self.fd, c.KVM_IRQ_LINE, s.kvm_irq_level(irq=irq, level=level))

    def ioeventfd(
        self, fd: int, addr: int, length: int, *, pio: bool, datamatch: int | None = None, deassign: bool = False
    ) -> None:
        flags = (c.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (c.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        if datamatch is not None:
            flags |= c.KVM_IOEVENTFD_FLAG_DATAMATCH
        req = s.kvm_ioeventfd(datamatch=datamatch or 0, addr=addr, len=length, fd=fd, flags=flags)
        _ioctl(self.fd, c.KVM_IOEVENTFD, req)

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        req = s.kvm_irqfd(fd=fd, gsi=gsi, flags=c.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0)
        _ioctl(self.fd, c.KVM_IRQFD, req)

    def dirty_log(self, slot: int, pages: int) -> bytes:
        """The slot's dirty bitmap since the last call (one bit per 4 KiB page), as KVM clears it on read."""
        bitmap = ctypes.create_string_buffer(((pages + 63) // 64) * 8)
        _ioctl(self.fd, c.KVM_GET_DIRTY_LOG, s.kvm_dirty_log(slot=slot, dirty_bitmap=ctypes.addressof(bitmap)))
        return bitmap.raw

    def get_clock(self) -> s.kvm_clock_data:
        data = s.kvm_clock_data()
        _ioctl(self.fd, c.KVM_GET_CLOCK, data)
        return data

    def set_clock(self, clock_ns: int, flags: int = 0, realtime: int = 0) -> None:
        _ioctl(self.fd, c.KVM_SET_CLOCK, s.kvm_clock_data(clock=clock_ns, flags=flags, realtime=realtime))

    def get_irqchip(self, chip_id: int) -> s.kvm_irqchip:
        """One chip of the in-kernel irqchip: KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE or _IOAPIC."""
        chip = s.kvm_irqchip(chip_id=chip_id)
        _ioctl(self.fd, c.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip: s.kvm_irqchip) -> None:
        _ioctl(self.fd, c.KVM_SET_IRQCHIP, chip)

    def get_pit2(self) -> s.kvm_pit_state2:
        state = s.kvm_pit_state2()
        _ioctl(self.fd, c.KVM_GET_PIT2, state)
        return state

    def set_pit2(self, state: s.kvm_pit_state2) -> None:
        _ioctl(self.fd, c.KVM_SET_PIT2, state)

    def create_vcpu(self, vcpu_id: int) -> VcpuFd:
        return VcpuFd(self, vcpu_id, _ioctl(self.fd, c.KVM_CREATE_VCPU, vcpu_id))


class VcpuFd(_FdOwner):
    """A vCPU and its kvm_run page (`run`), through which KVM_RUN reports every exit."""

    def __init__(self, vm: VmFd, vcpu_id: int, fd: int) -> None:
        super().__init__(fd)
        self.vm = vm
        self.id = vcpu_id
        try:
            self._map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            self.close()
            raise KvmError("mmap kvm_run", e.errno or 0) from None
        self.run_page: s.kvm_run = s.kvm_run.from_buffer(self._map)
        self._run_base = ctypes.addressof(self.run_page)
        self._has_xsave = bool(vm.check_extension(c.Cap.XSAVE))

    def close(self) -> None:
        if not self.closed:
            del self.run_page
            try:
                self._map.close()
            except BufferError:
                pass  # a caller still holds a view of kvm_run; the mapping goes with it
        super().close()

    def run(self) -> c.ExitReason | int:
        """Enter the guest until the next exit to userspace; EINTR comes back as ExitReason.INTR.

        EAGAIN is KVM's way of saying a vCPU waiting for INIT/SIPI woke up: it is simply entered again."""
        while True:
            try:
                fcntl.ioctl(self.fd, c.KVM_RUN, 0)
                break
            except OSError as e:
                if e.errno == errno_mod.EINTR:
                    return c.ExitReason.INTR
                if e.errno != errno_mod.EAGAIN:
                    raise KvmError("KVM_RUN", e.errno or 0) from None
        reason = int(self.run_page.exit_reason)
        try:
            return c.ExitReason(reason)
        except ValueError:
            return reason

    def io_data(self) -> memoryview:
        """The bytes of the current IO exit (size × count), inside the kvm_run mapping."""
        io = self.run_page.exit.io
        start = io.data_offset
        return memoryview(self._map)[start : start + io.size * io.count]

    def set_signal_mask(self, blocked: Iterable[int]) -> None:
        """The signals blocked while this vCPU is in KVM_RUN, in place of its thread's own mask (api.rst 4.13,
        KVM_SET_SIGNAL_MASK). A thread that blocks a signal everywhere else and unblocks it here, as QEMU's vCPU
        threads do with SIG_IPI, can be kicked out of KVM_RUN by that signal without a handler: the kernel's
        sigset_t is 64 bits on x86-64, bit N-1 for signal N."""
        mask = 0
        for signum in blocked:
            if not 1 <= signum <= KERNEL_SIGSET_BITS:
                raise ValueError(f"signal {signum} is not in the kernel's sigset_t")
            mask |= 1 << (signum - 1)
        buf = s.with_entries(s.kvm_signal_mask, KERNEL_SIGSET_BITS // 8)
        buf.len = KERNEL_SIGSET_BITS // 8
        buf.sigset[:] = mask.to_bytes(KERNEL_SIGSET_BITS // 8, "little")
        _ioctl(self.fd, c.KVM_SET_SIGNAL_MASK, buf)

    def set_immediate_exit(self, value: bool) -> None:
        self.run_page.immediate_exit = 1 if value else 0

    def sync_sregs(self) -> bool:
        """Ask KVM to mirror the special registers in kvm_run at every exit (KVM_CAP_SYNC_REGS), so looking at
        them costs no ioctl; False where the host cannot."""
        if not self.vm.kvm.check_extension(c.Cap.SYNC_REGS) & c.SyncRegs.SREGS:
            return False
        self.run_page.kvm_valid_regs |= c.SyncRegs.SREGS
        return True

    @property
    def synced_sregs(self) -> s.kvm_sregs:
        """The special registers as of the last exit (valid after `sync_sregs()` returned True)."""
        sregs: s.kvm_sregs = self.run_page.s.regs.sregs
        return sregs

    def get_regs(self) -> s.kvm_regs:
        regs = s.kvm_regs()
        _ioctl(self.fd, c.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: s.kvm_regs) -> None:
        _ioctl(self.fd, c.KVM_SET_REGS, regs)

    def get_sregs(self) -> s.kvm_sregs:
        sregs = s.kvm_sregs()
        _ioctl(self.fd, c.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: s.kvm_sregs) -> None:
        _ioctl(self.fd, c.KVM_SET_SREGS, sregs)

    def get_sregs2(self) -> s.kvm_sregs2:
        sregs = s.kvm_sregs2()
        _ioctl(self.fd, c.KVM_GET_SREGS2, sregs)
        return sregs

    def set_sregs2(self, sregs: s.kvm_sregs2) -> None:
        _ioctl(self.fd, c.KVM_SET_SREGS2, sregs)

    def get_xsave2(self, size: int) -> bytes:
        """The XSAVE image at the size KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) gave (more than kvm_xsave's 4 KiB
        where the host has AMX); KVM_SET_XSAVE takes the same size back (api.rst 4.42, 4.43)."""
        if size < ctypes.sizeof(s.kvm_xsave):
            raise KvmError("KVM_GET_XSAVE2", errno_mod.EINVAL, f"a buffer of {size} bytes")
        buf = bytearray(size)
        _ioctl(self.fd, c.KVM_GET_XSAVE2, buf)
        return bytes(buf)

    def set_xsave_raw(self, image: bytes) -> None:
        buf = bytearray(image)
        _ioctl(self.fd, c.KVM_SET_XSAVE, buf)

    def get_debugregs(self) -> s.kvm_debugregs:
        regs = s.kvm_debugregs()
        _ioctl(self.fd, c.KVM_GET_DEBUGREGS, regs)
        return regs

    def set_debugregs(self, regs: s.kvm_debugregs) -> None:
        _ioctl(self.fd, c.KVM_SET_DEBUGREGS, regs)

    def get_fpu(self) -> s.kvm_fpu:
        fpu = s.kvm_fpu()
        _ioctl(self.fd, c.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: s.kvm_fpu) -> None:
        """Load the x87/SSE state. Where the host has XSAVE (KVM_CAP_XSAVE) this goes through KVM_SET_XSAVE: KVM_SET_FPU
        writes the legacy area of the XSAVE image but leaves its XSTATE_BV alone, so a vCPU whose x87 or SSE state
        was in its initial configuration (after FNINIT, SDM vol. 1 §13.6) gets the initial state back at the next
        entry and the write is lost. Here the legacy area is written and XSTATE_BV[1:0] set (vol. 1 §13.4.2)."""
        if self._has_xsave:
            xsave = self.get_xsave()
            area = memoryview(xsave).cast("B")
            struct.pack_into(
                "<HHBxHQQI", area, 0, fpu.fcw, fpu.fsw, fpu.ftwx, fpu.last_opcode, fpu.last_ip, fpu.last_dp, fpu.mxcsr
            )
            area[FXSAVE_ST : FXSAVE_ST + 128] = bytes(fpu.fpr)
            area[FXSAVE_XMM : FXSAVE_XMM + 256] = bytes(fpu.xmm)
            struct.pack_into(
                "<Q", area, XSAVE_HEADER, struct.unpack_from("<Q", area, XSAVE_HEADER)[0] | XFEATURE_X87_SSE
            )
            self.set_xsave(xsave)
            return
        _ioctl(self.fd, c.KVM_SET_FPU, fpu)

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        wanted = list(indices)
        buf = s.with_entries(s.kvm_msrs, len(wanted))
        buf.nmsrs = len(wanted)
        for entry, index in zip(buf.entries, wanted):
            entry.index = index
        got = _ioctl(self.fd, c.KVM_GET_MSRS, buf)
        return {e.index: e.data for e in list(buf.entries)[:got]}

    def set_msrs(self, values: dict[int, int]) -> None:
        buf = s.with_entries(s.kvm_msrs, len(values))
        buf.nmsrs = len(values)
        for entry, (index, data) in zip(buf.entries, values.items()):
            entry.index, entry.data = index, data
        done = _ioctl(self.fd, c.KVM_SET_MSRS, buf)
        if done != len(values):
            bad = list(values)[done]
            raise KvmError("KVM_SET_MSRS", errno_mod.EINVAL, f"MSR {bad:#x} refused")

    def set_cpuid2(self, entries: Sequence[CpuidEntry]) -> None:
        _ioctl(self.fd, c.KVM_SET_CPUID2, _cpuid_to_struct(entries))

    def get_cpuid2(self) -> list[CpuidEntry]:
        buf = s.with_entries(s.kvm_cpuid2, c.KVM_MAX_CPUID_ENTRIES)
        buf.nent = c.KVM_MAX_CPUID_ENTRIES
        _ioctl(self.fd, c.KVM_GET_CPUID2, buf)
        return _cpuid_from_struct(buf)

    def get_xsave(self) -> s.kvm_xsave:
        xsave = s.kvm_xsave()
        _ioctl(self.fd, c.KVM_GET_XSAVE, xsave)
        return xsave

    def set_xsave(self, xsave: s.kvm_xsave) -> None:
        _ioctl(self.fd, c.KVM_SET_XSAVE, xsave)

    def get_xcrs(self) -> s.kvm_xcrs:
        xcrs = s.kvm_xcrs()
        _ioctl(self.fd, c.KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs: s.kvm_xcrs) -> None:
        _ioctl(self.fd, c.KVM_SET_XCRS, xcrs)

    def get_vcpu_events(self) -> s.kvm_vcpu_events:
        events = s.kvm_vcpu_events()
        _ioctl(self.fd, c.KVM_GET_VCPU_EVENTS, events)
        return events

    def set_vcpu_events(self, events: s.kvm_vcpu_events) -> None:
        _ioctl(self.fd, c.KVM_SET_VCPU_EVENTS, events)

    def get_lapic(self) -> s.kvm_lapic_state:
        lapic = s.kvm_lapic_state()
        _ioctl(self.fd, c.KVM_GET_LAPIC, lapic)
        return lapic

    def set_lapic(self, lapic: s.kvm_lapic_state) -> None:
        _ioctl(self.fd, c.KVM_SET_LAPIC, lapic)

    def get_mp_state(self) -> c.MpState:
        state = s.kvm_mp_state()
        _ioctl(self.fd, c.KVM_GET_MP_STATE, state)
        return c.MpState(state.mp_state)

    def set_mp_state(self, state: c.MpState) -> None:
        _ioctl(self.fd, c.KVM_SET_MP_STATE, s.kvm_mp_state(mp_state=int(state)))

    def idle_state(self) -> IdleState:
        """What could still wake this vCPU, read after KVM_RUN returned (e.g. EINTR from a kick): its MP state,
        RFLAGS.IF (bit 9) and whether KVM holds an event to deliver (NMI, SMI, interrupt or exception)."""
        raw = s.kvm_mp_state()
        _ioctl(self.fd, c.KVM_GET_MP_STATE, raw)
        try:
            mp_state: c.MpState | int = c.MpState(raw.mp_state)
        except ValueError:
            mp_state = int(raw.mp_state)
        events = self.get_vcpu_events()
        pending = bool(
            events.nmi.pending
            or events.nmi.injected
            or events.smi.pending
            or events.interrupt.injected
            or events.exception.injected
            or events.exception.pending
        )
        return IdleState(mp_state, bool(self.get_regs().rflags & RFLAGS_IF), pending)

    def set_guest_debug(self, control: c.GuestDebug, debugregs: Sequence[int] = ()) -> None:
        req = s.kvm_guest_debug(control=int(control))
        for i, v in enumerate(debugregs):
            req.debugreg[i] = v
        _ioctl(self.fd, c.KVM_SET_GUEST_DEBUG, req)

    def translate(self, linear: int) -> s.kvm_translation:
        req = s.kvm_translation(linear_address=linear)
        _ioctl(self.fd, c.KVM_TRANSLATE, req)
        return req

    def nmi(self) -> None:
        _ioctl(self.fd, c.KVM_NMI)

    def get_tsc_khz(self) -> int:
        return _ioctl(self.fd, c.KVM_GET_TSC_KHZ)
