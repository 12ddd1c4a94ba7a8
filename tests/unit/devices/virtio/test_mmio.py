"""The virtio-mmio transport (virtio 1.2 §4.2): registers, the §3.1.1 initialization sequence, feature
negotiation, queue set-up, reset, interrupts and their acknowledgement, configuration generation, and
DEVICE_NEEDS_RESET, driven through the register block as a guest driver would."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import ClassVar

import pytest

from popek.devices.virtio import mmio
from popek.devices.virtio.device import (
    COMMON_FEATURES,
    INT_CONFIG,
    INT_VRING,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    DeviceId,
    DeviceStatus,
    VirtioDevice,
)
from popek.devices.virtio.mmio import MmioTransport
from popek.devices.virtio.queue import DescriptorChain
from popek.devices.virtio.rng import EntropyDevice

from .driver import MEM_SIZE, Driver, Irq, RecordingMemory

S = DeviceStatus


class EchoDevice(VirtioDevice):
    """A test device: two queues; a chain's readable bytes are copied into its writable ones."""

    device_id: ClassVar[DeviceId] = DeviceId.CONSOLE
    FEATURE = 1 << 3

    def __init__(self) -> None:
        super().__init__("echo", [16, 8])
        self.config = bytearray(b"\x01\x02\x03\x04\x05\x06\x07\x08")
        self.activations = 0
        self.resets = 0

    def device_features(self) -> int:
        return COMMON_FEATURES | self.FEATURE

    def config_bytes(self) -> bytes:
        return bytes(self.config)

    def on_activate(self) -> None:
        self.activations += 1

    def on_reset(self) -> None:
        self.resets += 1

    def process_queue(self, index: int) -> None:
        self.serve(index, self._echo)

    def _echo(self, chain: DescriptorChain) -> int:
        from popek.devices.virtio.queue import ChainReader, ChainWriter

        assert self.mem is not None
        data = ChainReader(self.mem, chain.readable).read(1 << 16)
        return ChainWriter(self.mem, chain.writable).write(data)


@pytest.fixture
def setup() -> Iterator[tuple[Driver, EchoDevice, Irq, RecordingMemory]]:
    mem = RecordingMemory(MEM_SIZE)
    device, irq = EchoDevice(), Irq()
    transport = MmioTransport(device, mem, irq)
    yield Driver(transport, mem), device, irq, mem
    mem.close()


def test_identification_registers(setup: tuple[Driver, EchoDevice, Irq, RecordingMemory]) -> None:
    drv, _dev, _irq, _mem = setup
    assert drv.reg(mmio.MAGIC) == 0x74726976
    assert drv.reg(mmio.VERSION_REG) == 2
    assert drv.reg(mmio.DEVICE_ID) == DeviceId.CONSOLE
    assert drv.reg(mmio.VENDOR) == int.from_bytes(b"popk", "little")
    assert drv.device_features() == COMMON_FEATURES | EchoDevice.FEATURE
    drv.set(mmio.DEVICE_FEATURES_SEL, 2)
    assert drv.reg(mmio.DEVICE_FEATURES) == 0
    assert drv.reg(mmio.SHM_LEN_LOW) == drv.reg(mmio.SHM_BASE_HIGH) == 0xFFFFFFFF  # no shared memory


def test_init_sequence_activates_the_device_with_the_negotiated_features(
    setup: tuple[Driver, EchoDevice, Irq, RecordingMemory],
) -> None:
    drv, dev, _irq, _mem = setup
    features = drv.init(features=VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX)
    assert drv.status == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK
    assert dev.active and dev.activations == 1 and dev.acked_features == features
    assert [q.event_idx for q in dev.queues] == [True, True] and not dev.queues[0].indirect
    drv.set(mmio.QUEUE_SEL, 0)
    assert drv.reg(mmio.QUEUE_NUM_MAX) == 16 and drv.reg(mmio.QUEUE_READY) == 1
    drv.set(mmio.QUEUE_SEL, 2)
    assert drv.reg(mmio.QUEUE_NUM_MAX) == 0  # no such queue: Linux stops looking


