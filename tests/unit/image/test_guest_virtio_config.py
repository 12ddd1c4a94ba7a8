"""The default guest's kernel fragment asks for what popek's virtio devices need; the build then fails by name if
Kconfig drops any of them (kconfig.verify, tested in test_build.py)."""

from __future__ import annotations

from popek.image import build, kconfig

VIRTIO_OPTIONS = (
    "CONFIG_VIRTIO",
    "CONFIG_VIRTIO_MMIO",
    "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",  # virtio_mmio.device= on the command line is how popek announces them
    "CONFIG_BLK_DEV",
    "CONFIG_VIRTIO_BLK",
    "CONFIG_EXT4_FS",
    "CONFIG_HW_RANDOM",
    "CONFIG_HW_RANDOM_VIRTIO",
    "CONFIG_VIRTIO_CONSOLE",
    "CONFIG_VIRTIO_NET",
    "CONFIG_INET",
    "CONFIG_UNIX",
    "CONFIG_PACKET",  # busybox udhcpc's raw socket, for the DHCP the init script does on eth0
)


def test_the_fragment_asks_for_every_virtio_driver_popek_offers() -> None:
    fragment = kconfig.parse(build.recipe_fragment().decode())
    assert {option: fragment.get(option) for option in VIRTIO_OPTIONS} == dict.fromkeys(VIRTIO_OPTIONS, "y")
