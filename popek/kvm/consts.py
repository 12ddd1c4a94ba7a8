"""KVM request numbers, exit reasons and capabilities (include/uapi/linux/kvm.h; Documentation/virt/kvm/api.rst).

Every request is declared in the kernel's own macro form; tests/unit/kvm compares them with the C header.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

from popek.kvm import structs as s
from popek.kvm.ioctl import IO, IOR, IOW, IOWR

KVMIO = 0xAE
KVM_API_VERSION = 12

# system ioctls (/dev/kvm)
KVM_GET_API_VERSION = IO(KVMIO, 0x00)
KVM_CREATE_VM = IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = IOWR(KVMIO, 0x02, s.kvm_msr_list)
KVM_CHECK_EXTENSION = IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = IOWR(KVMIO, 0x05, s.kvm_cpuid2)
KVM_GET_EMULATED_CPUID = IOWR(KVMIO, 0x09, s.kvm_cpuid2)

# VM ioctls
KVM_CREATE_VCPU = IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = IOW(KVMIO, 0x42, s.kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = IOW(KVMIO, 0x46, s.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = IOW(KVMIO, 0x48, s.u64)
KVM_CREATE_IRQCHIP = IO(KVMIO, 0x60)
KVM_IRQ_LINE = IOW(KVMIO, 0x61, s.kvm_irq_level)
KVM_IRQ_LINE_STATUS = IOWR(KVMIO, 0x67, s.kvm_irq_level)
KVM_IRQFD = IOW(KVMIO, 0x76, s.kvm_irqfd)
KVM_CREATE_PIT2 = IOW(KVMIO, 0x77, s.kvm_pit_config)
KVM_SET_BOOT_CPU_ID = IO(KVMIO, 0x78)
KVM_IOEVENTFD = IOW(KVMIO, 0x79, s.kvm_ioeventfd)
KVM_SET_CLOCK = IOW(KVMIO, 0x7B, s.kvm_clock_data)
KVM_GET_CLOCK = IOR(KVMIO, 0x7C, s.kvm_clock_data)
KVM_ENABLE_CAP = IOW(KVMIO, 0xA3, s.kvm_enable_cap)

# vCPU ioctls
KVM_RUN = IO(KVMIO, 0x80)
KVM_GET_REGS = IOR(KVMIO, 0x81, s.kvm_regs)
KVM_SET_REGS = IOW(KVMIO, 0x82, s.kvm_regs)
KVM_GET_SREGS = IOR(KVMIO, 0x83, s.kvm_sregs)
KVM_SET_SREGS = IOW(KVMIO, 0x84, s.kvm_sregs)
KVM_TRANSLATE = IOWR(KVMIO, 0x85, s.kvm_translation)
KVM_GET_MSRS = IOWR(KVMIO, 0x88, s.kvm_msrs)
KVM_SET_MSRS = IOW(KVMIO, 0x89, s.kvm_msrs)
KVM_SET_SIGNAL_MASK = IOW(KVMIO, 0x8B, s.kvm_signal_mask)
KVM_GET_FPU = IOR(KVMIO, 0x8C, s.kvm_fpu)
KVM_SET_FPU = IOW(KVMIO, 0x8D, s.kvm_fpu)
KVM_GET_LAPIC = IOR(KVMIO, 0x8E, s.kvm_lapic_state)
KVM_SET_LAPIC = IOW(KVMIO, 0x8F, s.kvm_lapic_state)
KVM_SET_CPUID2 = IOW(KVMIO, 0x90, s.kvm_cpuid2)
KVM_GET_CPUID2 = IOWR(KVMIO, 0x91, s.kvm_cpuid2)
KVM_GET_MP_STATE = IOR(KVMIO, 0x98, s.kvm_mp_state)
KVM_SET_MP_STATE = IOW(KVMIO, 0x99, s.kvm_mp_state)
KVM_NMI = IO(KVMIO, 0x9A)
KVM_SET_GUEST_DEBUG = IOW(KVMIO, 0x9B, s.kvm_guest_debug)
KVM_GET_VCPU_EVENTS = IOR(KVMIO, 0x9F, s.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = IOW(KVMIO, 0xA0, s.kvm_vcpu_events)
KVM_GET_DEBUGREGS = IOR(KVMIO, 0xA1, s.kvm_debugregs)
KVM_SET_DEBUGREGS = IOW(KVMIO, 0xA2, s.kvm_debugregs)
KVM_SET_TSC_KHZ = IO(KVMIO, 0xA2)
KVM_GET_TSC_KHZ = IO(KVMIO, 0xA3)
KVM_GET_XSAVE = IOR(KVMIO, 0xA4, s.kvm_xsave)
KVM_X86_SET_MSR_FILTER = IOW(KVMIO, 0xC6, s.kvm_msr_filter)
KVM_SET_XSAVE = IOW(KVMIO, 0xA5, s.kvm_xsave)
KVM_GET_XCRS = IOR(KVMIO, 0xA6, s.kvm_xcrs)
KVM_SET_XCRS = IOW(KVMIO, 0xA7, s.kvm_xcrs)
KVM_GET_IRQCHIP = IOWR(KVMIO, 0x62, s.kvm_irqchip)
KVM_SET_IRQCHIP = IOR(KVMIO, 0x63, s.kvm_irqchip)  # _IOR in <linux/kvm.h>, as it has always been
KVM_GET_PIT2 = IOR(KVMIO, 0x9F, s.kvm_pit_state2)
KVM_SET_PIT2 = IOW(KVMIO, 0xA0, s.kvm_pit_state2)
KVM_GET_SREGS2 = IOR(KVMIO, 0xCC, s.kvm_sregs2)
KVM_SET_SREGS2 = IOW(KVMIO, 0xCD, s.kvm_sregs2)
KVM_GET_XSAVE2 = IOR(KVMIO, 0xCF, s.kvm_xsave)  # the buffer is KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) bytes

IOCTL_NAMES: dict[int, str] = {
    v: k for k, v in dict(globals()).items() if k.startswith("KVM_") and isinstance(v, int) and k != "KVM_API_VERSION"
}


class ExitReason(IntEnum):
    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    X86_RDMSR = 29
    X86_WRMSR = 30
    X86_BUS_LOCK = 33
    NOTIFY = 37


class InternalError(IntEnum):
    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0


class SystemEvent(IntEnum):
    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6


class Cap(IntEnum):
    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    PIT = 11
    MP_STATE = 14
    SET_GUEST_DEBUG = 23
    IRQ_INJECT_STATUS = 26
    IRQFD = 32
    PIT2 = 33
    SET_BOOT_CPU_ID = 34
    IOEVENTFD = 36
    SET_IDENTITY_MAP_ADDR = 37
    ADJUST_CLOCK = 39
    INTERNAL_ERROR_DATA = 40
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    XSAVE = 55
    XCRS = 56
    TSC_CONTROL = 60
    GET_TSC_KHZ = 61
    MAX_VCPUS = 66
    MAX_VCPU_ID = 128
    IMMEDIATE_EXIT = 136
    EXCEPTION_PAYLOAD = 164
    SYNC_REGS = 74
    X86_USER_SPACE_MSR = 188
    X86_MSR_FILTER = 189
    EXIT_ON_EMULATION_FAILURE = 204
    X86_TRIPLE_FAULT_EVENT = 218
    SREGS2 = 200
    XSAVE2 = 208


KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_DEFAULT_ALLOW = 0


class MpState(IntEnum):
    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4


class VcpuEventsValid(IntFlag):
    NMI_PENDING = 0x1
    SIPI_VECTOR = 0x2
    SHADOW = 0x4
    SMM = 0x8
    PAYLOAD = 0x10
    TRIPLE_FAULT = 0x20


class SyncRegs(IntFlag):
    """Register sets KVM_CAP_SYNC_REGS can mirror in kvm_run (KVM_SYNC_X86_*)."""

    REGS = 1 << 0
    SREGS = 1 << 1
    EVENTS = 1 << 2


class GuestDebug(IntFlag):
    ENABLE = 0x1
    SINGLESTEP = 0x2
    USE_SW_BP = 0x10000
    USE_HW_BP = 0x20000
    INJECT_DB = 0x40000
    INJECT_BP = 0x80000


class MemFlag(IntFlag):
    LOG_DIRTY_PAGES = 1 << 0
    READONLY = 1 << 1


KVM_PIT_SPEAKER_DUMMY = 1
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_CLOCK_TSC_STABLE = 2
KVM_CLOCK_REALTIME = 1 << 2
KVM_CLOCK_HOST_TSC = 1 << 3
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0
KVM_MAX_CPUID_ENTRIES = 256
