"""A bare-metal virtio-blk driver (a 32-bit Multiboot guest, flat protected mode) against popek's virtio-mmio
device, on KVM with the ioeventfd/irqfd fast path, on KVM through vCPU exits (--no-eventfds), and on the
software CPU. It initializes the device by §3.1.1, reads and writes sectors, asks for a sector past the end, then
writes garbage into the live queue (a descriptor that chains to itself): the device must answer with
DEVICE_NEEDS_RESET, the VM must go on, and a reset must bring the device back."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .guests import KVM_MARKS, PRINT32, nasm, popek

pytestmark = pytest.mark.skipif(shutil.which("nasm") is None, reason="needs nasm to build the guests")

SECTORS = 16

VIRTIO_BLK_DRIVER = """
bits 32
org 0x100000
header:
    dd 0x1BADB002, 0x00010002, -(0x1BADB002 + 0x00010002)
    dd header, header, 0, bss_end, entry

V     equ 0xD0000000                      ; the first virtio-mmio window popek places
DESC  equ 0x200000                        ; queue 0, 8 entries
AVAIL equ 0x201000
USED  equ 0x202000
HDR   equ 0x203000                        ; request header: type, reserved, sector
DATA  equ 0x204000                        ; 512 bytes
STAT  equ 0x205000                        ; the status byte

%macro SAY 1
    jmp %%go
%%s: db %1, 10, 0
%%go:
    mov esi, %%s
    call print32
%endmacro

entry:
    mov esp, 0x90000
    cmp dword [V + 0x000], 0x74726976     ; MagicValue
    jne fail
    cmp dword [V + 0x004], 2              ; Version: modern only
    jne fail
    cmp dword [V + 0x008], 2              ; DeviceID: block
    jne fail
    mov dword [V + 0x070], 0              ; reset
    mov dword [V + 0x070], 1              ; ACKNOWLEDGE
    mov dword [V + 0x070], 3              ; DRIVER
    mov dword [V + 0x024], 0              ; DriverFeaturesSel 0: none of the low features
    mov dword [V + 0x020], 0
    mov dword [V + 0x024], 1              ; DriverFeaturesSel 1: VIRTIO_F_VERSION_1
    mov dword [V + 0x020], 1
    mov dword [V + 0x070], 0xb            ; FEATURES_OK
    test dword [V + 0x070], 8
    jz fail
    mov dword [V + 0x030], 0              ; QueueSel 0
    mov dword [V + 0x038], 8              ; QueueNum
    mov dword [V + 0x080], DESC
    mov dword [V + 0x084], 0
    mov dword [V + 0x090], AVAIL
    mov dword [V + 0x094], 0
    mov dword [V + 0x0a0], USED
    mov dword [V + 0x0a4], 0
    mov dword [V + 0x044], 1              ; QueueReady
    mov dword [V + 0x070], 0xf            ; DRIVER_OK
    SAY "virtio: driver ok"

    ; descriptors 0 -> 1 -> 2: header (readable), data (writable for a read), status (writable)
    mov dword [DESC + 0], HDR
    mov dword [DESC + 8], 16
    mov word [DESC + 12], 1               ; NEXT
    mov word [DESC + 14], 1
    mov dword [DESC + 16], DATA
    mov dword [DESC + 24], 512
    mov word [DESC + 28], 3               ; NEXT | WRITE
    mov word [DESC + 30], 2
    mov dword [DESC + 32], STAT
    mov dword [DESC + 40], 1
    mov word [DESC + 44], 2               ; WRITE

    mov dword [HDR], 0                    ; VIRTIO_BLK_T_IN, sector 0
    mov dword [HDR + 8], 0
    call submit
    cmp byte [STAT], 0
    jne fail
    cmp dword [DATA], "POPK"              ; the host wrote this at the start of the image
    jne fail
    SAY "virtio: read ok"

    mov dword [DATA], "GUES"              ; VIRTIO_BLK_T_OUT of sector 1
    mov dword [DATA + 4], "T-WR"
    mov word [DESC + 28], 1               ; the data is device-readable now
    mov dword [HDR], 1
    mov dword [HDR + 8], 1
    call submit
    cmp byte [STAT], 0
    jne fail
    SAY "virtio: write ok"

    mov word [DESC + 28], 3
    mov dword [HDR], 0                    ; a read of the sector just past `capacity`
    mov eax, [V + 0x100]                  ; capacity, low word
    mov [HDR + 8], eax
    call submit
    cmp byte [STAT], 1                    ; VIRTIO_BLK_S_IOERR
    jne fail
    SAY "virtio: past the end: ioerr"

    ; garbage in the live queue: descriptor 5 chains to itself
    mov dword [DESC + 80], DATA
    mov dword [DESC + 88], 8
    mov word [DESC + 92], 1
    mov word [DESC + 94], 5
    movzx eax, word [AVAIL + 2]
    mov ecx, eax
    and ecx, 7
    mov word [AVAIL + 4 + ecx * 2], 5
    inc eax
    mov word [AVAIL + 2], ax
    mov dword [V + 0x050], 0              ; QueueNotify
    mov ecx, 5000000
