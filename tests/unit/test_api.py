"""popek.VM without a Linux guest: its arguments are checked before anything is built, its errors are what they
say, and its life cycle (boot in a thread, stop, close, a forgotten VM) is proved with boot-sector guests on
popek's software CPU, which need no /dev/kvm and no agent."""

from __future__ import annotations

import gc
import math
import threading
import time
from pathlib import Path

import pytest

import popek
from popek.accel.exits import Stop, StopReason
from popek.agent import AgentUnavailable
from popek.api import VM, BootTimeout, VMError, VMStopped
from popek.devices.virtio.blk import DiskSpec
from popek.devices.virtio.vsock import VsockSpec
from popek.errors import ConfigError, PopekError

SERIAL = 0x3F8
DEBUG_EXIT = 0xF4


def boot_sector(message: bytes, exit_value: int | None = None) -> bytes:
    """Real-mode code at 0x7c00: print message on COM1, then write exit_value to the debug-exit port (or spin)."""
    code = bytearray()
    code += b"\xba" + SERIAL.to_bytes(2, "little")  # mov dx, 0x3f8
    msg_at = len(code)
    code += b"\xbe\x00\x00"  # mov si, message (patched below)
    loop = len(code)
    code += b"\xac"  # lodsb
    code += b"\x84\xc0"  # test al, al
    code += b"\x74\x03"  # jz +3 (past out and jmp)
    code += b"\xee"  # out dx, al
    code += bytes([0xEB, (loop - (len(code) + 2)) & 0xFF])  # jmp loop
    if exit_value is not None:
        code += bytes([0xB0, exit_value, 0xE6, DEBUG_EXIT])  # mov al, value; out 0xf4, al
    code += b"\xeb\xfe"  # jmp $
    code[msg_at + 1 : msg_at + 3] = (0x7C00 + len(code)).to_bytes(2, "little")
    code += message + b"\0"
    assert len(code) <= 510
    return bytes(code.ljust(510, b"\0")) + b"\x55\xaa"


@pytest.fixture
def spinning(tmp_path: Path) -> Path:
    path = tmp_path / "spin.bin"
    path.write_bytes(boot_sector(b"popek-api-no-agent\r\n"))
    return path


@pytest.fixture
def exiting(tmp_path: Path) -> Path:
    path = tmp_path / "exit.bin"
    path.write_bytes(boot_sector(b"popek-api-going-down\r\n", exit_value=3))
    return path


def vm_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "popek-vm" and t.is_alive()]


# --- arguments


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mem": "12X"},
        {"mem": 4096},  # bytes: less than the 1 MiB minimum
        {"mem": 1 << 60},
        {"mem": 1.5},
        {"mem": True},
        {"cpus": 0},
        {"cpus": True},
        {"cpus": "2"},
        {"accel": "lockstep"},
        {"accel": "qemu"},
        {"boot_timeout": 0},
        {"boot_timeout": -1},
        {"boot_timeout": math.nan},
        {"boot_timeout": math.inf},
        {"agent_timeout": 0},
        {"timeout": 0},
        {"agent_port": -1},
        {"agent_port": 1 << 32},
        {"console_tail": -1},
        {"console": "not callable"},
        {"append": b"bytes"},
        {"disks": "data.img"},  # a string, not a list of disks
        {"disks": ["data.img,rw"]},
        {"disks": [42]},
        {"disks": [DiskSpec(Path("x.img"), serial="\n")]},
        {"vsock": "3:/tmp/vm.vsock"},  # a VsockSpec, not the CLI's text
        {"vsock": VsockSpec(2, Path("/tmp/vm.vsock"))},  # CID 2 is the host's
        {"disks": [f"d{i}.img" for i in range(7)]},  # the vsock device takes the seventh free IRQ
        {"net": "slirp"},
        {"net": 42},
        {"ports": ["8080:80"]},  # a forward without a network device
        {"net": "passt", "ports": "8080:80"},  # a string, not a list of forwards
        {"net": "passt", "ports": ["80"]},
        {"net": "passt", "disks": [f"d{i}.img" for i in range(6)]},  # net and vsock take the last two IRQs
        {"virtual_time": True},  # pure virtual time is the soft CPU's: KVM's guest clock is the host's
    ],
)
def test_bad_arguments_are_config_errors_before_anything_boots(kwargs: dict[str, object]) -> None:
    before = vm_threads()
    with pytest.raises(ConfigError):
        VM(**kwargs)  # type: ignore[arg-type]
    assert vm_threads() == before


def test_sizes_read_as_the_cli_reads_them() -> None:
    assert VM(mem="1G").mem == 1 << 30
    assert VM(mem=256 << 20).mem == 256 << 20
    vm = VM(disks=["a.img,ro,serial=abc", Path("b.img"), DiskSpec(Path("c.img"))])
    assert vm.disks == [DiskSpec(Path("a.img"), True, "abc"), DiskSpec(Path("b.img")), DiskSpec(Path("c.img"))]


def test_virtual_time_reaches_the_soft_vms_spec() -> None:
    vm = VM(accel="soft", virtual_time=True)
    spec = vm._spec(Path("k"), None, "", None)
    assert spec.virtual_time and spec.accel == "soft"
    assert not VM(accel="soft")._spec(Path("k"), None, "", None).virtual_time


def test_the_package_exports_the_api() -> None:
    assert popek.VM is VM
    assert popek.VMStopped is VMStopped and popek.BootTimeout is BootTimeout
    assert popek.ConfigError is ConfigError
    with pytest.raises(AttributeError):
        popek.NoSuchThing  # noqa: B018


# --- the error types