@pytest.mark.parametrize(
    ("features", "why"),
    [(COMMON_FEATURES & ~VIRTIO_F_VERSION_1, "legacy driver"), (COMMON_FEATURES | 1 << 40, "feature not offered")],
)
def test_features_ok_is_refused_for_a_legacy_driver_or_unoffered_features(
    setup: tuple[Driver, EchoDevice, Irq, RecordingMemory], features: int, why: str
) -> None:
    drv, dev, _irq, _mem = setup
    drv.add_status(S.ACKNOWLEDGE)
    drv.add_status(S.DRIVER)
    drv.write_features(features)
    drv.add_status(S.FEATURES_OK)
    assert not drv.status & S.FEATURES_OK, why
    drv.add_status(S.DRIVER_OK)
    assert not drv.status & S.DRIVER_OK and not dev.active


def test_status_steps_cannot_be_skipped_or_cleared(setup: tuple[Driver, EchoDevice, Irq, RecordingMemory]) -> None:
    drv, dev, _irq, _mem = setup
    drv.set(mmio.STATUS, int(S.DRIVER))  # DRIVER before ACKNOWLEDGE
    assert drv.status == 0
    drv.set(mmio.STATUS, int(S.ACKNOWLEDGE | S.DRIVER | S.DRIVER_OK))  # DRIVER_OK without FEATURES_OK
    assert drv.status == 0
    drv.add_status(S.ACKNOWLEDGE)
    drv.add_status(S.DRIVER)
    drv.set(mmio.STATUS, int(S.ACKNOWLEDGE))  # clearing DRIVER
    assert drv.status == S.ACKNOWLEDGE | S.DRIVER
    drv.set(mmio.STATUS, int(S.ACKNOWLEDGE | S.DRIVER | S.DEVICE_NEEDS_RESET))  # the device's bit, not the driver's
    assert drv.status == S.ACKNOWLEDGE | S.DRIVER
    drv.add_status(S.FAILED)
    assert drv.status & S.FAILED and not dev.active
    assert dev.queues[0].ready is False


def test_feature_and_queue_registers_are_only_taken_in_their_phase(
    setup: tuple[Driver, EchoDevice, Irq, RecordingMemory],
) -> None:
    drv, dev, _irq, _mem = setup
    drv.write_features(COMMON_FEATURES)  # before DRIVER: ignored
    drv.set(mmio.QUEUE_NUM, 4)  # before FEATURES_OK: ignored
    assert dev.queues[0].size == 16
    drv.add_status(S.ACKNOWLEDGE)
    drv.add_status(S.DRIVER)
    drv.write_features(VIRTIO_F_VERSION_1)
    drv.add_status(S.FEATURES_OK)
    drv.write_features(COMMON_FEATURES)  # after FEATURES_OK: ignored
    drv.setup_queue(0)
    drv.set(mmio.QUEUE_NUM, 4)  # while ready: ignored
    assert dev.queues[0].size == 16
    drv.add_status(S.DRIVER_OK)
    assert dev.acked_features == VIRTIO_F_VERSION_1
    drv.set(mmio.QUEUE_SEL, 1)
    drv.set(mmio.QUEUE_READY, 1)  # after DRIVER_OK: ignored
    assert not dev.queues[1].ready
    assert drv.t.bad_accesses >= 4


def test_control_registers_take_only_aligned_32_bit_accesses(
    setup: tuple[Driver, EchoDevice, Irq, RecordingMemory],
) -> None:
    drv, _dev, _irq, _mem = setup
    assert drv.t.read(mmio.MAGIC, 2) == b"\0\0"
    assert drv.t.read(mmio.MAGIC + 1, 4) == bytes(4)
    drv.t.write(mmio.STATUS, b"\x01")
    assert drv.status == 0
    assert drv.t.bad_accesses == 3
    # the configuration space takes any width
    assert drv.t.read(mmio.CONFIG_OFFSET + 1, 2) == b"\x02\x03"
    assert drv.t.read(mmio.CONFIG_OFFSET + 6, 4) == b"\x07\x08\0\0"  # past the end: zeros


