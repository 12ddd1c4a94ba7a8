"""Inside popek.jail: a forked child enters the jail and tries what an escaped guest would (host files, sockets
to the outside, execve, fork), reporting through a pipe; and a VM still runs inside it (`popek run --jail`)."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from popek import jail

from .guests import boot_sector

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not jail.has_sys_admin(), reason="the jail needs root (CAP_SYS_ADMIN)")


def _in_jail(spec: jail.JailSpec, tries: dict[str, Callable[[], object]]) -> dict[str, str]:
    """Run each try in a jailed grandchild: 'ok' or the exception's type and errno name."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            jail.enter(spec)
            results = {}
            for name, attempt in tries.items():
                try:
                    attempt()
                    results[name] = "ok"
                except OSError as exc:
                    results[name] = f"{type(exc).__name__}:{exc.errno}"
            os.write(write_end, json.dumps(results).encode())
            os._exit(0)
        except BaseException as exc:
            os.write(write_end, json.dumps({"error": repr(exc)}).encode())
            os._exit(3)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read()
    _, status = os.waitpid(pid, 0)
    results = json.loads(answer)
    assert "error" not in results, results
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    return dict(results)


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, socket.socket]:
    """A listening Unix socket outside the jail's root, beside the jail's own work dir."""
    folder = tmp_path_factory.mktemp("outside")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "host.sock"))
    server.listen()
    return folder / "host.sock", server


def _thread() -> None:
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()


def test_inside_the_jail_host_files_sockets_exec_and_fork_fail(
    tmp_path: Path, outside: tuple[Path, socket.socket]
) -> None:
    host_sock, _ = outside
    work = tmp_path / "work"
    work.mkdir()

    def connect_outside() -> None:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(host_sock))

    def exec_true() -> None:
        os.execv("/bin/true", ["true"])

    results = _in_jail(
        jail.JailSpec.for_vm(workdir=work, kvm=False),
        {
            "passwd": lambda: open("/etc/passwd").close(),
            "repo": lambda: open(REPO / "pyproject.toml").close(),
            "inet": lambda: socket.socket(socket.AF_INET).close(),
            "inet6": lambda: socket.socket(socket.AF_INET6).close(),
            "netlink": lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close(),
            "connect_outside": connect_outside,
            "execve": exec_true,
            "fork": os.fork,
            "mknod": lambda: os.mknod(str(work / "null"), 0o666 | 0o020000, os.makedev(1, 3)),
            "fs_ioctl": lambda: fcntl.ioctl(os.open(str(work), os.O_RDONLY), 0x80086601, b"\0" * 8),  # GETFLAGS
            # what the VMM does need still works
            "write_work": lambda: (work / "console.log").write_text("hello"),
            "unix_socket": lambda: socket.socket(socket.AF_UNIX).close(),
            "thread": _thread,
            "urandom": lambda: os.urandom(16),
        },
    )
    enoent, eperm = f"FileNotFoundError:{2}", f"PermissionError:{1}"
    assert results["passwd"] == enoent and results["repo"] == enoent
    assert results["inet"] == results["inet6"] == results["netlink"] == eperm
    assert results["connect_outside"] == enoent  # the socket file is not in the root at all
    assert results["execve"] == eperm and results["fork"] == eperm and results["mknod"] == eperm
    assert results["fs_ioctl"] == eperm  # an ioctl of neither KVM's nor the terminal's type
    assert results["write_work"] == results["unix_socket"] == results["thread"] == results["urandom"] == "ok"
    assert (work / "console.log").read_text() == "hello"  # the work dir is the host's, bound read-write


def test_the_jailed_process_is_pid_1_as_the_given_uid_without_capabilities_and_filtered(tmp_path: Path) -> None:
    spec = jail.JailSpec.for_vm(workdir=tmp_path, kvm=False, uid=65534, gid=65534)
    spec.proc = True
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            jail.enter(spec)
            fields = dict(line.split(":\t", 1) for line in Path("/proc/self/status").read_text().splitlines())
            want = (
                "Pid",
                "Uid",
                "Gid",
                "Groups",
                "CapInh",
                "CapEff",
                "CapPrm",
                "CapBnd",
                "CapAmb",
                "NoNewPrivs",
                "Seccomp",
            )
            os.write(write_end, json.dumps({k: fields[k].strip() for k in want}).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        status = json.loads(pipe.read() or b"{}")
    os.waitpid(pid, 0)
    assert status["Pid"] == "1"
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == int(status["CapBnd"], 16) == 0
    assert int(status["CapAmb"], 16) == int(status["CapInh"], 16) == 0
    assert status["Uid"].split() == ["65534"] * 4 and status["Gid"].split() == ["65534"] * 4
    assert status["Groups"] == ""
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"


def test_the_jail_parent_ends_as_its_child_ends_and_forwards_sigterm(tmp_path: Path) -> None:
    code = (
        "import os, sys, time; from popek import jail; "
        f"jail.enter(jail.JailSpec.for_vm(workdir={str(tmp_path)!r}, kvm=False)); "
        f"open({str(tmp_path / 'up')!r}, 'w').close(); "
        "time.sleep(60) if sys.argv[1] == 'wait' else sys.exit(7)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    exited = subprocess.run([sys.executable, "-c", code, "exit"], env=env, timeout=60)
    assert exited.returncode == 7
    (tmp_path / "up").unlink()
    waiting = subprocess.Popen([sys.executable, "-c", code, "wait"], env=env)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "up").exists():
            assert time.monotonic() < deadline and waiting.poll() is None
            time.sleep(0.05)
        waiting.send_signal(signal.SIGTERM)
        assert waiting.wait(30) == -signal.SIGTERM  # forwarded to PID 1, which ended; the parent as if killed
    finally:
        waiting.kill()
        waiting.wait()


@pytest.mark.kvm
@pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs a usable /dev/kvm")
def test_a_vm_runs_inside_the_jail_on_kvm(tmp_path: Path) -> None:
    """A guest that writes to the serial port and halts: `popek run --jail` builds and runs it in the jail."""
    image = boot_sector(
        tmp_path,
        "mov dx, 0x3f8\nmov si, msg\nl: lodsb\ntest al, al\njz done\nout dx, al\njmp l\n"
        "done: cli\nhlt\nmsg: db 'hello from the jail', 10, 0",
    )
    before = set(Path("/tmp").glob("popek-*"))
    result = subprocess.run(
        [sys.executable, "-m", "popek", "run", "--accel", "kvm", "--kernel", str(image), "--timeout", "60", "--jail"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert "hello from the jail" in result.stdout, result.stderr
    assert "halted" in result.stderr and "Traceback" not in result.stderr
    assert set(Path("/tmp").glob("popek-*")) <= before  # its runtime directory was a tmpfs of the jail's own


def test_a_jail_that_cannot_be_built_is_a_jail_error_in_the_caller(tmp_path: Path) -> None:
    """A bind source that vanished (a dangling symlink): the child's error reaches the caller as one JailError,
    and the caller, unconfined, still sees the host's files."""
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    code = (
        "import os, sys; from pathlib import Path; from popek import jail; "
        f"spec = jail.JailSpec(binds=[jail.Bind(Path({str(tmp_path / 'gone')!r}))], kvm=False)\n"
        "try:\n    jail.enter(spec)\nexcept jail.JailError as e:\n"
        f"    print('refused:', e); print('tmp visible:', os.path.exists({str(tmp_path)!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert "refused:" in result.stdout and "No such file" in result.stdout, (result.stdout, result.stderr)
    assert "tmp visible: True" in result.stdout and result.returncode == 0
