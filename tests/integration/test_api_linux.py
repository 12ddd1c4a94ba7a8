"""popek.VM on the default Linux guest over KVM: commands, shell strings, signals, timeouts, files, concurrent calls
and spawned processes through the guest agent on the VM's vsock device, on ONE booted guest (a module fixture:
a boot takes ~2 minutes on this nested KVM); and ``popek run -- CMD`` through the agent, whose stdout and stderr
are the command's alone and whose exit status is the command's."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from popek import image
from popek.agent import CommandStartError, CommandTimeout, RemoteFileError
from popek.api import VM
from popek.cli_agent import _interactive

BOOT_TIMEOUT = 1200  # as test_linux_boot: ring-0 code may be emulated by the host at ~1.4 M instructions/s

pytestmark = [
    pytest.mark.timeout(BOOT_TIMEOUT + 300),
    pytest.mark.kvm,
    pytest.mark.linux,
    pytest.mark.slow,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs a usable /dev/kvm"),
]


@pytest.fixture(scope="module")
def vm(guest: image.GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VM]:
    console = (tmp_path_factory.mktemp("api-console") / "console.log").open("wb", buffering=0)  # readable meanwhile
    # 256 MiB, as the other default-guest tests: one warm snapshot (popek.warm) serves them all
    machine = VM(accel="kvm", mem="256M", boot_timeout=BOOT_TIMEOUT, console=console.write)
    try:
        machine.start()
    except Exception as e:
        tail = getattr(e, "console_tail", b"").decode(errors="replace")
        pytest.fail(f"the default guest did not boot to its agent: {e}\nconsole:\n{tail[-6000:]}")
    with machine:
        yield machine
        if not machine.running:  # a test stopped it: say how, once, where the failures are read
            print(f"VM stopped: {machine.stop_reason}\n{machine.console_tail.decode(errors='replace')[-4000:]}")
    console.close()


def test_exec_returns_the_commands_stdout_stderr_and_exit_code(vm: VM) -> None:
    r = vm.exec(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.stdout, r.stderr, r.exit_code, r.signal) == (b"out\n", b"err\n", 3, None)
    assert 0 < r.duration < 30
    uname = vm.exec(["uname", "-sr"])
    assert uname.stdout.startswith(b"Linux 6.1.") and uname.exit_code == 0


def test_a_shell_string_runs_in_sh_with_the_environment_asked_for(vm: VM) -> None:
    r = vm.exec('echo "$((6 * 7)) $GREETING"; exit 5', env={"GREETING": "hello"})
    assert (r.stdout, r.exit_code) == (b"42 hello\n", 5)


def test_a_program_that_is_not_there_cannot_start(vm: VM) -> None:
    with pytest.raises(CommandStartError):
        vm.exec(["/no/such/program"])


def test_a_command_a_signal_killed_reports_the_signal(vm: VM) -> None:
    r = vm.exec(["sh", "-c", "kill -TERM $$"])
    assert (r.exit_code, r.signal) == (None, 15)


def test_a_command_past_its_timeout_is_killed(vm: VM) -> None:
    started = time.monotonic()
    r = vm.exec(["sleep", "60"], timeout=1)
    assert r.timed_out and r.exit_code is None and time.monotonic() - started < 30
    with pytest.raises(CommandTimeout):
        vm.exec(["sleep", "60"], timeout=1, check=True)


def test_output_given_to_callbacks_is_streamed_and_not_kept(vm: VM) -> None:
    out: list[bytes] = []
    err: list[bytes] = []
    r = vm.exec("for i in 1 2 3; do echo $i; echo e$i >&2; done", on_stdout=out.append, on_stderr=err.append)
    assert (b"".join(out), b"".join(err)) == (b"1\n2\n3\n", b"e1\ne2\ne3\n")
    assert (r.stdout, r.stderr, r.exit_code) == (b"", b"", 0)


def test_files_round_trip_with_their_sha256(vm: VM) -> None:
    data = os.urandom(512 << 10)
    digest = hashlib.sha256(data).hexdigest()
    assert vm.files.write("/tmp/blob", data) == len(data)
    assert hashlib.sha256(vm.files.read("/tmp/blob")).hexdigest() == digest
    assert vm.exec(["sha256sum", "/tmp/blob"]).stdout.split()[0].decode() == digest  # the guest read it too
    (entry,) = [e for e in vm.files.list("/tmp") if e.name == "blob"]
    assert entry.is_file and entry.size == len(data)
    assert {"proc", "tmp"} <= {e.name for e in vm.files.list("/") if e.is_dir}
    vm.files.remove("/tmp/blob")
    with pytest.raises(RemoteFileError):
        vm.files.read("/tmp/blob")


def test_four_threads_run_commands_at_once(vm: VM) -> None:
    # each command waits until all four have started: calls run one after another would time out instead
    vm.exec(["mkdir", "-p", "/tmp/rendezvous"], check=True)
    wait_all = "touch /tmp/rendezvous/$0; while [ $(ls /tmp/rendezvous | wc -l) -lt 4 ]; do sleep 0.1; done; echo $0"
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = vm.exec(["sh", "-c", wait_all, f"call-{i}"], timeout=300, check=True).stdout
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(400)
    assert errors == []
    assert results == {i: f"call-{i}\n".encode() for i in range(4)}


def test_a_spawned_process_takes_stdin_and_can_be_killed(vm: VM) -> None:
    cat = vm.spawn(["cat"])
    cat.write(b"through stdin")
    cat.close_stdin()
    assert cat.wait(timeout=60).stdout == b"through stdin"
    sleeper = vm.spawn(["sleep", "100"])
    assert sleeper.poll() is None
    sleeper.kill()
    r = sleeper.wait(timeout=60)
    assert (r.exit_code, r.signal) == (None, 9)
    assert vm.running


def run_interactive(vm: VM, command: list[str], use_pty: bool, stdin: bytes) -> tuple[int, bytes, bytes]:
    """popek run -i / -t's loop on pipes: (exit status, stdout, stderr)."""
    fds = [*os.pipe(), *os.pipe(), *os.pipe()]
    in_r, in_w, out_r, out_w, err_r, err_w = fds
    try:
        os.write(in_w, stdin)
        os.close(in_w)
        status = _interactive(vm, command, use_pty, in_r, out_w, err_w)
        os.close(out_w)
        os.close(err_w)
        with os.fdopen(out_r, "rb", closefd=False) as out, os.fdopen(err_r, "rb", closefd=False) as err:
            return status, out.read(), err.read()
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def test_popek_run_i_feeds_stdin_to_the_command(vm: VM) -> None:
    status, out, err = run_interactive(vm, ["sh", "-c", "cat; echo e >&2; exit 3"], False, b"via stdin\n")
    assert (status, out, err) == (3, b"via stdin\n", b"e\n")


def test_popek_run_t_runs_the_command_on_a_pty_of_the_terminals_size(vm: VM) -> None:
    status, out, _ = run_interactive(vm, ["/bin/sh"], True, b"tty; stty size; exit 4\n")
    assert status == 4, out
    assert b"/dev/pts/" in out and b"24 80" in out, out  # pipes are no terminal: the 24x80 a terminal starts as


def test_popek_run_prints_only_the_commands_output_and_returns_its_status(guest: image.GuestImage) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "popek", "run", "--timeout", str(BOOT_TIMEOUT), "--",
         "sh", "-c", "echo out; echo err >&2; exit 7"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BOOT_TIMEOUT + 120,
    )  # fmt: skip
    log = f"stdout:\n{r.stdout[-6000:]}\nstderr:\n{r.stderr[-4000:]}"
    assert r.stdout == "out\n", log  # no kernel log, no markers: the command's stdout alone
    assert "err" in r.stderr and "Linux version" not in r.stderr, log
    assert r.returncode == 7, log
