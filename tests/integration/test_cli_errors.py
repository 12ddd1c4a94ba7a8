"""Bad input ends in one clear line on stderr and a non-zero exit status, never a traceback or a hang."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.boot.test_loaders import make_bzimage

kvm_usable = os.access("/dev/kvm", os.R_OK | os.W_OK)


def popek(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "popek", "run", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_error(r: subprocess.CompletedProcess[str], needle: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("popek: error: "), r.stderr
    assert needle in lines[0], lines[0]


@pytest.fixture
def sector(tmp_path: Path) -> Path:
    path = tmp_path / "boot.bin"
    path.write_bytes(b"\xf4".ljust(510, b"\0") + b"\x55\xaa")
    return path


def test_a_file_that_is_not_a_kernel(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello\n" * 100)
    assert_one_line_error(popek("--kernel", str(path)), "not a kernel popek can boot")


def test_a_missing_kernel_file(tmp_path: Path) -> None:
    assert_one_line_error(popek("--kernel", str(tmp_path / "nope")), "does not exist")


@pytest.mark.skipif(not kvm_usable, reason="the VM is built before the kernel is read")
def test_a_truncated_bzimage(tmp_path: Path) -> None:
    path = tmp_path / "bzImage"
    path.write_bytes(make_bzimage(b"\x90" * 4096, truncate=1000))
    assert_one_line_error(popek("--kernel", str(path)), "truncated")


def test_an_initrd_larger_than_memory(tmp_path: Path, sector: Path) -> None:
    initrd = tmp_path / "big.cpio"
    with open(initrd, "wb") as f:
        f.truncate(40 << 20)
    assert_one_line_error(popek("--kernel", str(sector), "--initrd", str(initrd), "--mem", "32M"), "larger than")


@pytest.mark.parametrize("mem,needle", [("0", "more than 0"), ("12Q", "cannot read"), ("100K", "at least 1 MiB")])
def test_bad_memory_sizes(sector: Path, mem: str, needle: str) -> None:
    assert_one_line_error(popek("--kernel", str(sector), "--mem", mem), needle)


def test_zero_cpus(sector: Path) -> None:
    assert_one_line_error(popek("--kernel", str(sector), "--cpus", "0"), "at least one vCPU")


def test_a_missing_kvm_device(sector: Path) -> None:
    assert_one_line_error(popek("--kernel", str(sector), "--kvm-device", "/nonexistent/kvm"), "no KVM on this host")


def test_a_device_that_is_not_kvm(sector: Path) -> None:
    assert_one_line_error(popek("--kernel", str(sector), "--kvm-device", "/dev/null"), "not a KVM device")


def test_no_permission_on_the_kvm_device_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from popek.kvm import Kvm, KvmError

    def refuse(*_args: object, **_kw: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(KvmError, match="kvm group"):
        Kvm()


def test_a_command_with_an_explicit_kernel_is_refused(sector: Path) -> None:
    assert_one_line_error(popek("--kernel", str(sector), "--", "uname"), "needs the default guest")


@pytest.mark.parametrize("option", ["-t", "-i"])
def test_a_terminal_or_stdin_without_the_agent_is_refused(sector: Path, option: str) -> None:
    assert_one_line_error(popek("--kernel", str(sector), option), "need the guest agent")
    assert_one_line_error(popek("--no-agent", option, "--", "sh"), "need the guest agent")


def test_a_kernel_shorter_than_its_setup_header(tmp_path: Path) -> None:
    path = tmp_path / "hdrs.bin"
    path.write_bytes(bytes(0x202) + b"HdrS")  # 0x206 bytes: the header claims more than the file has
    assert_one_line_error(popek("--accel", "soft", "--kernel", str(path)), "ends inside the setup header")


def test_an_absurd_memory_size(sector: Path) -> None:
    assert_one_line_error(popek("--kernel", str(sector), "--mem", "9999999999999999999999G"), "more than popek can")
    assert_one_line_error(popek("--kernel", str(sector), "--mem", "9" * 5000), "cannot read")


@pytest.mark.parametrize("flag,path", [("--kernel", "/dev/zero"), ("--initrd", "/dev/urandom")])
def test_devices_are_not_read_as_files(sector: Path, flag: str, path: str) -> None:
    args = ["--kernel", str(sector)] if flag == "--initrd" else []
    assert_one_line_error(popek("--accel", "soft", *args, flag, path), "not a regular file")


def test_a_fifo_without_a_writer_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert_one_line_error(popek("--accel", "soft", "--kernel", str(fifo)), "not a regular file")


def test_a_sparse_kernel_larger_than_the_guest_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "sparse.img"
    with open(path, "wb") as f:
        f.truncate(10 << 30)
    r = popek("--accel", "soft", "--kernel", str(path), "--mem", "64M")
    assert_one_line_error(r, "larger than guest memory")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1"])
def test_timeouts_that_never_or_always_expire_are_refused(sector: Path, value: str) -> None:
    assert_one_line_error(popek("--kernel", str(sector), f"--timeout={value}"), "positive number of seconds")


@pytest.mark.parametrize("args,needle", [(["--cpus", "abc"], "invalid int value"), (["--bogus"], "unrecognized")])
def test_usage_errors_are_one_line_and_status_1(sector: Path, args: list[str], needle: str) -> None:
    r = popek("--kernel", str(sector), *args)
    assert_one_line_error(r, needle)
    assert "try popek run --help" in r.stderr or "try popek --help" in r.stderr


@pytest.mark.parametrize(
    "value,needle",
    [("2:/tmp/popek-x.sock", "reserved"), ("3", "CID:SOCKET"), ("3:/no/such/dir/v.sock", "vsock socket")],
)
def test_bad_vsock_options(sector: Path, value: str, needle: str) -> None:
    assert_one_line_error(popek("--kernel", str(sector), "--accel", "soft", "--vsock", value), needle)
