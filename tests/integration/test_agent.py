"""The guest agent's binary, compiled as the default guest's build compiles it and run on the host on a Unix socket,
driven through AgentClient: commands (argv, shell, status, signals, timeouts, env, cwd, stdin, 100 MB of output,
pty), spawned processes, files, flow control, clients that vanish, and garbage on its socket."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popek.agent import (
    AgentClient,
    CommandFailed,
    CommandStartError,
    CommandTimeout,
    RemoteFileError,
    UnreadOutput,
    binary,
    protocol,
    tcp_connector,
    unix_connector,
)
from popek.agent.protocol import ErrorKind, FileRequest, FrameType

pytestmark = pytest.mark.skipif(shutil.which(binary.CC) is None, reason=f"needs {binary.CC} to compile the agent")


@pytest.fixture(scope="session")
def agent_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent compiled once per session with the default guest's command line."""
    folder = tmp_path_factory.mktemp("agent-build")
    binary.write_sources(folder / "src")
    output = folder / binary.BINARY
    built = subprocess.run(binary.compile_command(folder / "src", output), capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr
    assert built.stderr == "", built.stderr  # -Werror passes, and static glibc warns about nothing
    return output


@dataclass
class RunningAgent:
    process: subprocess.Popen[bytes]
    socket: Path
    work: Path  # an empty directory the tests may fill
    client: AgentClient

    def alive(self) -> bool:
        return self.process.poll() is None


# The agent runs on the host here, as root in CI: a REFRESH it takes (the fuzz tests below flip bytes of valid
# requests until one parses) would set the host's clock, reseed its RNG or change a MAC. Without CAP_SYS_TIME,
# CAP_SYS_ADMIN and CAP_NET_ADMIN
# (bounding and inheritable sets, so an exec as root does not get them back) it answers EPERM instead.
_WITHOUT_HOST_CAPS = (
    [
        "setpriv",
        "--bounding-set=-sys_time,-sys_admin,-net_admin",
        "--inh-caps=-sys_time,-sys_admin,-net_admin",
        "--",
    ]
    if os.geteuid() == 0 and shutil.which("setpriv")
    else []
)


@contextlib.contextmanager
def run_agent(
    agent_path: Path, *args: str, cwd: Path | None = None, pass_fds: tuple[int, ...] = ()
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """The agent started with args; yields it and its 'listening on' line (stopped by its pid afterwards)."""
    process = subprocess.Popen(
        [*_WITHOUT_HOST_CAPS, str(agent_path), *args],
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=cwd,
        pass_fds=pass_fds,
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline().decode()
        yield process, line
    finally:
        process.terminate()
        process.wait(10)
        if process.stderr is not None:
            process.stderr.close()


@pytest.fixture(scope="module")
def agent(agent_path: Path) -> Iterator[RunningAgent]:
    # a short folder of its own: a Unix socket path has at most 107 bytes, pytest's tmp paths can be longer
    folder = Path(tempfile.mkdtemp(prefix="popek-agent-"))
    work = folder / "work"
    work.mkdir()
    # its working directory is work: relative paths (the fuzz test's) stay in there
    with run_agent(agent_path, "--unix", str(folder / "agent.sock"), cwd=work) as (process, line):
        assert line == f"popek-agent: protocol 1.0, listening on unix:{folder / 'agent.sock'}\n"
        client = AgentClient(unix_connector(folder / "agent.sock"), timeout=10)
        yield RunningAgent(process, folder / "agent.sock", work, client)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def work(agent: RunningAgent, tmp_path: Path) -> Iterator[Path]:
    """A fresh directory for one test (the agent runs as this user, on this host)."""
    yield tmp_path
    assert agent.alive(), "the agent died during the test"


def gone(pid: int, within: float = 5.0) -> bool:
    """Whether process pid disappears (or is a zombie of someone else's) within the time given."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.02)
    return False


def rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# ---------------------------------------------------------------------------------------------------------------
# commands


def test_argv_and_shell_commands_and_their_exit_statuses(agent: RunningAgent) -> None:
    client = agent.client
    result = client.exec(["printf", "%s|", "a b", "$HOME", "", "\\", "é"])
    assert result.stdout == "a b|$HOME||\\|é|".encode() and result.exit_code == 0 and result.signal is None
    assert result.ok and not result.timed_out and 0 < result.duration < 5
    assert client.exec("echo $((6 * 7)); exit 3").exit_code == 3
    assert client.exec("echo $((6 * 7))").stdout == b"42\n"
    assert client.exec(["sh", "-c", "exit 255"]).exit_code == 255
    assert client.exec("no-such-command-popek").exit_code == 127  # the shell's answer
    assert client.exec([b"printf", b"\xff\xfe"]).stdout == b"\xff\xfe"  # argv bytes are bytes


def test_a_command_that_cannot_start_says_why(agent: RunningAgent, work: Path) -> None:
    with pytest.raises(CommandStartError, match=r"cannot execute 'no-such-program-popek': .*\[ENOENT\]") as error:
        agent.client.exec(["no-such-program-popek"])
    assert error.value.errno == errno.ENOENT
    (work / "plain").write_text("not a program")
    with pytest.raises(CommandStartError, match=r"\[EACCES\]"):
        agent.client.exec([str(work / "plain")])
    with pytest.raises(CommandStartError, match=r"cannot change to the directory '.*/missing'.*\[ENOENT\]"):
        agent.client.exec(["true"], cwd=work / "missing")


def test_death_by_signal_and_check(agent: RunningAgent) -> None:
    result = agent.client.exec("echo before; kill -9 $$")
    assert result.exit_code is None and result.signal == signal.SIGKILL and result.stdout == b"before\n"
    assert not result.ok and not result.timed_out
    with pytest.raises(CommandFailed, match="killed by signal 9 SIGKILL") as failed:
        agent.client.exec("kill -9 $$", check=True)
    assert failed.value.result.signal == 9
    with pytest.raises(CommandFailed, match="exited with status 4"):
        agent.client.exec("exit 4", check=True)
    assert agent.client.exec("true", check=True).ok


def test_a_timeout_kills_the_command_and_says_so(agent: RunningAgent) -> None:
    started = time.monotonic()
    result = agent.client.exec("echo started; sleep 30", timeout=0.3)
    assert result.timed_out and result.signal == signal.SIGTERM and result.exit_code is None
    assert result.stdout == b"started\n" and 0.3 <= result.duration < 3 and time.monotonic() - started < 5
    with pytest.raises(CommandTimeout, match="timed out") as timed_out:
        agent.client.exec("sleep 30", timeout=0.2, check=True)
    assert timed_out.value.result is not None and timed_out.value.result.timed_out


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(agent: RunningAgent) -> None:
    # the shell and its background sleep ignore SIGTERM (an ignored signal stays ignored across exec); both print
    # their pid, and both must be gone: the whole process group is killed
    script = "trap '' TERM; sleep 30 & echo $$ $!; wait; wait; wait"
    result = agent.client.exec(script, timeout=0.3, kill_grace=0.4)
    assert result.timed_out and result.signal == signal.SIGKILL
    assert 0.7 <= result.duration < 4
    shell, sleeper = (int(word) for word in result.stdout.split())
    assert gone(shell) and gone(sleeper)


def test_environment_and_working_directory(agent: RunningAgent, work: Path) -> None:
    client = agent.client
    os.environ.setdefault("POPEK_AGENT_TEST_INHERITED", "yes")  # the agent was started with the test's env
    result = client.exec(
        ["sh", "-c", 'echo "$A|$B|${HOME+set}|$(pwd)"'], env={"A": "1", b"B": b"two words\xff", "HOME": None}, cwd=work
    )
    assert result.stdout == b"1|two words\xff||" + str(work).encode() + b"\n"
    only = client.exec(["/usr/bin/env"], env={"ONLY": "this"}, clear_env=True).stdout
    assert only == b"ONLY=this\n"
    assert client.exec("echo $PATH").stdout.strip() == os.environ["PATH"].encode()
    assert client.exec(["pwd"]).stdout == os.fsencode(agent.work) + b"\n"  # the agent's own, by default
    # later items override earlier ones
    assert client.exec("echo $X", env={"X": "1"} | {"X": "2"}).stdout == b"2\n"


def test_stdin_round_trips_bytes_and_files(agent: RunningAgent, tmp_path: Path) -> None:
    data = random.Random(1).randbytes(3 << 20)
    result = agent.client.exec(["sha256sum"], stdin=data)
    assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert agent.client.exec(["cat"], stdin=data).stdout == data
    (tmp_path / "in").write_bytes(data[:100000])
    with open(tmp_path / "in", "rb") as source:
        assert agent.client.exec(["wc", "-c"], stdin=source).stdout == b"100000\n"
    assert agent.client.exec(["cat"], stdin=b"").stdout == b""
    assert agent.client.exec(["cat"]).stdout == b""  # no stdin: /dev/null
    # a child that stops reading: the rest of stdin is dropped, and the command still ends
    assert agent.client.exec("head -c 10", stdin=data).stdout == data[:10]


def test_100_mb_of_stdout_streams_through_callbacks_in_bounded_memory(agent: RunningAgent) -> None:
    size = 100_000_000
    line = b"abcdefghi\n"
    expected = hashlib.sha256()
    whole, rest = divmod(size, len(line))
    for _ in range(whole // 10000):
        expected.update(line * 10000)
    expected.update(line * (whole % 10000) + line[:rest])
    digest = hashlib.sha256()
    received = 0
    peak = baseline = rss_kib()
    chunks = 0

    def on_stdout(data: bytes) -> None:
        nonlocal received, peak, chunks
        digest.update(data)
        received += len(data)
        chunks += 1
        if chunks % 64 == 0:
            peak = max(peak, rss_kib())

    started = time.monotonic()
    result = agent.client.exec(f"yes abcdefghi | head -c {size}", on_stdout=on_stdout)
    seconds = time.monotonic() - started
    assert result.exit_code == 0 and result.stdout == b""  # given to the callback, not kept
    assert received == size and digest.hexdigest() == expected.hexdigest()
    assert (peak - baseline) < 32 << 10, f"the host grew by {(peak - baseline) >> 10} MiB"
    print(f"100 MB of stdout in {seconds:.2f} s ({size / seconds / 1e6:.0f} MB/s), host RSS +{peak - baseline} KiB")


def test_stdout_and_stderr_stay_apart(agent: RunningAgent) -> None:
    script = "i=0; while [ $i -lt 2000 ]; do echo out$i; echo err$i >&2; i=$((i+1)); done"
    result = agent.client.exec(script)
    assert result.stdout == b"".join(b"out%d\n" % i for i in range(2000))
    assert result.stderr == b"".join(b"err%d\n" % i for i in range(2000))
    streamed: list[tuple[str, bytes]] = []
    agent.client.exec(
        "echo a; echo b >&2",
        on_stdout=lambda data: streamed.append(("out", data)),
        on_stderr=lambda data: streamed.append(("err", data)),
    )
    assert sorted(streamed) == [("err", b"b\n"), ("out", b"a\n")]


def test_a_pty_is_the_controlling_terminal_of_its_size(agent: RunningAgent) -> None:
    result = agent.client.exec("tty; stty size; echo err >&2", pty=(33, 101))
    lines = result.stdout.split(b"\r\n")
    assert lines[0].startswith(b"/dev/pts/") and lines[1] == b"33 101" and lines[2] == b"err"
    assert result.stderr == b"" and result.exit_code == 0
    with agent.client.spawn(["cat"], pty=(24, 80)) as process:
        process.write(b"typed\n")
        echoed = b""
        while b"typed\r\ntyped\r\n" not in echoed:
            chunk = process.read(timeout=5)
            assert chunk is not None
            echoed += chunk[1]
        process.resize(50, 132)
        process.close_stdin()  # ^D: cat sees the end of its input
        assert process.wait(timeout=5).exit_code == 0
    result = agent.client.exec("sleep 0.2; stty size", pty=(10, 20))
    assert result.stdout == b"10 20\r\n"


def test_spawn_write_read_kill_and_wait(agent: RunningAgent) -> None:
    with agent.client.spawn(["cat"]) as process:
        assert process.pid > 0 and process.poll() is None
        process.write(b"hello ")
        process.write(b"world")
        got = b""
        while got != b"hello world":
            chunk = process.read(timeout=5)
            assert chunk is not None and chunk[0] == "stdout"
            got += chunk[1]
        process.close_stdin()
        result = process.wait(timeout=5)
        assert result.exit_code == 0 and result.stdout == b""  # read() took it
        assert process.read() is None and process.poll() == result
    with agent.client.spawn("echo $$; exec sleep 30", stdin=False) as process:
        with pytest.raises(CommandTimeout, match=r"still runs after 0\.2 s"):
            process.wait(timeout=0.2)
        process.kill(signal.SIGTERM)
        result = process.wait(timeout=5)
        assert result.signal == signal.SIGTERM and not result.timed_out
        assert gone(int(result.stdout))
        process.kill()  # after the end: nothing happens


def test_kill_from_another_thread_while_one_waits(agent: RunningAgent) -> None:
    with agent.client.spawn(["sleep", "30"]) as process:
        # the waiting thread holds the connection's reader; the killing one must not need it
        killer = threading.Timer(0.3, process.kill, args=(signal.SIGTERM,))
        killer.start()
        result = process.wait(timeout=10)
        killer.join()
    assert result.signal == signal.SIGTERM


def test_a_signal_is_not_held_up_by_stdin_the_child_does_not_read(agent: RunningAgent) -> None:
    with agent.client.spawn(["sleep", "30"]) as process:
        with pytest.raises(CommandTimeout, match="did not take its stdin"):
            process.write(b"x" * (8 << 20), timeout=0.5)  # more than the pipe and the credit window hold
        process.kill()
        assert process.wait(timeout=5).signal == signal.SIGKILL


def test_unread_output_is_an_error_not_a_hang(agent: RunningAgent) -> None:
    with agent.client.spawn(["cat"], max_buffered=256 << 10) as process:
        with pytest.raises(UnreadOutput, match="read\\(\\) it first"):
            process.write(b"y" * (16 << 20), timeout=20)
        process.kill()
        assert process.wait(timeout=5).signal == signal.SIGKILL


def test_a_host_that_does_not_read_throttles_the_child_not_the_agent(agent: RunningAgent) -> None:
    with agent.client.spawn("echo $$; exec yes popek", stdin=False, max_buffered=1) as process:
        first = process.read(timeout=5)
        assert first is not None
        pid = int(first[1].split(b"\n")[0])
        handler = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the connection's process
        time.sleep(1)  # the host reads nothing: the pipe fills, then `yes` blocks in write
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state == "S", state
        assert rss_kib(handler) < 8 << 10, f"the agent's connection grew to {rss_kib(handler)} KiB"
        # what was held back is all there, in order
        data = b""
        while len(data) < 4 << 20:
            chunk = process.read(timeout=5)
            assert chunk is not None
            data += chunk[1]
        whole = first[1][first[1].index(b"\n") + 1 :] + data
        assert whole[: len(whole) // 6 * 6] == b"popek\n" * (len(whole) // 6)
        process.kill()
        assert process.wait(timeout=5).signal == signal.SIGKILL


def test_concurrent_execs_from_threads_each_get_their_own(agent: RunningAgent) -> None:
    results: dict[int, list[bytes]] = {}
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            results[n] = [agent.client.exec(["sh", "-c", f"sleep 0.0{i}; echo {n}-{i}"]).stdout for i in range(5)]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert results == {n: [f"{n}-{i}\n".encode() for i in range(5)] for n in range(8)}


def test_a_client_that_vanishes_mid_exec_gets_its_command_killed(agent: RunningAgent) -> None:
    process = agent.client.spawn("echo $$; exec sleep 30", stdin=False)
    chunk = process.read(timeout=5)
    assert chunk is not None
    pid = int(chunk[1])
    process.close()  # no EXIT read: the agent must notice
    assert gone(pid)
    # the same by a raw socket closed in the middle of a stream of output
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(agent.socket))
    sock.settimeout(5)
    sock.sendall(protocol.Hello().encode() + protocol.ExecRequest(shell=b"echo $$; sleep 0.1; exec yes").encode())
    reader = protocol.FrameReader()
    while (frame := reader.next_frame()) is None or frame.type != FrameType.STDOUT:
        if frame is None:
            reader.feed(sock.recv(4096))
    time.sleep(0.2)  # `yes` fills the pipe and the connection
    sock.close()
    assert gone(int(frame.payload.split(b"\n")[0]))
    assert agent.client.ping() < 5 and agent.alive()


# ---------------------------------------------------------------------------------------------------------------
# files

AWKWARD_NAMES = [b"with space", b"new\nline", b"\xff\xfe not utf-8", b"-dash", b"*", b"tab\there"]


def test_files_round_trip_with_checksums(agent: RunningAgent, work: Path) -> None:
    files = agent.client.files
    generator = random.Random(2)
    for size in (0, 1, 65535, 65536, 65537, 5 << 20):
        data = generator.randbytes(size)
        path = work / f"f{size}"
        assert files.write(path, data) == size
        assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(data).digest()
        assert hashlib.sha256(files.read(path)).digest() == hashlib.sha256(data).digest()
    big = generator.randbytes(3 << 20)
    (work / "source").write_bytes(big)
    with open(work / "source", "rb") as source:
        assert files.write(work / "copy", source) == len(big)
    with open(work / "back", "wb") as sink:
        assert files.read_to(work / "copy", sink) == len(big)
    assert (work / "back").read_bytes() == big
    assert files.read(work / "copy", offset=100, length=1000) == big[100:1100]
    assert files.read(work / "copy", offset=len(big) - 5) == big[-5:]
    assert files.read(work / "copy", offset=len(big) + 5) == b""


def test_awkward_paths_are_bytes_end_to_end(agent: RunningAgent, work: Path) -> None:
    files = agent.client.files
    for name in AWKWARD_NAMES:
        path = os.fsencode(work) + b"/" + name
        files.write(path, name * 3)
        assert Path(os.fsdecode(path)).read_bytes() == name * 3
        assert files.read(path) == name * 3
        assert files.read(os.fsdecode(path)) == name * 3  # str paths carry the same bytes (surrogateescape)
    assert sorted(os.fsencode(entry.name) for entry in files.list(work)) == sorted(AWKWARD_NAMES)


def test_write_modes_and_flags(agent: RunningAgent, work: Path) -> None:
    files = agent.client.files
    files.write(work / "script", b"#!/bin/sh\necho hi\n", mode=0o750)
    assert stat.S_IMODE((work / "script").stat().st_mode) == 0o750  # exactly: no umask
    assert agent.client.exec([str(work / "script")]).stdout == b"hi\n"
    files.write(work / "script", b"data", mode=0o600)  # an existing file gets the mode too
    assert stat.S_IMODE((work / "script").stat().st_mode) == 0o600
    files.write(work / "log", b"one\n")
    files.write(work / "log", b"two\n", append=True)
    assert (work / "log").read_bytes() == b"one\ntwo\n"
    with pytest.raises(RemoteFileError, match=r"\[EEXIST\]") as error:
        files.write(work / "log", b"x", exclusive=True)
    assert error.value.errno == errno.EEXIST and error.value.path == os.fsencode(work / "log")
    with pytest.raises(RemoteFileError, match=r"\[ENOENT\]"):
        files.write(work / "missing" / "file", b"x")
    with pytest.raises(RemoteFileError, match=r"cannot open '.*': Is a directory \[EISDIR\]"):
        files.write(work, b"x")
    os.mkfifo(work / "fifo")
    with pytest.raises(RemoteFileError, match=r"\[ENXIO\]|FIFO"):  # no reader: refused at open, never blocks
        files.write(work / "fifo", b"x")
    if Path("/dev/full").exists():
        with pytest.raises(RemoteFileError, match=r"cannot write '/dev/full'.*\[ENOSPC\]"):
            files.write("/dev/full", b"z" * (1 << 20))
    assert agent.alive()


def test_read_errors(agent: RunningAgent, work: Path) -> None:
    files = agent.client.files
    with pytest.raises(RemoteFileError, match=r"\[ENOENT\]"):
        files.read(work / "missing")
    with pytest.raises(RemoteFileError, match=r"cannot read .*\[EISDIR\]"):
        files.read(work)
    os.mkfifo(work / "fifo")
    with pytest.raises(RemoteFileError, match=r"FIFO or a socket \[EINVAL\]"):
        files.read(work / "fifo")
    with pytest.raises(RemoteFileError, match=r"\[ESPIPE\]"):
        files.read("/dev/zero", offset=1)
    assert files.read("/dev/zero", length=100000) == b"\0" * 100000


def test_list_and_stat(agent: RunningAgent, work: Path) -> None:
    files = agent.client.files
    (work / "file").write_bytes(b"12345")
    (work / "dir").mkdir()
    (work / "link").symlink_to("dir")
    (work / "dangling").symlink_to("nowhere")
    os.utime(work / "file", ns=(1, 1_700_000_000_123_456_789))
    entries = {entry.name: entry for entry in files.list(work)}
    assert sorted(entries) == ["dangling", "dir", "file", "link"]
    assert entries["file"].is_file and entries["file"].size == 5 and entries["file"].permissions == 0o644
    assert entries["file"].mtime_ns == 1_700_000_000_123_456_789
    assert entries["dir"].is_dir and entries["link"].is_symlink and entries["dangling"].is_symlink
    assert entries["file"].uid == os.getuid()
    assert files.stat(work / "link").is_dir and files.stat(work / "link", follow_symlinks=False).is_symlink
    info = files.stat(work / "file")
    assert info.name == "file" and info.size == 5 and stat.S_ISREG(info.mode)
    with pytest.raises(RemoteFileError, match=r"\[ENOENT\]"):
        files.stat(work / "dangling")
    with pytest.raises(RemoteFileError, match=r"\[ENOTDIR\]"):
        files.list(work / "file")
    with pytest.raises(RemoteFileError, match=r"\[ENOENT\]"):
        files.list(work / "missing")
    many = work / "many"
    many.mkdir()
    for i in range(3000):  # more than one ENTRIES frame
        (many / f"entry-{i:04d}-{'x' * 40}").touch()
    listed = files.list(many)
    assert [entry.name for entry in listed] == sorted(f"entry-{i:04d}-{'x' * 40}" for i in range(3000))
    assert files.list(work / "dir") == []


def test_mkdir_and_remove(agent: RunningAgent, work: Path) -> None:
    files = agent.client.files
    files.mkdir(work / "a")
    assert stat.S_IMODE((work / "a").stat().st_mode) == 0o755
    with pytest.raises(RemoteFileError, match=r"\[EEXIST\]"):
        files.mkdir(work / "a")
    with pytest.raises(RemoteFileError, match=r"\[ENOENT\]"):
        files.mkdir(work / "x" / "y")
    files.mkdir(work / "x" / "y" / "z", parents=True, mode=0o700)
    files.mkdir(work / "x" / "y" / "z", parents=True)  # exists: fine, as mkdir -p
    assert stat.S_IMODE((work / "x" / "y" / "z").stat().st_mode) == 0o700
    (work / "plain").touch()
    with pytest.raises(RemoteFileError, match=r"\[EEXIST\]|\[ENOTDIR\]"):
        files.mkdir(work / "plain" / "sub", parents=True)
    with pytest.raises(RemoteFileError, match=r"\[ENOTEMPTY\]"):
        files.remove(work / "x")
    # recursive removal does not follow a symlink out of the tree
    outside = work / "outside"
    outside.mkdir()
    (outside / "keep").write_text("precious")
    (work / "x" / "y" / "to-outside").symlink_to(outside)
    (work / "x" / "y" / "z" / "deep").write_text("gone")
    files.remove(work / "x", recursive=True)
    assert not (work / "x").exists() and (outside / "keep").read_text() == "precious"
    files.remove(work / "plain")
    files.remove(work / "a")
    (work / "link").symlink_to(outside)
    files.remove(work / "link")  # the link, not its target
    assert outside.is_dir() and not (work / "link").is_symlink()
    with pytest.raises(RemoteFileError, match=r"\[ENOENT\]"):
        files.remove(work / "missing")
    with pytest.raises(RemoteFileError, match=r"cannot remove the root directory '/'.*\[EPERM\]"):
        files.remove("/")  # (not recursive: a broken refusal must not be able to do harm on the test host)
    deep = work / "deep"
    path = deep
    for _ in range(300):
        path = path / "d"
    os.makedirs(path)
    with pytest.raises(RemoteFileError, match=r"\[ELOOP\]"):
        files.remove(deep, recursive=True)
    assert deep.is_dir()
    shutil.rmtree(deep)


def test_a_reader_that_vanishes_mid_file_leaves_the_agent_serving(agent: RunningAgent, work: Path) -> None:
    (work / "big").write_bytes(b"\x55" * (20 << 20))
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(str(agent.socket))
    sock.sendall(protocol.Hello().encode() + FileRequest(FrameType.READ, os.fsencode(work / "big")).encode())
    sock.recv(1000)
    sock.close()
    writer = socket.socket(socket.AF_UNIX)
    writer.connect(str(agent.socket))
    writer.sendall(
        protocol.Hello().encode() + FileRequest(FrameType.WRITE, os.fsencode(work / "half"), flags=3).encode()
    )
    writer.sendall(protocol.encode_frame(FrameType.DATA, b"partial"))
    writer.close()  # no DATA_END
    assert agent.client.ping() < 5
    assert agent.client.files.read(work / "big", length=3) == b"\x55" * 3


# ---------------------------------------------------------------------------------------------------------------
# the agent's own defences


def exchange(agent: RunningAgent, data: bytes, *, shut: bool = True, timeout: float = 5.0) -> list[protocol.Frame]:
    """Send raw bytes on a fresh connection; the frames the agent answers until it closes."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(timeout)
    sock.connect(str(agent.socket))
    reader = protocol.FrameReader()
    frames: list[protocol.Frame] = []
    try:
        try:
            sock.sendall(data)
            if shut:
                sock.shutdown(socket.SHUT_WR)
        except BrokenPipeError:
            pass  # the agent answered and closed first (ERROR BUSY, sent at accept): its answer is still to read
        while data := sock.recv(65536):
            reader.feed(data)
            while (frame := reader.next_frame()) is not None:
                frames.append(frame)
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        sock.close()
    return frames


def test_a_frame_claiming_4_gib_is_refused_at_once(agent: RunningAgent) -> None:
    started = time.monotonic()
    frames = exchange(agent, protocol.Hello().encode() + b"\xff\xff\xff\xff\x11", shut=False)
    assert time.monotonic() - started < 4
    assert frames[0].type == FrameType.HELLO
    reply = protocol.ErrorReply.decode(frames[-1].payload)
    assert reply.kind == ErrorKind.PROTOCOL and "4294967295" in reply.message


def test_version_and_request_errors(agent: RunningAgent) -> None:
    frames = exchange(agent, protocol.Hello(major=2).encode())
    assert [f.type for f in frames] == [FrameType.ERROR]
    reply = protocol.ErrorReply.decode(frames[0].payload)
    assert reply.kind == ErrorKind.VERSION and "speaks protocol 1.0; the host speaks 2.0" in reply.message
    frames = exchange(agent, protocol.Hello(minor=9).encode() + protocol.encode_frame(FrameType.PING))
    assert [f.type for f in frames] == [FrameType.HELLO, FrameType.OK]  # another minor is fine
    bad = protocol.encode_frame(FrameType.STAT, protocol.encode_tlvs([(0x8FFF, b"")]))
    reply = protocol.ErrorReply.decode(exchange(agent, protocol.Hello().encode() + bad)[-1].payload)
    assert reply.kind == ErrorKind.UNSUPPORTED and "critical tag 0x8fff" in reply.message
    long = protocol.encode_frame(FrameType.EXEC, protocol.encode_tlvs([(protocol.Tag.SHELL, b"x" * (200 << 10))]))
    reply = protocol.ErrorReply.decode(exchange(agent, protocol.Hello().encode() + long)[-1].payload)
    assert reply.kind == ErrorKind.LIMIT
    cat = protocol.ExecRequest(argv=(b"cat",), stdin=True).encode()
    late = protocol.encode_frame(FrameType.STDIN_EOF) + protocol.encode_frame(FrameType.STDIN, b"late")
    frames = exchange(agent, protocol.Hello().encode() + cat + late, shut=False)
    assert [f.type for f in frames] == [FrameType.HELLO, FrameType.STARTED, FrameType.ERROR]
    reply = protocol.ErrorReply.decode(frames[-1].payload)
    assert reply.kind == ErrorKind.PROTOCOL and reply.message == "STDIN after STDIN_EOF"
    # a host that ignores the credit: sleep reads nothing, so the window (256 KiB, plus the 64 KiB pipe whose
    # credit comes back) runs out
    flood = protocol.encode_frame(FrameType.STDIN, b"z" * 60000) * 10
    sleeper = protocol.ExecRequest(argv=(b"sleep", b"9"), stdin=True).encode()
    started = time.monotonic()
    frames = exchange(agent, protocol.Hello().encode() + sleeper + flood, shut=False)
    reply = protocol.ErrorReply.decode(frames[-1].payload)
    assert reply.kind == ErrorKind.PROTOCOL and re.fullmatch(
        r"STDIN of 60000 bytes exceeds the \d+ bytes of credit", reply.message
    )
    assert time.monotonic() - started < 5  # the sleep was killed, not waited for


def children(pid: int) -> int:
    """How many processes have pid as their parent (from /proc/PID/stat: its fourth field)."""
    count = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # it exited meanwhile
            count += int(stat.rpartition(")")[2].split()[1]) == pid
    return count


def test_too_many_connections_are_refused_busy(agent: RunningAgent) -> None:
    idle = []
    try:
        for _ in range(protocol.MAX_CONNECTIONS):
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(agent.socket))
            idle.append(sock)  # each waits in the handshake, holding a connection process
        deadline = time.monotonic() + 30
        while children(agent.process.pid) < protocol.MAX_CONNECTIONS and time.monotonic() < deadline:
            time.sleep(0.05)  # the agent accepts and forks at its pace (a loaded host is slow at it)
        assert children(agent.process.pid) == protocol.MAX_CONNECTIONS
        frames = exchange(agent, protocol.Hello().encode() + protocol.encode_frame(FrameType.PING))
        assert [f.type for f in frames] == [FrameType.ERROR]
        assert protocol.ErrorReply.decode(frames[0].payload).kind == ErrorKind.BUSY
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 10
    while True:  # the connection processes see the end of their streams and exit; the listener reaps them
        frames = exchange(agent, protocol.Hello().encode() + protocol.encode_frame(FrameType.PING))
        if [f.type for f in frames] == [FrameType.HELLO, FrameType.OK] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert [f.type for f in frames] == [FrameType.HELLO, FrameType.OK]


SAFE_NAME = b"fuzz-target"


@st.composite
def hostile_streams(draw: st.DrawFn) -> bytes:
    """Garbage, or a valid HELLO then garbage, or a valid HELLO then a mutated harmless request (PING, or STAT
    LIST READ of a relative path inside the agent's working directory: no mutation can reach outside it)."""
    kind = draw(st.sampled_from(["garbage", "hello+garbage", "hello+mutated"]))
    garbage = draw(st.binary(max_size=300))
    if kind == "garbage":
        return garbage
    hello = protocol.Hello().encode()
    if kind == "hello+garbage":
        return hello + garbage
    request = bytearray(
        draw(
            st.sampled_from(
                [
                    protocol.encode_frame(FrameType.PING),
                    FileRequest(FrameType.STAT, SAFE_NAME).encode(),
                    FileRequest(FrameType.LIST, SAFE_NAME).encode(),
                    FileRequest(FrameType.READ, SAFE_NAME, offset=3, length=10).encode(),
                ]
            )
        )
    )
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(request) - 1))
        request[at] ^= draw(st.integers(1, 255))
    return hello + bytes(request) + garbage[:20]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(hostile_streams())
