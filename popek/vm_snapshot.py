"""What a VM snapshot's state file holds beside memory (docs/snapshot-format.md, docs/snapshot-state.md): the
`VmSpec` the VM was built from, the backend's state and every device's, under one versioned dict.

    {"machine": {"backend": "kvm"}, "spec": {...}, "accel": {...}, "devices": {...}}

The spec comes first on restore: it says how to rebuild the same machine (memory size, vCPUs, backend, which
devices at which addresses), into which the backend's and the devices' states then go. The kernel, initrd and
command line are kept for the record only: they are in guest memory already, and a restore loads nothing. Host
resources a snapshot cannot carry are named by the spec and opened again on restore: disk images (by path, as
Firecracker does: the caller keeps them), the vsock socket and the network back end; `Vm.restore` lets its caller
change those (a clone needs its own vsock socket) before the machine is built.

Every field is checked (`spec_from_state`): a snapshot is hostile input (popek.snapshot), so a wrong type, an
unknown backend or an absurd size is one SnapshotError naming the field, and the spec then goes through
`VmSpec.validate` like one from the command line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from popek.devices import state as st
from popek.devices.virtio.blk import DiskSpec
from popek.devices.virtio.net import NetSpec
from popek.devices.virtio.vsock import VsockSpec
from popek.errors import ConfigError
from popek.snapshot import SnapshotError

MAX_PATH = 4096  # PATH_MAX
MAX_CMDLINE = 1 << 16
MAX_DISKS = 16
MAX_PORTS = 256


def _path(value: object) -> str:
    text = st.text(MAX_PATH)(value)
    if not isinstance(text, str) or "\0" in text or not text:
        raise ValueError("is not a path")
    return text


def _cmdline(value: object) -> str | bytes:
    if isinstance(value, str | bytes) and len(value) <= MAX_CMDLINE:
        return value
    raise ValueError(f"is not a command line of at most {MAX_CMDLINE} bytes")


def _timeout(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e9:
        raise ValueError("is not a timeout in seconds")
    return float(value)


def _port_pair(value: object) -> tuple[int, int]:
    pair = st.list_of(st.integer(1, 65535), length=2)(value)
    return pair[0], pair[1]


def _disk(value: object) -> DiskSpec:
    fields = st.load(value, {"path": _path, "read_only": st.boolean, "serial": st.text(64)}, "disk")
    return DiskSpec(Path(fields["path"]), fields["read_only"], fields["serial"])


def _net(value: object) -> NetSpec | None:
    if value is None:
        return None
    fields = st.load(value, {
        "backend": st.one_of("passt", "tap"), "tap": st.optional(st.text(15)), "mac": st.raw(6),
        "ports": st.list_of(_port_pair, max_length=MAX_PORTS), "ip": st.optional(st.text(64)),
        "gateway": st.optional(st.text(64)),
    }, "net")  # fmt: skip
    fields["ports"] = tuple(fields["ports"])
    return NetSpec(**fields)


def _vsock(value: object) -> VsockSpec | None:
    if value is None:
        return None
    fields = st.load(value, {"cid": st.uint(32), "uds_path": _path}, "vsock")
    return VsockSpec(fields["cid"], Path(fields["uds_path"]))


def _text(value: object) -> str:
    return os.fspath(value) if isinstance(value, str | os.PathLike) else str(value)


def spec_state(spec: Any) -> dict[str, Any]:
    """A `popek.vm.VmSpec` as JSON-able fields (bytes stay bytes: popek.snapshot encodes them)."""
    net: NetSpec | None = spec.net
    vsock: VsockSpec | None = spec.vsock
    return {
        "kernel": _text(spec.kernel), "initrd": None if spec.initrd is None else _text(spec.initrd),
        "cmdline": spec.cmdline, "mem": spec.mem, "cpus": spec.cpus, "accel": spec.accel,
        "cpu_template": spec.cpu_template, "timeout": spec.timeout, "debug_exit": spec.debug_exit,
        "kvm_device": spec.kvm_device, "acpi": spec.acpi, "pc_testdev": spec.pc_testdev,
        "disks": [{"path": _text(d.path), "read_only": d.read_only, "serial": d.serial} for d in spec.disks],
        "rng": spec.rng, "console2": None if spec.console2 is None else _text(spec.console2),
        "vsock": None if vsock is None else {"cid": vsock.cid, "uds_path": _text(vsock.uds_path)},
        "kvm_eventfds": spec.kvm_eventfds,
        "net": None if net is None else {
            "backend": net.backend, "tap": net.tap, "mac": bytes(net.mac), "ports": [list(p) for p in net.ports],
            "ip": net.ip, "gateway": net.gateway,
        },
    }  # fmt: skip


def spec_from_state(state: object) -> Any:
    """The inverse of `spec_state`, every field checked, then `VmSpec.validate`d: SnapshotError names the first
    thing wrong."""
    from popek.vm import ACCELS, MAX_MEM, VmSpec

    fields = st.load(state, {
        "kernel": _path, "initrd": st.optional(_path), "cmdline": _cmdline, "mem": st.integer(1 << 20, MAX_MEM),
        "cpus": st.integer(1, 1024), "accel": st.one_of(*ACCELS), "cpu_template": st.text(64),
        "timeout": _timeout, "debug_exit": st.boolean, "kvm_device": _path, "acpi": st.boolean,
        "pc_testdev": st.boolean, "disks": st.list_of(_disk, max_length=MAX_DISKS), "rng": st.boolean,
        "console2": st.optional(_path), "vsock": _vsock, "kvm_eventfds": st.boolean, "net": _net,
    }, "VM spec")  # fmt: skip
    for name in ("initrd", "console2"):
        if fields[name] is not None:
            fields[name] = Path(fields[name])
    spec = VmSpec(**fields)
    try:
        spec.validate()
    except ConfigError as e:
        raise SnapshotError(f"the snapshot's VM spec: {e}") from None
    return spec


def parse_state(state: object) -> dict[str, Any]:
    """The top level of a snapshot's state: the machine's record, spec, backend and device states."""
    fields = st.load(state, {
        "machine": st.anything, "spec": st.anything, "accel": st.anything, "devices": st.anything,
    }, "snapshot state")  # fmt: skip
    fields["machine"] = st.load(fields["machine"], {"backend": st.text(32)}, "snapshot machine")
    return fields