def test_requests_complete_with_one_interrupt_per_batch_until_acknowledged(
    setup: tuple[Driver, EchoDevice, Irq, RecordingMemory],
) -> None:
    drv, _dev, irq, mem = setup
    drv.init(features=VIRTIO_F_VERSION_1)
    heads = [drv.submit(0, [b"hello %d" % i], [16])[0] for i in range(3)]
    outs = drv.submit(0, [b"indirect!"], [4, 8], indirect=False)[1]
    drv.kick(0)
    used = drv.take_used(0)
    assert [h for h, _ in used][:3] == heads and [n for _, n in used] == [7, 7, 7, 9]
    assert mem.read(outs[0], 4) + mem.read(outs[1], 5) == b"indirect!"
    assert irq.pulses == 1
    assert drv.ack() == INT_VRING
    assert drv.reg(mmio.INTERRUPT_STATUS) == 0
    assert drv.t.notifies[0] == 1


def test_indirect_chains_are_served_when_negotiated(setup: tuple[Driver, EchoDevice, Irq, RecordingMemory]) -> None:
    drv, _dev, _irq, mem = setup
    drv.init()
    head, outs = drv.submit(1, [b"ab", b"cd"], [1, 3], indirect=True)
    drv.kick(1)
    assert drv.take_used(1) == [(head, 4)]
    assert mem.read(outs[0], 1) + mem.read(outs[1], 3) == b"abcd"


def test_event_idx_suppresses_interrupts_the_driver_did_not_ask_for(
    setup: tuple[Driver, EchoDevice, Irq, RecordingMemory],
) -> None:
    drv, dev, irq, mem = setup
    drv.init(features=VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX)
    q = drv.queues[0]
    mem.write_u16(q.avail + 4 + 2 * q.size, 5)  # used_event: interrupt when used idx passes 5
    for _ in range(2):
        drv.submit(0, [b"x"], [1])
        drv.kick(0)
    assert irq.pulses == 0 and dev.queues[0].suppressed == 2
    assert mem.read_u16(q.used + 4 + 8 * q.size) == 2  # avail_event: notify me at the next entry
    for _ in range(4):
        drv.submit(0, [b"x"], [1])
    drv.kick(0)
    assert irq.pulses == 1


def test_a_notification_before_driver_ok_is_served_at_activation(
    setup: tuple[Driver, EchoDevice, Irq, RecordingMemory],
) -> None:
    drv, _dev, _irq, _mem = setup
    drv.add_status(S.ACKNOWLEDGE)
    drv.add_status(S.DRIVER)
    drv.write_features(VIRTIO_F_VERSION_1)
    drv.add_status(S.FEATURES_OK)
    drv.setup_queue(0)
    head = drv.submit(0, [b"early"], [8])[0]
    drv.kick(0)
    assert drv.take_used(0) == [] and drv.t.ignored_notifies == 1
    drv.add_status(S.DRIVER_OK)
    assert drv.take_used(0) == [(head, 5)]


def test_reset_clears_status_interrupts_queues_and_features(
    setup: tuple[Driver, EchoDevice, Irq, RecordingMemory],
) -> None:
    drv, dev, _irq, _mem = setup
    drv.init()
    drv.submit(0, [b"x"], [1])
    drv.kick(0)
    assert drv.reg(mmio.INTERRUPT_STATUS) == INT_VRING
    generation, resets = drv.reg(mmio.CONFIG_GENERATION), dev.resets
    drv.set(mmio.STATUS, 0)
    assert drv.status == 0 and drv.reg(mmio.INTERRUPT_STATUS) == 0
    assert not dev.active and dev.resets == resets + 1 and dev.acked_features == 0
    assert all(not q.ready and q.next_avail == 0 and q.desc_table == 0 for q in dev.queues)
    drv.set(mmio.QUEUE_SEL, 0)
    assert drv.reg(mmio.QUEUE_READY) == 0
    assert drv.reg(mmio.CONFIG_GENERATION) == generation
    drv.init()  # and it comes up again
    assert dev.active and dev.activations == 2


