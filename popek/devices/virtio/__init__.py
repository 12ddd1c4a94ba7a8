"""virtio devices (OASIS virtio 1.2), in three layers as Firecracker splits them:

- `queue.py`: split virtqueues (§2.7), the device side: chain walking with every guest value checked, the used
  ring, notification suppression and event indices;
- `device.py`: what a device type is (features, queues, configuration space, activate/reset, `process_queue`),
  independent of how it is reached;
- `mmio.py`: the virtio-mmio transport (§4.2), the register block a driver programs, with the status state
  machine, feature negotiation and interrupt status;
- device types: `blk.py` (§5.2), `rng.py` (§5.4), `console.py` (§5.3), `net.py` (§5.1; its host sides in
  `popek.devices.passt` and `popek.devices.tap`).

The builder (`popek.vm`) places each transport in the 32-bit MMIO hole with an ISA IRQ, announces it on the kernel
command line (`virtio_mmio.device=4K@ADDR:IRQ`), and lets the backend wire the fast path: on KVM each QueueNotify
is an ioeventfd and each interrupt an irqfd, served by the device event loop (`popek.devices.event_loop`); on the
software backend, notifications are handled synchronously in the run loop, keeping runs deterministic.
"""
