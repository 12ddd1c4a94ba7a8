"""ctypes mirrors of the KVM ABI structures (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h).

Names and field order are the kernel's; every size is asserted at import so that a mistake fails loudly here
instead of corrupting an ioctl argument. Structures ending in a flexible array (kvm_cpuid2, kvm_msrs,
kvm_msr_list) are declared with an empty array, which is what `sizeof` in the request number expects, and are
instantiated with a sized subclass by `with_entries`.
"""

from __future__ import annotations

import ctypes
import functools
from ctypes import c_int32, c_uint8, c_uint16, c_uint32, c_uint64
from typing import Any, TypeVar

u8, u16, u32, u64, s32 = c_uint8, c_uint16, c_uint32, c_uint64, c_int32


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, u64)
        for name in (
            [
                "rax",
                "rbx",
                "rcx",
                "rdx",
                "rsi",
                "rdi",
                "rsp",
                "rbp",
                "r8",
                "r9",
                "r10",
                "r11",
                "r12",
                "r13",
                "r14",
                "r15",
                "rip",
                "rflags",
            ]
        )
    ]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * 4),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (u8 * 16) * 8),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(ctypes.Structure):
    _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * 0)]


class kvm_msr_list(ctypes.Structure):
    _fields_ = [("nmsrs", u32), ("indices", u32 * 0)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_signal_mask(ctypes.Structure):
    """KVM_SET_SIGNAL_MASK's header; `len` bytes of the kernel's sigset_t follow (8 on x86-64)."""

    _fields_ = [("len", u32), ("sigset", u8 * 0)]


class kvm_cpuid2(ctypes.Structure):
    _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * 0)]


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_irq_level(ctypes.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class _exception(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("has_error_code", u8), ("pending", u8), ("error_code", u32)]


class _interrupt(ctypes.Structure):
    _fields_ = [("injected", u8), ("nr", u8), ("soft", u8), ("shadow", u8)]


class _nmi(ctypes.Structure):
    _fields_ = [("injected", u8), ("pending", u8), ("masked", u8), ("pad", u8)]


class _smi(ctypes.Structure):
    _fields_ = [("smm", u8), ("pending", u8), ("smm_inside_nmi", u8), ("latched_init", u8)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [
        ("exception", _exception),
        ("interrupt", _interrupt),
        ("nmi", _nmi),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi", _smi),
        ("triple_fault_pending", u8),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", ctypes.c_char * 1024)]


class kvm_xsave(ctypes.Structure):
    _fields_ = [("region", u32 * 1024)]


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * 16), ("padding", u64 * 16)]


class kvm_guest_debug(ctypes.Structure):
    _fields_ = [("control", u32), ("pad", u32), ("debugreg", u64 * 8)]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


class kvm_irqfd(ctypes.Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


class kvm_dirty_log(ctypes.Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_clock_data(ctypes.Structure):
    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_msr_filter_range(ctypes.Structure):
    """One range of a KVM_X86_SET_MSR_FILTER: `nmsrs` MSRs from `base`, bit i of `bitmap` set allows MSR base + i
    for the accesses in `flags` (KVM_MSR_FILTER_READ / _WRITE), clear denies it."""

    _fields_ = [("flags", u32), ("nmsrs", u32), ("base", u32), ("bitmap", ctypes.POINTER(u8))]


class kvm_msr_filter(ctypes.Structure):
    _fields_ = [("flags", u32), ("ranges", kvm_msr_filter_range * 16)]


class kvm_translation(ctypes.Structure):
    _fields_ = [
        ("linear_address", u64),
        ("physical_address", u64),
        ("valid", u8),
        ("writeable", u8),
        ("usermode", u8),
        ("pad", u8 * 5),
    ]


class kvm_debugregs(ctypes.Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class kvm_sregs2(ctypes.Structure):
    """KVM_GET_SREGS2 (KVM_CAP_SREGS2): kvm_sregs without the interrupt bitmap, with the PAE PDPTRs."""

    _fields_ = [
        *kvm_sregs._fields_[:-1],
        ("flags", u64),
        ("pdptrs", u64 * 4),
    ]


class kvm_pic_state(ctypes.Structure):
    _fields_ = [
        (name, u8)
        for name in (
            "last_irr",
            "irr",
            "imr",
            "isr",
            "priority_add",
            "irq_base",
            "read_reg_select",
            "poll",
            "special_mask",
            "init_state",
            "auto_eoi",
            "rotate_on_auto_eoi",
            "special_fully_nested_mode",
            "init4",
            "elcr",
            "elcr_mask",
        )
    ]


class kvm_ioapic_state(ctypes.Structure):
    _fields_ = [
        ("base_address", u64),
        ("ioregsel", u32),
        ("id", u32),
        ("irr", u32),
        ("pad", u32),
        ("redirtbl", u64 * 24),
    ]


class _irqchip_union(ctypes.Union):
    _fields_ = [("dummy", ctypes.c_char * 512), ("pic", kvm_pic_state), ("ioapic", kvm_ioapic_state)]


class kvm_irqchip(ctypes.Structure):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", _irqchip_union)]


class kvm_pit_channel_state(ctypes.Structure):
    _fields_ = [
        ("count", u32),
        ("latched_count", u16),
        ("count_latched", u8),
        ("status_latched", u8),
        ("status", u8),
        ("read_state", u8),
        ("write_state", u8),
        ("write_latch", u8),
        ("rw_mode", u8),
        ("mode", u8),
        ("bcd", u8),
        ("gate", u8),
        ("count_load_time", ctypes.c_int64),
    ]


class kvm_pit_state2(ctypes.Structure):
    _fields_ = [("channels", kvm_pit_channel_state * 3), ("flags", u32), ("reserved", u32 * 9)]


# --- struct kvm_run (the page shared with the kernel, mmap'd from the vCPU fd) ---


class _run_io(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class _run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class _run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class _run_ex(ctypes.Structure):
    _fields_ = [("exception", u32), ("error_code", u32)]


class _run_debug(ctypes.Structure):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class _run_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class _run_emulation_failure(ctypes.Structure):
    _fields_ = [
        ("suberror", u32),
        ("ndata", u32),
        ("flags", u64),
        ("insn_size", u8),
        ("insn_bytes", u8 * 15),
    ]


class _run_system_event(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_sync_regs(ctypes.Structure):
    """The registers KVM copies into kvm_run at every exit when asked to (KVM_CAP_SYNC_REGS, x86)."""

    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


class _run_s(ctypes.Union):
    _fields_ = [("regs", kvm_sync_regs), ("padding", ctypes.c_char * 2048)]


class _run_exit(ctypes.Union):
    _fields_ = [
        ("hw_exit_reason", u64),
        ("fail_entry", _run_fail_entry),
        ("ex", _run_ex),
        ("io", _run_io),
        ("debug", _run_debug),
        ("mmio", _run_mmio),
        ("internal", _run_internal),
        ("emulation_failure", _run_emulation_failure),
        ("system_event", _run_system_event),
        ("padding", ctypes.c_char * 256),
    ]


class kvm_run(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", _run_exit),
        ("kvm_valid_regs", u64),
        ("kvm_dirty_regs", u64),
        ("s", _run_s),
    ]


_SIZES: dict[type[ctypes.Structure], int] = {
    kvm_regs: 144,
    kvm_sync_regs: 520,
    kvm_segment: 24,
    kvm_dtable: 16,
    kvm_sregs: 312,
    kvm_fpu: 416,
    kvm_msr_entry: 16,
    kvm_msrs: 8,
    kvm_msr_list: 4,
    kvm_cpuid_entry2: 40,
    kvm_cpuid2: 8,
    kvm_userspace_memory_region: 32,
    kvm_pit_config: 64,
    kvm_irq_level: 8,
    kvm_vcpu_events: 64,
    kvm_lapic_state: 1024,
    kvm_xsave: 4096,
    kvm_xcrs: 392,
    kvm_guest_debug: 72,
    kvm_mp_state: 4,
    kvm_ioeventfd: 64,
    kvm_irqfd: 32,
    kvm_dirty_log: 16,
    kvm_clock_data: 48,
    kvm_enable_cap: 104,
    kvm_msr_filter_range: 24,
    kvm_msr_filter: 392,
    kvm_translation: 24,
    kvm_debugregs: 128,
    kvm_run: 2352,
    kvm_sregs2: 320,
    kvm_pic_state: 16,
    kvm_ioapic_state: 216,
    kvm_irqchip: 520,
    kvm_pit_channel_state: 24,
    kvm_pit_state2: 112,
}
for _struct, _size in _SIZES.items():
    assert ctypes.sizeof(_struct) == _size, f"{_struct.__name__} is {ctypes.sizeof(_struct)} bytes, not {_size}"
assert kvm_run.exit.offset == 32 and kvm_run.kvm_valid_regs.offset == 288

S = TypeVar("S", bound=ctypes.Structure)


@functools.cache
def _sized(base: type[ctypes.Structure], count: int) -> type[ctypes.Structure]:
    """The struct type with `count` entries: made once per (struct, count), since building a ctypes class costs
    far more than the ioctl it is for (KVM_GET_MSRS runs on the exit path)."""
    fields: list[Any] = list(base._fields_)
    last_name, last_type = fields[-1]
    element = last_type._type_

    class Sized(ctypes.Structure):
        _fields_ = [*fields[:-1], (last_name, element * count)]

    Sized.__name__ = base.__name__
    return Sized


def with_entries(base: type[S], count: int) -> S:
    """Instantiate a flexible-array KVM struct with room for `count` entries after its header."""
    return _sized(base, count)()  # type: ignore[return-value]