def test_a_config_change_bumps_the_generation_and_interrupts_once_active(
    setup: tuple[Driver, EchoDevice, Irq, RecordingMemory],
) -> None:
    drv, dev, irq, _mem = setup
    before = drv.reg(mmio.CONFIG_GENERATION)
    dev.config[0] = 9
    dev.config_changed()
    assert drv.reg(mmio.CONFIG_GENERATION) == before + 1 and irq.pulses == 0  # not yet DRIVER_OK
    drv.init()
    dev.config_changed()
    assert drv.reg(mmio.CONFIG_GENERATION) == before + 2 and irq.pulses == 1
    assert drv.reg(mmio.INTERRUPT_STATUS) == INT_CONFIG
    assert drv.t.read(mmio.CONFIG_OFFSET, 1) == b"\x09"


def test_a_bad_queue_at_driver_ok_sets_needs_reset(setup: tuple[Driver, EchoDevice, Irq, RecordingMemory]) -> None:
    drv, dev, irq, _mem = setup
    drv.add_status(S.ACKNOWLEDGE)
    drv.add_status(S.DRIVER)
    drv.write_features(VIRTIO_F_VERSION_1)
    drv.add_status(S.FEATURES_OK)
    drv.set(mmio.QUEUE_SEL, 0)
    drv.set(mmio.QUEUE_NUM, 16)
    drv.set(mmio.QUEUE_DESC_LOW, 0xFFFF0000)  # not guest RAM
    drv.set(mmio.QUEUE_READY, 1)
    drv.add_status(S.DRIVER_OK)
    assert drv.status & S.DEVICE_NEEDS_RESET and not dev.active
    assert "queue 0" in (drv.t.error or "") and "not in guest RAM" in (drv.t.error or "")
    assert irq.pulses == 1 and drv.reg(mmio.INTERRUPT_STATUS) == INT_CONFIG
    drv.kick(0)
    assert drv.t.ignored_notifies == 1
    drv.init()  # a reset and a fresh set-up bring it back
    assert not drv.status & S.DEVICE_NEEDS_RESET and dev.active and drv.t.error is None


def test_garbage_in_a_live_queue_sets_needs_reset_and_the_device_stops(
    setup: tuple[Driver, EchoDevice, Irq, RecordingMemory],
) -> None:
    drv, dev, _irq, mem = setup
    drv.init()
    q = drv.queues[0]
    good = drv.submit(0, [b"ok"], [2])[0]
    mem.write(q.desc + 16 * 5, struct.pack("<QIHH", 0x2000, 1, 1, 5))  # a descriptor that is its own successor
    drv.publish(0, 5)
    drv.kick(0)
    assert drv.take_used(0) == [(good, 2)]  # the request before the bad one completed
    assert drv.status & S.DEVICE_NEEDS_RESET and "loops" in (drv.t.error or "")
    drv.submit(0, [b"later"], [8])
    drv.kick(0)
    assert drv.take_used(0) == [] and dev.queues[0].chains == 1  # the bad chain was never taken
    assert "NEEDS RESET" in drv.t.stats()


def test_a_device_bug_is_contained_as_needs_reset() -> None:
    class Broken(EchoDevice):
        def process_queue(self, index: int) -> None:
            raise RuntimeError("boom")

    with RecordingMemory(MEM_SIZE) as mem:
        drv = Driver(MmioTransport(Broken(), mem, Irq()), mem)
        drv.init()
        drv.kick(0)
        assert drv.status & S.DEVICE_NEEDS_RESET and drv.t.error == "device error: RuntimeError: boom"


def test_transport_state_round_trips_through_a_fresh_transport() -> None:
    with RecordingMemory(MEM_SIZE) as mem:
        drv = Driver(MmioTransport(EntropyDevice(), mem, Irq()), mem)
        drv.init()
        drv.submit(0, [], [32])
        drv.kick(0)
        saved = drv.t.state()
        other = MmioTransport(EntropyDevice(), mem, Irq())
        other.restore(saved)
        assert other.state() == saved
        assert other.device.active and other.device.queues[0].next_used == 1
