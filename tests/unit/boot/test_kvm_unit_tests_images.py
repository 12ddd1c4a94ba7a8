"""The kvm-unit-tests images load as QEMU's -kernel loads them: Multiboot, argv[0] first on the command line, the
environment file as module 0, every PT_LOAD segment at its physical address (realmode.flat below 1 MiB)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from popek.boot import load_kernel, multiboot
from popek.boot.loader import BootFiles
from popek.memory import GuestMemory
from tests.kvm_unit_tests import IMAGES

FLATS = sorted(IMAGES.glob("*.flat"))
MEM = 256 << 20
PT_LOAD = 1


def load_segments_of(data: bytes) -> list[tuple[int, int, int, int]]:
    """(offset, paddr, filesz, memsz) of each PT_LOAD, read here from the ELF32 header on its own."""
    assert data[:5] == b"\x7fELF\x01", "kvm-unit-tests' x86 .flat images are ELF32"
    (phoff,) = struct.unpack_from("<I", data, 28)
    phentsize, phnum = struct.unpack_from("<HH", data, 42)
    out = []
    for i in range(phnum):
        p_type, offset, _vaddr, paddr, filesz, memsz = struct.unpack_from("<IIIIII", data, phoff + i * phentsize)
        if p_type == PT_LOAD and memsz:
            out.append((offset, paddr, filesz, memsz))
    return out


@pytest.mark.skipif(not FLATS, reason="the kvm-unit-tests images are not built on this machine")
@pytest.mark.parametrize("image", FLATS, ids=[p.name for p in FLATS])
def test_kvm_unit_tests_image_loads_as_qemu_loads_it(image: Path) -> None:
    data = image.read_bytes()
    name = f"x86/{image.name}"
    with GuestMemory(MEM) as mem:
        boot = load_kernel(mem, data, "test_args", b"TESTNAME=x\n", BootFiles(name, "env"))
        assert boot.format == "Multiboot"
        info = boot.entry.regs["rbx"]
        cmdline = mem.read_cstring(mem.read_u32(info + 16))
        assert cmdline.split() == [name.encode(), b"test_args"]  # the suite takes the first word as argv[0]
        assert mem.read_u32(info) & multiboot.INFO_MODS and mem.read_u32(info + 20) == 1
        start, end = struct.unpack("<II", mem.read(mem.read_u32(info + 24), 8))
        assert mem.read(start, end - start) == b"TESTNAME=x\n"
        assert boot.entry.rip == struct.unpack_from("<I", data, 24)[0]
        for offset, paddr, filesz, memsz in load_segments_of(data):
            assert mem.read(paddr, filesz) == data[offset : offset + filesz]
            tail = min(memsz - filesz, 4096)
            assert mem.read(paddr + memsz - tail, tail) == bytes(tail)  # the end of the bss is zeroed
