"""popek's ioctl numbers and struct layouts are the kernel's: compared with <linux/kvm.h> compiled by the C
compiler, so a wrong field or size cannot hide behind a hand-copied constant."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from popek.kvm import consts, structs

HEADER = Path("/usr/include/linux/kvm.h")

STRUCTS = [
    "kvm_regs",
    "kvm_sregs",
    "kvm_fpu",
    "kvm_msr_entry",
    "kvm_msrs",
    "kvm_msr_list",
    "kvm_cpuid_entry2",
    "kvm_cpuid2",
    "kvm_userspace_memory_region",
    "kvm_pit_config",
    "kvm_irq_level",
    "kvm_vcpu_events",
    "kvm_lapic_state",
    "kvm_xsave",
    "kvm_xcrs",
    "kvm_guest_debug",
    "kvm_mp_state",
    "kvm_ioeventfd",
    "kvm_irqfd",
    "kvm_dirty_log",
    "kvm_clock_data",
    "kvm_enable_cap",
    "kvm_msr_filter_range",
    "kvm_msr_filter",
    "kvm_translation",
    "kvm_debugregs",
    "kvm_run",
    "kvm_sregs2",
    "kvm_pic_state",
    "kvm_ioapic_state",
    "kvm_irqchip",
    "kvm_pit_channel_state",
    "kvm_pit_state2",
]
OFFSETS = [
    ("kvm_run", "exit_reason"),
    ("kvm_run", "kvm_valid_regs"),
    ("kvm_run", "s"),
    ("kvm_vcpu_events", "sipi_vector"),
    ("kvm_vcpu_events", "flags"),
    ("kvm_vcpu_events", "exception_payload"),
    ("kvm_sregs", "efer"),
    ("kvm_sregs", "interrupt_bitmap"),
    ("kvm_fpu", "xmm"),
    ("kvm_fpu", "mxcsr"),
    ("kvm_sregs2", "flags"),
    ("kvm_sregs2", "pdptrs"),
    ("kvm_irqchip", "chip"),
    ("kvm_pit_channel_state", "count_load_time"),
    ("kvm_pit_state2", "flags"),
    ("kvm_ioapic_state", "redirtbl"),
]
RUN_MEMBERS = [
    ("io", "data_offset"),
    ("mmio", "is_write"),
    ("emulation_failure", "insn_bytes"),
    ("system_event", "data"),
]


@pytest.fixture(scope="module")
def c_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if not HEADER.exists() or shutil.which("cc") is None:
        pytest.skip("needs <linux/kvm.h> (linux-libc-dev) and a C compiler")
    names = [n for n in dir(consts) if n.startswith("KVM_") and isinstance(getattr(consts, n), int)]
    names = [n for n in names if n not in ("KVM_API_VERSION", "KVM_MAX_CPUID_ENTRIES")]
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/kvm.h>", "int main(void) {"]
    for n in names:
        lines.append(f'#ifdef {n}\nprintf("{n} %llu\\n", (unsigned long long)({n}));\n#endif')
    for s in STRUCTS:
        lines.append(f'printf("sizeof_{s} %zu\\n", sizeof(struct {s}));')
    for s, f in OFFSETS:
        lines.append(f'printf("offsetof_{s}_{f} %zu\\n", offsetof(struct {s}, {f}));')
    for member, field in RUN_MEMBERS:
        lines.append(f'printf("run_{member}_{field} %zu\\n", offsetof(struct kvm_run, {member}.{field}));')
    lines.append("return 0; }")
    src = tmp_path_factory.mktemp("abi") / "abi.c"
    src.write_text("\n".join(lines))
    exe = src.with_suffix("")
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_ioctl_numbers_match_the_kernel_header(c_values: dict[str, int]) -> None:
    checked = 0
    for name in dir(consts):
        if name in c_values:
            assert getattr(consts, name) == c_values[name], name
            checked += 1
    assert checked >= 50


def test_struct_sizes_match_the_kernel_header(c_values: dict[str, int]) -> None:
    for name in STRUCTS:
        assert ctypes.sizeof(getattr(structs, name)) == c_values[f"sizeof_{name}"], name


def test_field_offsets_match_the_kernel_header(c_values: dict[str, int]) -> None:
    for s, f in OFFSETS:
        assert getattr(getattr(structs, s), f).offset == c_values[f"offsetof_{s}_{f}"], (s, f)
    exit_base = structs.kvm_run.exit.offset
    members = {name: typ for name, typ in structs._run_exit._fields_}
    for member, field in RUN_MEMBERS:
        ours = exit_base + getattr(members[member], field).offset
        assert ours == c_values[f"run_{member}_{field}"], (member, field)


def test_flexible_array_structs_get_room_for_their_entries() -> None:
    buf = structs.with_entries(structs.kvm_cpuid2, 3)
    assert ctypes.sizeof(buf) == 8 + 3 * 40
    buf.entries[2].function = 7
    assert buf.entries[2].function == 7