def test_vm_errors_are_popek_errors_carrying_the_console_tail() -> None:
    stop = Stop(StopReason.POWEROFF, "the guest powered off")
    stopped = VMStopped("gone", stop, b"tail")
    assert isinstance(stopped, VMError) and isinstance(stopped, PopekError)
    assert stopped.stop is stop and stopped.console_tail == b"tail"
    timeout = BootTimeout("late", b"booting")
    # a caller waiting for an agent catches one type, whichever popek waited for it
    assert isinstance(timeout, AgentUnavailable) and isinstance(timeout, VMError)
    assert timeout.console_tail == b"booting"


# --- a VM not started


def test_calls_before_start_are_vm_errors() -> None:
    vm = VM()
    with pytest.raises(VMError, match="not started"):
        vm.exec(["true"])
    with pytest.raises(VMError, match="not started"):
        _ = vm.files
    assert not vm.running and vm.stop_reason is None and vm.console_tail == b""


def test_closing_a_vm_never_started_twice_is_safe() -> None:
    vm = VM()
    vm.close()
    vm.close()


# --- life cycle, with boot sectors on the software CPU


def test_a_guest_without_an_agent_is_a_boot_timeout_carrying_its_console(spinning: Path) -> None:
    vm = VM(kernel=spinning, accel="soft", mem="16M", boot_timeout=3)
    with pytest.raises(BootTimeout) as caught:
        vm.start()
    assert b"popek-api-no-agent" in caught.value.console_tail
    assert not vm.running  # start() closed what it had started
    assert vm.stop_reason is not None and vm.stop_reason.reason is StopReason.USER_QUIT
    assert vm_threads() == []


def test_a_guest_that_stops_before_its_agent_answers_is_vm_stopped_with_the_reason(exiting: Path) -> None:
    vm = VM(kernel=exiting, accel="soft", mem="16M", boot_timeout=120)
    with pytest.raises(VMStopped) as caught:
        vm.start()
    stop = caught.value.stop
    assert stop is not None and stop.reason is StopReason.DEBUG_EXIT and stop.status == (3 << 1) | 1
    assert b"popek-api-going-down" in caught.value.console_tail
    assert vm_threads() == []


def test_calls_after_the_guest_stopped_are_vm_stopped(exiting: Path) -> None:
    with VM(kernel=exiting, accel="soft", mem="16M").start(wait=False) as vm:
        stop = vm.wait(120)
        assert stop is not None and stop.reason is StopReason.DEBUG_EXIT
        assert not vm.running
        with pytest.raises(VMStopped) as caught:
            vm.exec(["true"])
        assert caught.value.stop is stop
        with pytest.raises(VMStopped):
            vm.files.read("/etc/hostname")
        assert "exits in" in vm.stats()  # kept from before the VM closed


def test_a_running_vm_whose_agent_does_not_answer_raises_agent_unavailable(spinning: Path) -> None:
    with VM(kernel=spinning, accel="soft", mem="16M", agent_timeout=1).start(wait=False) as vm:
        with pytest.raises(AgentUnavailable) as caught:
            vm.exec(["true"])
        assert not isinstance(caught.value, VMStopped)
        assert vm.running


def test_close_stops_the_vm_and_a_second_close_is_safe(spinning: Path) -> None:
    vm = VM(kernel=spinning, accel="soft", mem="16M").start(wait=False)
    assert vm.running and len(vm_threads()) == 1
    deadline = time.monotonic() + 60
    while b"popek-api-no-agent" not in vm.console_tail and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b"popek-api-no-agent" in vm.console_tail
    vm.close()
    assert not vm.running and vm_threads() == []
    assert vm.stop_reason is not None and vm.stop_reason.reason is StopReason.USER_QUIT
    vm.close()
    with pytest.raises(VMError, match="already started"):
        vm.start()


def test_a_forgotten_vm_is_stopped_when_it_is_collected(spinning: Path) -> None:
    vm = VM(kernel=spinning, accel="soft", mem="16M").start(wait=False)
    workdir = vm._runtime.workdir if vm._runtime is not None else None
    assert workdir is not None and workdir.is_dir() and len(vm_threads()) == 1
    del vm
    gc.collect()
    assert vm_threads() == []
    assert not workdir.exists()  # the vsock socket's private directory went with it


def test_a_console_callback_sees_the_output_and_one_that_raises_does_not_stop_the_vm(spinning: Path) -> None:
    seen: list[bytes] = []
    with VM(kernel=spinning, accel="soft", mem="16M", console=seen.append).start(wait=False) as vm:
        deadline = time.monotonic() + 60
        while b"popek-api-no-agent" not in b"".join(seen) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b"popek-api-no-agent" in b"".join(seen)

    def broken(data: bytes) -> None:
        raise RuntimeError("a bug in the caller's callback")

    with VM(kernel=spinning, accel="soft", mem="16M", console=broken).start(wait=False) as vm:
        deadline = time.monotonic() + 60
        while b"popek-api-no-agent" not in vm.console_tail and time.monotonic() < deadline:
            time.sleep(0.05)
        assert vm.running and b"popek-api-no-agent" in vm.console_tail


@pytest.mark.parametrize(
    "kwargs",
    [{"cold": True}, {"disks": ["/tmp/popek-no-disk.img"]}, {"net": "passt"}, {"kernel": "/boot/vmlinuz"},
     {"image": "debian"}],
)  # fmt: skip
def test_only_the_default_guest_with_popeks_own_devices_and_not_cold_can_start_warm(kwargs: dict[str, object]) -> None:
    # decided before any image is looked up: a VM that cannot start warm never builds or finds the default guest
    assert VM(**kwargs)._warm_key() is None  # type: ignore[arg-type]
