"""virtio-blk request cost: µs per 4 KiB read, one request per notification, from a bare-metal driver (a 32-bit
Multiboot guest that polls the used ring), on KVM with the ioeventfd/irqfd fast path, on KVM through vCPU exits
(--no-eventfds), and on the software CPU.

    python3 benchmarks/virtio_blk.py [--requests 2000] [--repeat 3]

Needs nasm and /dev/kvm (the software CPU runs a tenth of the requests).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from popek.devices.virtio.blk import DiskSpec
from popek.vm import Vm, VmSpec

GUEST = """
bits 32
org 0x100000
header:
    dd 0x1BADB002, 0x00010000, -(0x1BADB002 + 0x00010000)
    dd header, header, 0, 0, entry
V     equ 0xD0000000
DESC  equ 0x200000
AVAIL equ 0x201000
USED  equ 0x202000
HDR   equ 0x203000
DATA  equ 0x204000
STAT  equ 0x206000
entry:
    mov dword [V + 0x070], 0
    mov dword [V + 0x070], 3
    mov dword [V + 0x024], 1
    mov dword [V + 0x020], 1              ; VIRTIO_F_VERSION_1 only
    mov dword [V + 0x070], 0xb
    mov dword [V + 0x038], 8
    mov dword [V + 0x080], DESC
    mov dword [V + 0x090], AVAIL
    mov dword [V + 0x0a0], USED
    mov dword [V + 0x044], 1
    mov dword [V + 0x070], 0xf
    mov dword [DESC + 0], HDR
    mov dword [DESC + 8], 16
    mov dword [DESC + 12], 0x00010001     ; NEXT, next = 1
    mov dword [DESC + 16], DATA
    mov dword [DESC + 24], 4096
    mov dword [DESC + 28], 0x00020003     ; NEXT | WRITE, next = 2
    mov dword [DESC + 32], STAT
    mov dword [DESC + 40], 1
    mov word [DESC + 44], 2
    mov edi, %d                           ; requests
    xor ebx, ebx                          ; the available index
.request:
    mov ecx, ebx
    and ecx, 7
    mov word [AVAIL + 4 + ecx * 2], 0
    inc ebx
    mov word [AVAIL + 2], bx
    mov dword [V + 0x050], 0              ; QueueNotify
.wait:
    cmp word [USED + 2], bx
    je .done
    pause
    jmp .wait
.done:
    dec edi
    jnz .request
    mov al, 0
    out 0xf4, al
"""


def build(tmp: Path, requests: int) -> Path:
    src, out = tmp / "guest.asm", tmp / f"guest{requests}.bin"
    src.write_text(GUEST % requests)
    subprocess.run(["nasm", "-f", "bin", "-o", str(out), str(src)], check=True)
    return out


def run(kernel: Path, disk: Path, accel: str, eventfds: bool) -> float:
    spec = VmSpec(kernel, mem=64 << 20, accel=accel, disks=[DiskSpec(disk)], kvm_eventfds=eventfds)
    with Vm(spec) as vm:
        start = time.perf_counter()
        vm.run()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        disk = tmp / "disk.img"
        disk.write_bytes(bytes(1 << 20))
        rows = []
        for label, accel, eventfds, n in (
            ("kvm, ioeventfd + irqfd", "kvm", True, args.requests),
            ("kvm, vCPU exits (--no-eventfds)", "kvm", False, args.requests),
            ("soft", "soft", True, max(1, args.requests // 10)),
        ):
            few, many = build(tmp, 1), build(tmp, n + 1)  # the difference leaves out boot and set-up
            costs = [
                (run(many, disk, accel, eventfds) - run(few, disk, accel, eventfds)) / n for _ in range(args.repeat)
            ]
            rows.append((label, statistics.median(costs) * 1e6))
    print("| | µs per 4 KiB read |\n|---|---|")
    for label, us in rows:
        print(f"| {label} | {us:.1f} |")


if __name__ == "__main__":
    main()
