"""An idle guest on `--accel soft` costs no host CPU (issue 10): with every vCPU halted the run loop sleeps until
the wall time of the next timer deadline, as QEMU's `-icount sleep=on` does, and wakes early for an interrupt
raised from another thread or a stop. Without outside input it stays deterministic: it retires the same
instructions and ends at the same virtual time as with `virtual_time=True`, which skips idle time at once."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from popek.accel.exits import Stop, StopReason
from popek.accel.soft import SoftAccel
from popek.vm import Vm, VmSpec

from .guests import PROTECTED_MODE, boot_sector, pic_init
from .test_vm_snapshot import Console, finish, start

TICKS = 16  # PIT periods of 65536 / 1.193182 MHz = 54.9 ms: 0.88 s of idle guest
PIT_PERIOD_NS = 65536 * 10**9 // 1_193_182

# The PIC remapped to 0x20, IRQ0 only; the PIT in mode 2 with the longest period; the main code halts until the
# handler has counted TICKS ticks at 0x6004, prints a letter per tick, and exits through the debug port.
IDLE_GUEST = (
    PROTECTED_MODE
    + """
    mov dword [0x1000 + {vector} * 8], handler
    mov dword [0x1000 + {vector} * 8 + 4], 0x00008e00
    mov word [0x1000 + {vector} * 8 + 2], 0x08
    lidt [idt_desc]
{pics}{timer}
    sti
idle:
    hlt
    cmp dword [0x6004], {ticks}
    jb idle
    cli
    mov al, 0
    out 0xf4, al
    hlt
handler:
    push eax
    push edx
    inc dword [0x6004]
    mov dx, 0x3f8
    mov al, 't'
    out dx, al
    mov al, 0x20
    out 0x20, al
    pop edx
    pop eax
    iretd
idt_desc: dw 0x30 * 8 - 1
          dd 0x1000
"""
)
PIT_LONGEST = """
    mov al, 0x34
    out 0x43, al
    xor al, al
    out 0x40, al
    out 0x40, al
"""
# the local APIC's timer, one-shot, divide by 128, the largest count: its deadline is 550 s away. The APIC is
# software-enabled for it, so LINT0 is made the PIC's virtual wire (ExtINT, unmasked) as firmware leaves it.
APIC_FAR_AWAY = """
    mov dword [0xfee000f0], 0x1ff
    mov dword [0xfee00350], 0x700
    mov dword [0xfee003e0], 0xa
    mov dword [0xfee00320], 0x2f
    mov dword [0xfee00380], 0xffffffff
"""


def spec(tmp: Path, *, virtual_time: bool, timer: str = PIT_LONGEST, mask: int = 0xFE, vector: int = 0x20,
         ticks: int = TICKS) -> VmSpec:  # fmt: skip
    source = IDLE_GUEST.format(timer=timer, pics=pic_init(mask), vector=vector, ticks=ticks)
    return VmSpec(kernel=boot_sector(tmp, source), mem=2 << 20, accel="soft", timeout=120, virtual_time=virtual_time)


def run_measured(vm: Vm) -> tuple[Stop, float, float]:
    """The stop, the wall time and this process's CPU time of `vm.run()`."""
    wall, cpu = time.monotonic(), time.process_time()
    stop = vm.run()
    return stop, time.monotonic() - wall, time.process_time() - cpu


def asleep(vm: Vm) -> SoftAccel:
    """The VM's backend, once its run loop (started in another thread) has begun an idle sleep (60 s at most)."""
    accel = vm.accel
    assert isinstance(accel, SoftAccel)
    deadline = time.monotonic() + 60
    while accel.idle_sleeps == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert accel.idle_sleeps, "the guest never went idle"
    return accel


def test_an_idle_guest_sleeps_in_wall_time_and_uses_little_host_cpu(tmp_path: Path) -> None:
    console = Console()
    with Vm(spec(tmp_path, virtual_time=False), console) as vm:
        stop, wall, cpu = run_measured(vm)
        accel = vm.accel
        assert isinstance(accel, SoftAccel)
        assert stop.reason is StopReason.DEBUG_EXIT, stop
        assert console.out == b"t" * TICKS
        assert wall >= 0.9 * TICKS * PIT_PERIOD_NS / 1e9  # the ticks came at the PIT's pace in wall time
        assert cpu < 0.5 * wall, f"{cpu:.3f} s of CPU in {wall:.3f} s"
        assert accel.idle_sleeps >= TICKS and accel.idle_wakeups == 0
        assert accel.idle_ns >= 0.9 * TICKS * PIT_PERIOD_NS
        assert any(line.startswith("idle: slept ") for line in accel.extra_stats())


def test_idle_sleeping_keeps_the_run_deterministic_as_pure_virtual_time(tmp_path: Path) -> None:
    ends = []
    for virtual_time in (False, True):
        console = Console()
        with Vm(spec(tmp_path, virtual_time=virtual_time), console) as vm:
            stop = vm.run()
            accel = vm.accel
            assert isinstance(accel, SoftAccel)
            assert stop.reason is StopReason.DEBUG_EXIT, stop
            ends.append((console.out, accel.cpus[0].instructions, accel.clock.now_ns()))
            assert (accel.idle_sleeps == 0) == virtual_time
    assert ends[0] == ends[1]
    assert ends[0][2] >= TICKS * PIT_PERIOD_NS  # the virtual clock passed every tick


def test_a_stop_wakes_a_guest_sleeping_until_a_far_timer(tmp_path: Path) -> None:
    with Vm(spec(tmp_path, virtual_time=False, timer=APIC_FAR_AWAY, mask=0xFF, vector=0x2F), Console()) as vm:
        thread, stops = start(vm)
        accel = asleep(vm)
        time.sleep(0.2)
        assert thread.is_alive() and accel.idle_sleeps == 1  # one sleep, toward the timer 550 s away
        asked = time.monotonic()
        vm.request_stop(Stop(StopReason.USER_QUIT, "the test is done with it"))
        stop = finish(thread, stops)
        assert time.monotonic() - asked < 5
        assert stop.reason is StopReason.USER_QUIT
        assert accel.clock.now_ns() < 60 * 10**9  # virtual time moved by what was slept, not to the deadline


def test_an_interrupt_from_another_thread_wakes_the_sleeping_guest(tmp_path: Path) -> None:
    # IRQ1 unmasked beside the far APIC timer: the handler (vector 0x21) counts one tick and the guest exits
    source = spec(tmp_path, virtual_time=False, timer=APIC_FAR_AWAY, mask=0xFD, vector=0x21, ticks=1)
    console = Console()
    with Vm(source, console) as vm:
        thread, stops = start(vm)
        accel = asleep(vm)
        line = accel.irq_line(1)
        raised = time.monotonic()
        threading.Thread(target=line.pulse).start()
        stop = finish(thread, stops)
        assert time.monotonic() - raised < 5
        assert stop.reason is StopReason.DEBUG_EXIT, stop
        assert console.out == b"t" and accel.idle_wakeups >= 1