def test_garbage_on_the_socket_never_takes_the_agent_down(agent: RunningAgent, stream: bytes) -> None:
    frames = exchange(agent, stream, timeout=15)
    for frame in frames:  # whatever it answered is well-formed protocol
        assert frame.type in FrameType.__members__.values()
    assert agent.alive()
    assert agent.client.ping() < 5


# ---------------------------------------------------------------------------------------------------------------
# other transports and arguments


def test_tcp_binds_loopback_only(agent_path: Path) -> None:
    with run_agent(agent_path, "--tcp", "127.0.0.1:0") as (_process, line):
        assert line.startswith("popek-agent: protocol 1.0, listening on tcp:127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        client = AgentClient(tcp_connector("127.0.0.1", port))
        assert client.exec(["echo", "tcp"]).stdout == b"tcp\n"
    refused = subprocess.run([str(agent_path), "--tcp", "0.0.0.0:0"], capture_output=True, timeout=10, check=False)
    assert refused.returncode == 1 and b"loopback addresses only" in refused.stderr


def test_descriptors_the_agent_inherits_do_not_reach_commands(agent_path: Path) -> None:
    read_end, write_end = os.pipe()
    folder = Path(tempfile.mkdtemp(prefix="popek-agent-"))
    try:
        with run_agent(agent_path, "--unix", str(folder / "s"), pass_fds=(read_end, write_end)):
            listed = AgentClient(unix_connector(folder / "s")).exec(["ls", "/proc/self/fd"]).stdout.split()
        assert sorted(listed) == [b"0", b"1", b"2", b"3"]  # 3: ls's own listing of the folder
    finally:
        os.close(read_end)
        os.close(write_end)
        shutil.rmtree(folder)


def test_bad_arguments_are_one_line(agent_path: Path) -> None:
    for args in (["--bogus"], ["--tcp", "nonsense"], ["--vsock", "-1"], ["--unix"]):
        result = subprocess.run([str(agent_path), *args], capture_output=True, timeout=10, check=False)
        assert result.returncode == 2 and result.stderr.startswith(b"usage: popek-agent"), args
    long = subprocess.run(
        [str(agent_path), "--unix", "/tmp/" + "x" * 200], capture_output=True, timeout=10, check=False
    )
    assert long.returncode == 1 and b"longer than 107 bytes" in long.stderr


def test_vsock_listens_where_the_host_has_vsock(agent_path: Path) -> None:
    probe = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        probe.bind((socket.VMADDR_CID_ANY, 0xFFFFFFFF))
    except OSError as exc:
        pytest.skip(f"this host cannot bind AF_VSOCK: {exc}")
    finally:
        probe.close()
    with run_agent(agent_path, "--vsock", "52719") as (process, line):
        assert line == "popek-agent: protocol 1.0, listening on vsock:52719\n"
        assert process.poll() is None


@pytest.mark.parametrize("size", [0, 7, 1 << 16])
def test_struct_sizes_on_the_wire_match_the_c_side(agent: RunningAgent, work: Path, size: int) -> None:
    # INFO is the C side's put_record: 28 bytes, st_mode with the type bits, sizes and times as stat has them
    (work / "f").write_bytes(b"a" * size)
    frames = exchange(agent, protocol.Hello().encode() + FileRequest(FrameType.STAT, os.fsencode(work / "f")).encode())
    assert [f.type for f in frames] == [FrameType.HELLO, FrameType.INFO, FrameType.OK]
    mode, uid, gid, length, mtime_ns = struct.unpack("<IIIQq", frames[1].payload)
    local = (work / "f").stat()
    assert (mode, uid, gid, length, mtime_ns) == (local.st_mode, local.st_uid, local.st_gid, size, local.st_mtime_ns)


@pytest.mark.skipif(not _WITHOUT_HOST_CAPS, reason="not root, or no setpriv: the agent cannot set the clock anyway")
def test_the_host_run_agent_cannot_set_the_hosts_clock(agent: RunningAgent) -> None:
    from popek.agent.errors import RemoteError

    with pytest.raises(RemoteError, match="CLOCK_REALTIME"):
        agent.client.refresh(time_ns=time.time_ns())  # the current time: harmless even if the drop failed


def test_a_refresh_for_a_mac_no_interface_has_is_enodev_and_changes_nothing(agent: RunningAgent) -> None:
    """The MAC step looks for the snapshot's address among the interfaces: one the host has none of (a locally
    administered address popek never hands out as a clone's old MAC) is ENODEV, and no interface changes."""
    from popek.agent.errors import RemoteError

    before = {p.name: (p / "address").read_text() for p in Path("/sys/class/net").iterdir()}
    with pytest.raises(RemoteError, match="find the interface with the snapshot's MAC") as caught:
        agent.client.refresh(mac=(bytes.fromhex("fe0000c0ffee"), bytes.fromhex("020000c0ffee")))
    assert caught.value.errno == errno.ENODEV
    assert {p.name: (p / "address").read_text() for p in Path("/sys/class/net").iterdir()} == before
