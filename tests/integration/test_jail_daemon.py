"""The daemon with one jailed VM ({"jail": true}; ONE default-guest boot for the module, cold: a jailed VM has no
warm snapshot): exec and files work through its vsock socket, its process has no capabilities, no_new_privs and
a seccomp filter, lives in a mount namespace of its own, and sees none of the host's files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from popek import image, jail
from popek.daemon.client import ApiError, Client, RemoteVM

from . import daemons
from .guests import linux_marks

BOOT_TIMEOUT = 1200

pytestmark = [
    *linux_marks(BOOT_TIMEOUT),
    pytest.mark.skipif(not jail.has_sys_admin(), reason="the jail needs root (CAP_SYS_ADMIN)"),
]


@dataclass
class Jailed:
    daemon_pid: int
    client: Client
    vm: RemoteVM
    state: Path


@pytest.fixture(scope="module")
def jailed(guest: image.GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jailed]:
    with daemons.running(tmp_path_factory.mktemp("jaild")) as server:
        vm = server.client.create(name="jailed", mem="256M", jail=True, boot_timeout=BOOT_TIMEOUT)
        try:
            vm.wait_ready(timeout=BOOT_TIMEOUT)
        except ApiError as e:
            tail = vm.console().decode(errors="replace")[-6000:]
            pytest.fail(f"the jailed VM did not boot to its agent: {e}\nconsole:\n{tail}")
        yield Jailed(server.process.pid, server.client, vm, server.state)


def test_exec_and_files_work_in_a_jailed_vm(jailed: Jailed) -> None:
    r = jailed.vm.exec(["sh", "-c", "echo hello from the jail; exit 4"])
    assert (r.stdout, r.exit_code) == (b"hello from the jail\n", 4)
    jailed.vm.files.write("/tmp/blob", b"x" * 100_000)
    assert jailed.vm.files.read("/tmp/blob") == b"x" * 100_000
    assert jailed.vm.info()["state"] == "running"


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_the_vm_process_has_no_capabilities_no_new_privs_seccomp_and_its_own_mount_ns(jailed: Jailed) -> None:
    pid = jailed.vm.info()["pid"]
    assert isinstance(pid, int)
    (inner,) = _children(pid)  # PID 1 of the VM's own PID namespace, which runs the VM
    for process in (pid, inner):
        status = _status(process)
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0 and int(status["CapBnd"], 16) == 0
        assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
        ns = os.readlink(f"/proc/{process}/ns/mnt")
        assert ns != os.readlink(f"/proc/{jailed.daemon_pid}/ns/mnt")
    assert os.readlink(f"/proc/{inner}/ns/pid") != os.readlink(f"/proc/{jailed.daemon_pid}/ns/pid")
    assert os.readlink(f"/proc/{pid}/ns/pid_for_children") == os.readlink(f"/proc/{inner}/ns/pid")
    assert os.readlink(f"/proc/{inner}/ns/net") != os.readlink(f"/proc/{jailed.daemon_pid}/ns/net")
    assert _status(inner)["NSpid"].split()[-1] == "1"
    # its root holds its own directory and /dev, nothing of the host's
    root = sorted(os.listdir(f"/proc/{inner}/root"))
    assert "etc" not in root and "usr" not in root and "dev" in root, root
    assert sorted(os.listdir(f"/proc/{inner}/root/dev")) == ["kvm", "null", "urandom", "zero"]


def test_a_jailed_vm_snapshots_into_its_own_directory_only(jailed: Jailed, tmp_path: Path) -> None:
    own = jailed.state / "vms" / jailed.vm.id / "snap"
    jailed.vm.snapshot(own)
    assert (own / "manifest.json").exists() or any(own.iterdir())
    outside = tmp_path / "snap"
    with pytest.raises(ApiError) as refused:
        jailed.vm.snapshot(outside)
    assert refused.value.status == 409 and not outside.exists()
    r = jailed.vm.exec(["true"])
    assert r.exit_code == 0  # the VM runs on after both


def test_a_jailed_vm_restored_from_a_snapshot_is_confined_and_has_the_snapshots_files(jailed: Jailed) -> None:
    snap = jailed.state / "vms" / jailed.vm.id / "clone-source"
    jailed.vm.files.write("/tmp/before-the-snapshot", b"written in the source\n")
    jailed.vm.snapshot(snap)
    clone = jailed.client.create(name="jailed-clone", snapshot=str(snap), jail=True, boot_timeout=BOOT_TIMEOUT)
    try:
        try:
            clone.wait_ready(timeout=BOOT_TIMEOUT)
        except ApiError as e:
            pytest.fail(f"the jailed clone did not restore: {e}\nconsole:\n{clone.console().decode(errors='replace')}")
        assert clone.files.read("/tmp/before-the-snapshot") == b"written in the source\n"
        assert clone.exec(["sh", "-c", "echo restored; exit 5"]).exit_code == 5
        pid = clone.info()["pid"]
        assert isinstance(pid, int) and pid != jailed.vm.info()["pid"]
        (inner,) = _children(pid)
        status = _status(inner)
        assert int(status["CapEff"], 16) == 0 and status["NoNewPrivs"] == "1" and status["Seccomp"] == "2", status
        assert "etc" not in os.listdir(f"/proc/{inner}/root")
    finally:
        clone.delete()
    assert jailed.vm.exec(["true"]).exit_code == 0  # the source runs on
