"""The builder's part in virtio-net: `VmSpec.net` adds a device named eth0 with its window, IRQ and kernel
parameter (and popek.ip= for a static address), counts against the virtio limit, and the VM owns the passt it
started: closing the VM ends and reaps it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from popek.devices.virtio.net import NetDevice, NetSpec, PasstHost
from popek.errors import ConfigError
from popek.vm import VIRTIO_IRQS, Vm, VmSpec

from .test_vm_virtio import disk, multiboot_kernel


def test_a_network_device_counts_against_the_virtio_limit(tmp_path: Path) -> None:
    many = [disk(tmp_path, f"d{i}.img") for i in range(len(VIRTIO_IRQS) - 1)]
    spec = VmSpec(multiboot_kernel(tmp_path), accel="soft", disks=many, rng=True, net=NetSpec.parse("passt"))
    assert spec.virtio_devices == len(VIRTIO_IRQS) + 1
    with pytest.raises(ConfigError, match="at most"):
        spec.validate()


def test_a_bad_net_spec_built_by_hand_is_refused(tmp_path: Path) -> None:
    spec = VmSpec(multiboot_kernel(tmp_path), accel="soft", net=NetSpec("tap", "t0", ports=((80, 80),)))
    with pytest.raises(ConfigError, match="--port forwards through passt"):
        spec.validate()


@pytest.mark.skipif(shutil.which("passt") is None, reason="passt is not installed (apt-get install passt)")
def test_the_vm_attaches_eth0_on_passt_and_reaps_passt_at_close(tmp_path: Path) -> None:
    net = NetSpec.parse("passt,mac=52:54:00:12:34:56,ip=10.0.2.15/24,gw=10.0.2.2")
    with Vm(VmSpec(multiboot_kernel(tmp_path), accel="soft", rng=True, net=net, timeout=30)) as vm:
        slot = vm.virtio[-1]
        device = slot.transport.device
        assert isinstance(device, NetDevice) and vm.mmio.name_of(slot.base) == "virtio-net eth0"
        assert (slot.base, slot.irq) == (vm.virtio[0].base + 0x1000, VIRTIO_IRQS[1])
        assert f"virtio_mmio.device=4K@{slot.base:#x}:{slot.irq}".encode() in vm.boot.cmdline
        assert b"popek.ip=10.0.2.15/24,10.0.2.2" in vm.boot.cmdline
        assert device.config_bytes()[:6] == bytes.fromhex("525400123456")
        assert isinstance(device.host, PasstHost)
        process = device.host.process.process
        assert process is not None and process.poll() is None
        vm.run()
        assert "virtio-net eth0" in vm.stats()
    assert process.returncode is not None
