"""The builder's part in virtio: where devices go (MMIO windows, IRQs, the kernel command line), what it refuses,
and a VM on the software backend whose guest finds the device's registers where the command line says."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from popek.devices.virtio.blk import DiskSpec
from popek.devices.virtio.mmio import MmioTransport
from popek.devices.virtio.vsock import VsockSpec
from popek.errors import ConfigError
from popek.vm import VIRTIO_IRQS, VIRTIO_MMIO_BASE, Vm, VmSpec, extend_cmdline

LOAD = 0x100000
# 32-bit code: read MagicValue of the first virtio-mmio window; debug-exit 0x10 if it is "virt", else 0x11
PROBE = bytes.fromhex("a1000000d0" "3d76697274" "7504" "b010" "e6f4" "b011" "e6f4")  # fmt: skip


def multiboot_kernel(tmp: Path) -> Path:
    flags = 0x00010000  # a.out kludge: load the file at LOAD
    header = struct.pack("<8I", 0x1BADB002, flags, -(0x1BADB002 + flags) & 0xFFFFFFFF, LOAD, LOAD, 0, 0, LOAD + 32)
    path = tmp / "probe.elf"
    path.write_bytes(header + PROBE)
    return path


def disk(tmp: Path, name: str, sectors: int = 8) -> DiskSpec:
    path = tmp / name
    path.write_bytes(bytes(512 * sectors))
    return DiskSpec(path)


def test_kernel_parameters_go_before_the_init_arguments() -> None:
    assert extend_cmdline("console=ttyS0", []) == "console=ttyS0"
    assert extend_cmdline("console=ttyS0", ["a=1", "b=2"]) == b"console=ttyS0 a=1 b=2"
    assert extend_cmdline(b"ro -- init args", ["a=1"]) == b"ro a=1 -- init args"
    assert extend_cmdline("", ["a=1"]) == b"a=1"


def test_lockstep_and_too_many_devices_are_refused(tmp_path: Path) -> None:
    kernel = multiboot_kernel(tmp_path)
    with pytest.raises(ConfigError, match="lockstep"):
        VmSpec(kernel, accel="lockstep", rng=True).validate()
    many = [disk(tmp_path, f"d{i}.img") for i in range(len(VIRTIO_IRQS))]
    with pytest.raises(ConfigError, match=f"at most {len(VIRTIO_IRQS)} virtio devices"):
        VmSpec(kernel, accel="soft", disks=many, rng=True).validate()


def test_the_same_image_twice_is_refused(tmp_path: Path) -> None:
    image = disk(tmp_path, "a.img")
    with pytest.raises(ConfigError, match="given twice"):
        Vm(VmSpec(multiboot_kernel(tmp_path), accel="soft", disks=[image, DiskSpec(tmp_path / "." / "a.img")]))


def test_devices_get_windows_irqs_and_kernel_parameters_and_the_guest_finds_them(tmp_path: Path) -> None:
    spec = VmSpec(multiboot_kernel(tmp_path), accel="soft", disks=[disk(tmp_path, "a.img"), disk(tmp_path, "b.img")],
                  rng=True, console2=tmp_path / "hvc.out", timeout=30)  # fmt: skip
    with Vm(spec) as vm:
        assert [(s.base, s.irq) for s in vm.virtio] == [
            (VIRTIO_MMIO_BASE + 0x1000 * i, irq) for i, irq in enumerate(VIRTIO_IRQS[:4])
        ]
        names = [vm.mmio.name_of(s.base) for s in vm.virtio]
        assert names == ["virtio-blk vda", "virtio-blk vdb", "virtio-rng", "virtio-console hvc0"]
        windows = [vm.mmio.find(s.base + 0xFFF) for s in vm.virtio]
        assert all(w is not None and isinstance(w.device, MmioTransport) for w in windows)
        for s in vm.virtio:
            assert f"virtio_mmio.device=4K@{s.base:#x}:{s.irq}".encode() in vm.boot.cmdline
        stop = vm.run()
        assert stop.status == 0x21, stop  # the guest read MagicValue "virt" at 0xD0000000
        stats = vm.stats()
        vm.virtio[0].transport.device.bytes_read += 512  # as a served request counts them
        vm.virtio[1].transport.device.bytes_written += 4096
        io = vm.io_counters()
    assert "virtio-blk vda @0xd0000000 irq 5: status=0x0" in stats
    # summed over both disks; every kind is there, 0 for the ones this VM has no device of
    assert io == {"disk_read_bytes": 512, "disk_written_bytes": 4096, "net_tx_bytes": 0, "net_rx_bytes": 0,
                  "vsock_to_guest_bytes": 0, "vsock_to_host_bytes": 0}  # fmt: skip
    assert (tmp_path / "hvc.out").exists()


def test_a_vsock_device_comes_after_the_others_and_its_socket_lives_as_long_as_the_vm(tmp_path: Path) -> None:
    socket_path = tmp_path / "v.sock"
    spec = VmSpec(multiboot_kernel(tmp_path), accel="soft", rng=True, vsock=VsockSpec(3, socket_path), timeout=30)
    assert spec.virtio_devices == 2
    with Vm(spec) as vm:
        assert [vm.mmio.name_of(s.base) for s in vm.virtio] == ["virtio-rng", "virtio-vsock"]
        assert socket_path.is_socket()
        assert vm.run().status == 0x21
        assert "virtio-vsock @0xd0001000 irq 6: " in vm.stats() and "connections=0" in vm.stats()
    assert not socket_path.exists()
    with pytest.raises(ConfigError, match="reserved"):
        VmSpec(multiboot_kernel(tmp_path), accel="soft", vsock=VsockSpec(2, socket_path)).validate()