.reset_wait:
    test dword [V + 0x070], 0x40          ; DEVICE_NEEDS_RESET
    jnz .broken
    loop .reset_wait
    jmp fail
.broken:
    SAY "virtio: needs reset"
    mov dword [V + 0x070], 0              ; reset: the device comes back
    cmp dword [V + 0x070], 0
    jne fail
    SAY "virtio: reset ok"
    mov al, 0x10
    out 0xf4, al

submit:                                   ; make descriptor chain 0 available, notify, wait for the used idx
    mov byte [STAT], 0xff
    movzx eax, word [AVAIL + 2]
    mov ecx, eax
    and ecx, 7
    mov word [AVAIL + 4 + ecx * 2], 0
    inc eax
    mov word [AVAIL + 2], ax
    mov ebx, eax
    mov dword [V + 0x050], 0              ; QueueNotify: an ioeventfd on KVM, an exit otherwise
    mov ecx, 5000000
.wait:
    cmp word [USED + 2], bx
    je .done
    pause
    loop .wait
    jmp fail
.done:
    ret

fail:
    SAY "virtio: FAILED"
    mov al, 0x11
    out 0xf4, al
"""


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(("--accel", "kvm"), marks=KVM_MARKS, id="kvm-eventfds"),
        pytest.param(("--accel", "kvm", "--no-eventfds"), marks=KVM_MARKS, id="kvm-exits"),
        pytest.param(("--accel", "soft"), id="soft"),
    ],
)
def test_a_bare_metal_driver_reads_writes_and_survives_garbage_in_the_queue(
    tmp_path: Path, options: tuple[str, ...]
) -> None:
    kernel = nasm(tmp_path, VIRTIO_BLK_DRIVER + PRINT32 + "bss_end:\n", "virtio")
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"POPK".ljust(512, b"\0") + bytes(512 * (SECTORS - 1)))
    r = popek(kernel, options[1], "--disk", str(disk), "--stats", *options[2:])
    lines = r.stdout.splitlines()
    assert lines == [
        "virtio: driver ok",
        "virtio: read ok",
        "virtio: write ok",
        "virtio: past the end: ioerr",
        "virtio: needs reset",
        "virtio: reset ok",
    ], r.stderr
    assert r.returncode == 0x21, r.stderr
    assert disk.read_bytes()[512:520] == b"GUEST-WR"
    assert "loops back to entry 5" in r.stderr  # --stats says why the device needed a reset
    stats = next(line for line in r.stderr.splitlines() if line.startswith("virtio-blk vda"))
    assert "reads=1 writes=1" in stats and "ioerr=1" in stats  # the read past the end is an error
    if "--no-eventfds" in options:
        assert "ioeventfd=off irqfd=off" in r.stderr
    elif "kvm" in options:
        assert "ioeventfd=on" in r.stderr
