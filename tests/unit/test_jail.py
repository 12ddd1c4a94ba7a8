"""popek.jail without entering it: what a JailSpec accepts, the namespaces it asks for, the seccomp filter it
builds (read back as libseccomp's own PFC text), and the one-line errors of `popek run --jail` and the daemon."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from popek import jail
from popek.daemon.models import VmCreate
from popek.devices.virtio.blk import DiskSpec
from popek.devices.virtio.net import net_spec


def _pfc(tap: bool = False) -> str:
    with tempfile.TemporaryFile() as out:
        jail.build_filter(tap).export_pfc(out)
        out.seek(0)
        return out.read().decode()


def _rules(pfc: str, name: str) -> str:
    """The PFC lines of one syscall's rule (from its 'if ($syscall == N)' to the next syscall's)."""
    import pyseccomp

    number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    lines = pfc.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == f"if ($syscall == {number})"), None)
    if start is None:
        return ""
    rest = lines[start + 1 :]
    end = next((i for i, line in enumerate(rest) if "$syscall ==" in line or "default action" in line), len(rest))
    return "\n".join(rest[:end])


def test_vm_spec_binds_the_workdir_writable_the_kernel_read_only_and_disks_as_used(tmp_path: Path) -> None:
    kernel, ro, rw = tmp_path / "k", tmp_path / "ro.img", tmp_path / "rw.img"
    for path in (kernel, ro, rw):
        path.write_bytes(b"x")
    spec = jail.JailSpec.for_vm(workdir=tmp_path, kernel=kernel, initrd=None, disks=[(ro, False), (rw, True)])
    assert {(b.path, b.writable) for b in spec.binds} == {(tmp_path, True), (kernel, False), (ro, False), (rw, True)}
    spec.validate()


def test_a_vm_without_tap_gets_its_own_network_namespace_and_no_tun() -> None:
    plain, tap = jail.JailSpec(), jail.JailSpec(tap=True)
    assert plain.namespaces & jail.CLONE_NEWNET and not tap.namespaces & jail.CLONE_NEWNET
    for spec in (plain, tap):
        assert spec.namespaces & jail.CLONE_NEWNS and spec.namespaces & jail.CLONE_NEWPID
        assert spec.namespaces & jail.CLONE_NEWIPC
    assert jail.TUN not in plain.devices and jail.TUN in tap.devices
    assert jail.KVM in plain.devices and jail.KVM not in jail.JailSpec(kvm=False).devices


@pytest.mark.parametrize(
    ("binds", "uid", "gid", "message"),
    [
        ([jail.Bind(Path("relative/file"))], None, None, "absolute"),
        ([jail.Bind(Path("/"))], None, None, "root"),
        ([jail.Bind(Path("/nonexistent/popek-jail-test"))], None, None, "no such file"),
        ([jail.Bind(Path("/tmp/../etc"))], None, None, ".."),
        ([], 1000, None, "both"),
        ([], -1, 0, "uid"),
        ([], 0, 2**32, "gid"),
    ],
)
def test_a_spec_that_cannot_be_jailed_is_one_clear_error(
    binds: list[jail.Bind], uid: int | None, gid: int | None, message: str
) -> None:
    with pytest.raises(jail.JailError, match=message):
        jail.JailSpec(binds=binds, uid=uid, gid=gid, kvm=False).validate()


@pytest.mark.parametrize("scratch", ["relative", "/", "/dev", "/dev/", "/x\0"])
def test_a_scratch_tmpfs_needs_an_absolute_path_other_than_root_and_dev(scratch: str) -> None:
    with pytest.raises(jail.JailError, match="scratch"):
        jail.JailSpec(scratch=scratch, kvm=False).validate()
    jail.JailSpec(scratch="/run/popek", kvm=False).validate()


@given(st.text(max_size=60))
def test_any_path_text_is_accepted_or_a_jail_error(text: str) -> None:
    try:
        jail.JailSpec(binds=[jail.Bind(Path(text))], kvm=False).validate()
    except jail.JailError:
        pass


def test_the_filter_allows_unix_sockets_only() -> None:
    rule = _rules(_pfc(), "socket")
    assert "$a0.lo32 == 1" in rule and "ALLOW" in rule  # AF_UNIX is 1
    assert rule.count("action") == 1  # nothing else: AF_INET, AF_INET6, AF_NETLINK get the default, EPERM


def test_the_filter_allows_clone_for_threads_only_and_clone3_answers_enosys() -> None:
    pfc = _pfc()
    clone = _rules(pfc, "clone")
    assert f"$a0.lo32 & 0x{jail.CLONE_THREAD:08x} == {jail.CLONE_THREAD}" in clone and "ALLOW" in clone
    assert clone.count("action") == 1
    assert f"action ERRNO({errno.ENOSYS})" in _rules(pfc, "clone3")


def test_ioctl_is_allowed_for_kvm_and_terminal_types_only() -> None:
    rule = _rules(_pfc(), "ioctl")
    assert rule.count("action ALLOW") == len(jail.IOCTL_TYPES) == 2
    assert "$a1.lo32 & 0x0000ff00 == 44544" in rule and "$a1.lo32 & 0x0000ff00 == 21504" in rule  # 0xAE00, 0x5400


def test_the_default_action_is_eperm_and_exec_fork_ptrace_mount_are_not_allowed() -> None:
    pfc = _pfc()
    assert pfc.split("# default action")[1].split()[:2] == ["action", f"ERRNO({errno.EPERM});"]
    for name in jail.DENIED_ALWAYS:
        assert name not in jail.ALLOWED
        try:
            assert _rules(pfc, name) == "", name
        except OSError:  # a call this architecture does not have (fork-less arches): nothing to allow anyway
            pass


def test_the_allowlist_names_only_real_system_calls() -> None:
    import pyseccomp

    for name in jail.ALLOWED:
        assert pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) >= 0, name


def test_without_cap_sys_admin_the_jail_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jail, "has_sys_admin", lambda: False)
    with pytest.raises(jail.JailError, match="needs root"):
        jail.check_possible()
    with pytest.raises(jail.JailError, match="needs root"):
        jail.enter(jail.JailSpec(kvm=False))


def test_passt_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    with pytest.raises(jail.JailError, match="passt"):
        jail.confine_vm(workdir=tmp_path, kernel=None, initrd=None, net=net_spec("passt", []))


def test_enter_refuses_a_threaded_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jail, "has_sys_admin", lambda: True)
    monkeypatch.setattr(jail.threading, "active_count", lambda: 2)
    with pytest.raises(jail.JailError, match="before any thread"):
        jail.enter(jail.JailSpec(kvm=False))


def test_the_daemon_spec_refuses_jail_with_passt_and_a_jail_that_is_not_a_boolean(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(jail, "has_sys_admin", lambda: True)
    with pytest.raises(ValidationError, match="passt"):
        VmCreate(jail=True, net="passt")
    with pytest.raises(ValidationError, match="jail"):
        VmCreate.model_validate({"jail": "yes"})
    assert VmCreate(jail=True, net="tap:tap0").jail


def test_the_daemon_spec_refuses_a_jail_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jail, "has_sys_admin", lambda: False)
    with pytest.raises(ValidationError, match="needs root"):
        VmCreate(jail=True)
    assert not VmCreate().jail


def test_a_disk_spec_becomes_a_bind_as_the_vm_uses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"\0" * 512)
    seen: list[jail.JailSpec] = []
    monkeypatch.setattr(jail, "has_sys_admin", lambda: True)
    monkeypatch.setattr(jail, "preload", lambda extra=(): None)
    monkeypatch.setattr(jail, "enter", seen.append)
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)  # confine_vm sets it once "in the jail": undone after
    jail.confine_vm(workdir=tmp_path, kernel=disk, initrd=None, disks=[DiskSpec(disk, read_only=True)], accel="soft")
    (spec,) = seen
    assert jail.Bind(disk, writable=False) in spec.binds and not spec.kvm and not spec.tap
    jail.confine_vm(workdir=tmp_path, kernel=disk, initrd=None, disks=[DiskSpec(disk)], net=net_spec("tap:t0", []))
    assert jail.Bind(disk, writable=True) in seen[1].binds and seen[1].tap


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--jail", "--net", "passt"], "passt"),
        (["--jail-uid", "1000", "--jail-gid", "1000"], "go with --jail"),
        (["--jail", "--vsock", "3:/tmp/x.sock"], "--vsock"),
    ],
)
def test_popek_run_jail_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    kernel = tmp_path / "k.bin"
    kernel.write_bytes(b"\xf4" * 510 + b"\x55\xaa")
    result = subprocess.run(
        [sys.executable, "-m", "popek", "run", "--kernel", str(kernel), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_vm_process_makes_the_default_guest_explicit_before_it_is_jailed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from popek import image
    from popek.daemon import vmproc

    kernel, initrd = tmp_path / "bzImage", tmp_path / "initrd"
    monkeypatch.setattr(
        image, "ensure_default_guest", lambda progress=False: SimpleNamespace(kernel=kernel, initrd=initrd, cmdline="q")
    )
    seen: list[dict[str, object]] = []
    monkeypatch.setattr(jail, "confine_vm", lambda **kw: seen.append(kw))
    spec = vmproc.jail({"cmdline": "extra", "disks": ["/dev/null,ro"], "accel": "kvm"}, tmp_path)
    assert (spec["kernel"], spec["initrd"], spec["cmdline"]) == (str(kernel), str(initrd), "q extra")
    (args,) = seen
    assert args["workdir"] == tmp_path and args["kernel"] == str(kernel) and args["net"] is None
    assert [(d.path, d.read_only) for d in args["disks"]] == [(Path("/dev/null"), True)]  # type: ignore[attr-defined]
    restored = vmproc.jail({"snapshot": str(tmp_path)}, tmp_path)
    assert restored.get("kernel") is None and seen[1]["readonly"] == [str(tmp_path)]
