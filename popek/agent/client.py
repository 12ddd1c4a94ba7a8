"""The host side of popek's guest agent (docs/agent-protocol.md): run commands, move files, check readiness,
refresh a clone restored from a snapshot (its clock, its RNG).

``AgentClient(connect)`` takes a factory of connected sockets, so the transport is the caller's: a VM's vsock
device through Firecracker's convention (``vsock_unix_connector``), a plain Unix socket or loopback TCP (the
agent run as a host process in tests), AF_VSOCK itself. Every call opens a connection of its own (one operation
per connection, as the protocol has it), so one client serves any number of threads at once.

Memory stays bounded by what the caller keeps: frames are read in bounded pieces (protocol.FrameReader), output
given to callbacks is not kept, stdin is sent within the agent's credit, and a Process buffers at most
``max_buffered`` bytes of unread output before it stops reading (the agent then stalls the child).
"""

from __future__ import annotations

import collections
import contextlib
import errno as errno_names
import io
import os
import re
import select
import signal as signals
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from popek.agent import protocol
from popek.agent.errors import (
    AgentDisconnected,
    AgentError,
    AgentUnavailable,
    CommandFailed,
    CommandStartError,
    CommandTimeout,
    InvalidRequest,
    ProtocolError,
    RemoteError,
    RemoteFileError,
    UnreadOutput,
)
from popek.agent.protocol import ErrorKind, ExitStatus, FileRequest, FrameType

Connector = Callable[[], socket.socket]
PathLike = str | bytes | os.PathLike[str] | os.PathLike[bytes]
Command = str | bytes | Sequence[str | bytes]
OutputCallback = Callable[[bytes], object]

DEFAULT_TIMEOUT = 10.0
RECV_SIZE = 256 << 10
DEFAULT_MAX_BUFFERED = 16 << 20
_HANDSHAKE_LINE = re.compile(rb"OK [0-9]{1,10}\n")


# ---------------------------------------------------------------------------------------------------------------
# transports


def unix_connector(path: str | os.PathLike[str], timeout: float = 5.0) -> Connector:
    """Connections to an agent listening on a Unix socket (``popek-agent --unix PATH``)."""

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
        except BaseException:
            sock.close()
            raise
        return sock

    return connect


def tcp_connector(host: str, port: int, timeout: float = 5.0) -> Connector:
    """Connections to an agent listening on loopback TCP (``popek-agent --tcp HOST:PORT``)."""
    return lambda: socket.create_connection((host, port), timeout=timeout)


def vsock_connector(cid: int, port: int, timeout: float = 5.0) -> Connector:
    """Connections over AF_VSOCK itself, for a VM whose vsock device is the kernel's vhost-vsock."""

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect((cid, port))
        except BaseException:
            sock.close()
            raise
        return sock

    return connect


def vsock_unix_connector(uds_path: str | os.PathLike[str], port: int, timeout: float = 5.0) -> Connector:
    """Connections to guest vsock port ``port`` through a VMM's Unix socket, as Firecracker's vsock device has
    them: connect, send ``CONNECT <port>\\n``, read ``OK <host port>\\n``; the stream is then the guest's.
    A refusal (the VMM closes the connection: nothing listens on that port yet) or no answer within timeout is
    AgentUnavailable."""
    if not 0 <= port < 1 << 32:
        raise InvalidRequest(f"vsock port {port} is out of range")

    def connect() -> socket.socket:
        sock = unix_connector(uds_path, timeout)()
        try:
            sock.sendall(f"CONNECT {port}\n".encode())
            line = b""
            while not line.endswith(b"\n"):
                if len(line) >= 32:
                    raise AgentUnavailable(f"the vsock device answered CONNECT {port} with {line!r}...")
                try:
                    byte = sock.recv(1)  # one byte at a time: what follows the line is the guest's
                except TimeoutError as exc:
                    raise AgentUnavailable(
                        f"the vsock device did not answer CONNECT {port} within {timeout} s"
                    ) from exc
                if not byte:
                    raise AgentUnavailable(
                        f"the vsock device closed the connection to guest port {port}: nothing listens there (yet), "
                        "or the guest did not answer in time"
                    )
                line += byte
            if not _HANDSHAKE_LINE.fullmatch(line):
                raise AgentUnavailable(f"the vsock device answered CONNECT {port} with {line!r}")
        except BaseException:
            sock.close()
            raise
        return sock

    return connect


# ---------------------------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class ExecResult:
    """How a command ended: exit_code (None if a signal killed it) or signal; the output the host kept (empty
    for a stream given to a callback); whether its timeout fired; its run time in the guest."""

    stdout: bytes
    stderr: bytes
    exit_code: int | None
    signal: int | None
    duration: float
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @property
    def status(self) -> int:
        """The exit status a shell reports for it: 124 for a timeout, as timeout(1) reports one (the agent's kill at
        the deadline is a signal too, but the timeout is the cause), 128+N for signal N, else the exit code."""
        if self.timed_out:
            return 124
        if self.signal is not None:
            return 128 + self.signal
        return (self.exit_code or 0) & 0xFF

    def check(self) -> ExecResult:
        """self, or CommandTimeout / CommandFailed."""
        if self.timed_out:
            raise CommandTimeout(f"the command timed out after {self.duration:.3f} s and was killed", self)
        if self.signal is not None:
            name = signals.Signals(self.signal).name if self.signal in signals.Signals._value2member_map_ else ""
            raise CommandFailed(f"the command was killed by signal {self.signal} {name}".rstrip(), self)
        if self.exit_code != 0:
            raise CommandFailed(f"the command exited with status {self.exit_code}", self)
        return self


@dataclass(frozen=True)
class FileInfo:
    """A file as the guest's stat describes it; ``mode`` is st_mode (type bits included)."""

    name: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def permissions(self) -> int:
        return stat.S_IMODE(self.mode)

    @property
    def mtime(self) -> float:
        return self.mtime_ns / 1e9

    @classmethod
    def from_record(cls, name: bytes, record: protocol.FileRecord) -> FileInfo:
        return cls(os.fsdecode(name), record.mode, record.uid, record.gid, record.size, record.mtime_ns)


# ---------------------------------------------------------------------------------------------------------------
# one connection


def _error_for(reply: protocol.ErrorReply, *, path: bytes | None = None, starting: bool = False) -> AgentError:
    name = errno_names.errorcode.get(reply.errno)
    message = f"{reply.message} [{name}]" if name else reply.message
    if reply.kind in (ErrorKind.PROTOCOL, ErrorKind.VERSION):
        return ProtocolError(f"the agent refused the request: {message}")
    if reply.kind == ErrorKind.BUSY:
        return AgentUnavailable(message)
    if reply.kind == ErrorKind.OS and path is not None:
        return RemoteFileError(message, kind=reply.kind, errno=reply.errno, path=path)
    if reply.kind == ErrorKind.OS and starting:
        return CommandStartError(message, kind=reply.kind, errno=reply.errno)
    return RemoteError(message, kind=reply.kind, errno=reply.errno)


def _unexpected(frame: protocol.Frame, during: str) -> ProtocolError:
    try:
        name = FrameType(frame.type).name
    except ValueError:
        name = f"type {frame.type:#x}"
    return ProtocolError(f"the agent sent {name} during {during}")


class _Channel:
    """A connected, non-blocking socket and its frame reader. Waits are poll()s with deadlines."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self.reader = protocol.FrameReader()
        sock.setblocking(False)
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> _Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def deadline(self) -> float:
        return time.monotonic() + self.timeout

    def wait(self, events: int, deadline: float | None) -> int:
        """The events that are ready (0 when the deadline passed). One thread at a time (the reading one)."""
        self._poll.modify(self.sock, events)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
        ready = self._poll.poll(timeout)
        return ready[0][1] if ready else 0

    def wait_writable(self, deadline: float) -> bool:
        """For a thread other than the reading one (a poll object serves one poll() call at a time)."""
        poller = select.poll()
        poller.register(self.sock, select.POLLOUT)
        return bool(poller.poll(max(0.0, deadline - time.monotonic()) * 1000))

    def receive(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            raise AgentDisconnected(f"the connection to the agent failed: {exc}") from exc
        if not data:
            raise AgentDisconnected("the agent closed the connection in the middle of the operation")
        self.reader.feed(data)

    def send_some(self, data: bytearray) -> None:
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            return
        except OSError as exc:
            raise AgentDisconnected(f"the connection to the agent failed: {exc}") from exc
        del data[:sent]

    def recv_frame(self, deadline: float | None) -> protocol.Frame:
        while (frame := self.reader.next_frame()) is None:
            if not self.wait(select.POLLIN, deadline):
                raise AgentUnavailable(f"the agent did not answer within {self.timeout} s")
            self.receive()
        return frame

    def send_all(self, data: bytes, deadline: float | None, *, watch: bool = False) -> protocol.Frame | None:
        """Send data; with watch, stop early and return a frame the agent sends meanwhile (an ERROR)."""
        pending = bytearray(data)
        while pending:
            ready = self.wait(select.POLLOUT | (select.POLLIN if watch else 0), deadline)
            if not ready:
                raise AgentUnavailable(f"the agent did not take data for {self.timeout} s")
            if watch and ready & (select.POLLIN | select.POLLHUP | select.POLLERR):
                try:
                    self.receive()
                finally:  # an ERROR the agent sent before it closed is the news, not the closing
                    if (frame := self.reader.next_frame()) is not None:
                        return frame  # noqa: B012
            if ready & select.POLLOUT:
                self.send_some(pending)
        return None


# ---------------------------------------------------------------------------------------------------------------
# a running command


class _ExecSession:
    """One EXEC connection after STARTED: stdin out within credit, output and EXIT in (docs: "EXEC")."""

    def __init__(self, channel: _Channel, started: protocol.Started) -> None:
        self.channel = channel
        self.pid = started.pid
        self.credit = started.stdin_window
        self.exit: ExitStatus | None = None
        self.on_stdout: OutputCallback = lambda data: None
        self.on_stderr: OutputCallback = lambda data: None
        self.stdin_source: Callable[[int], bytes] | None = None  # pulled when stdin runs dry; b"" = end
        self._stdin = bytearray()
        self._stdin_eof = False
        self._eof_sent = False
        self._outgoing = bytearray()
        self._send_lock = threading.Lock()

    # -- the host's side of the stream

    def queue_stdin(self, data: bytes) -> None:
        with self._send_lock:
            if self._stdin_eof:
                raise InvalidRequest("the process's stdin is already closed")
            self._stdin += data

    def queue_eof(self) -> None:
        with self._send_lock:
            self._stdin_eof = True

    def stdin_sent(self) -> bool:
        """Everything queued for stdin has left (in frames on the connection)."""
        with self._send_lock:
            return not self._stdin and not self._outgoing and (self._eof_sent or not self._stdin_eof)

    def send_control(self, frame: bytes) -> None:
        """SIGNAL, RESIZE: sent now, whatever else the session is doing (the agent always reads)."""
        deadline = self.channel.deadline()
        with self._send_lock:
            self._outgoing += frame
        while True:
            with self._send_lock:
                if not self._outgoing:
                    return
                self.channel.send_some(self._outgoing)
                if not self._outgoing:
                    return
            if not self.channel.wait_writable(deadline):
                raise AgentUnavailable(f"the agent did not take a control frame within {self.channel.timeout} s")

    def _frame_stdin(self) -> None:
        """Cut queued stdin into STDIN frames within the credit (caller holds the send lock)."""
        while len(self._outgoing) < 2 * protocol.CHUNK and self.credit > 0 and not self._eof_sent:
            if not self._stdin and self.stdin_source is not None and not self._stdin_eof:
                chunk = self.stdin_source(min(self.credit, protocol.CHUNK))
                if chunk:
                    self._stdin += chunk
                else:
                    self._stdin_eof = True
            if not self._stdin:
                break
            take = min(len(self._stdin), self.credit, protocol.CHUNK)
            self._outgoing += protocol.encode_frame(FrameType.STDIN, bytes(self._stdin[:take]))
            del self._stdin[:take]
            self.credit -= take
        if self._stdin_eof and not self._stdin and not self._eof_sent and self.exit is None:
            self._outgoing += protocol.encode_frame(FrameType.STDIN_EOF)
            self._eof_sent = True

    # -- the loop

    def pump(
        self, until: Callable[[], bool], deadline: float | None, can_read: Callable[[], bool] = lambda: True
    ) -> bool:
        """Move bytes both ways until until() holds (True), the deadline passes or nothing can move (False)."""
        if can_read():
            self._dispatch()  # frames that came in with an earlier one (STARTED's recv may hold the whole run)
        while not until():
            with self._send_lock:
                if self.exit is None:
                    self._frame_stdin()
                want_write = bool(self._outgoing)
            reading = can_read()
            if not reading and not want_write:
                return False
            ready = self.channel.wait(
                (select.POLLIN if reading else 0) | (select.POLLOUT if want_write else 0), deadline
            )
            if not ready:
                return False
            if ready & select.POLLOUT:
                with self._send_lock:
                    self.channel.send_some(self._outgoing)
            if reading and ready & (select.POLLIN | select.POLLHUP | select.POLLERR):
                self.channel.receive()
                self._dispatch()
        return True

    def _dispatch(self) -> None:
        while (frame := self.channel.reader.next_frame()) is not None:
            if self.exit is not None:
                raise _unexpected(frame, "EXEC after EXIT")
            if frame.type == FrameType.STDOUT:
                self.on_stdout(frame.payload)
            elif frame.type == FrameType.STDERR:
                self.on_stderr(frame.payload)
            elif frame.type == FrameType.CREDIT:
                self.credit += protocol.decode_u32("CREDIT", frame.payload)
            elif frame.type == FrameType.EXIT:
                self.exit = ExitStatus.decode(frame.payload)
            elif frame.type == FrameType.ERROR:
                raise _error_for(protocol.ErrorReply.decode(frame.payload))
            else:
                raise _unexpected(frame, "EXEC")

    def result(self, stdout: bytes, stderr: bytes) -> ExecResult:
        assert self.exit is not None
        return ExecResult(
            stdout=stdout,
            stderr=stderr,
            exit_code=self.exit.exit_code,
            signal=self.exit.signal,
            duration=self.exit.duration_ns / 1e9,
            timed_out=self.exit.timed_out,
        )

    def close(self) -> None:
        self.channel.close()


class Process:
    """A command started by AgentClient.spawn. Its output waits in a bounded buffer until read() takes it (or
    wait() collects it); write() and close_stdin() feed its stdin; kill() and resize() act at once, from any
    thread. Closing it (or leaving its with block) before it has exited makes the agent kill it."""

    def __init__(self, session: _ExecSession, max_buffered: int) -> None:
        self._session = session
        self.pid = session.pid
        self.max_buffered = max_buffered
        self._chunks: collections.deque[tuple[str, bytes]] = collections.deque()
        self._buffered = 0
        self._lock = threading.RLock()
        self._result: ExecResult | None = None
        session.on_stdout = lambda data: self._keep("stdout", data)
        session.on_stderr = lambda data: self._keep("stderr", data)

    def _keep(self, stream: str, data: bytes) -> None:
        self._chunks.append((stream, data))
        self._buffered += len(data)

    def _room(self) -> bool:
        return self._buffered < self.max_buffered

    @staticmethod
    def _deadline(timeout: float | None) -> float | None:
        return None if timeout is None else time.monotonic() + timeout

    def write(self, data: bytes, timeout: float | None = None) -> None:
        """Send data to the process's stdin; returns once it has left for the agent. Stdin the process no
        longer reads (it exited) is dropped, as the agent does."""
        with self._lock:
            self._session.queue_stdin(data)
            self._send_stdin(timeout)

    def close_stdin(self, timeout: float | None = None) -> None:
        """End the process's stdin (with a pty: send the terminal's EOF character)."""
        with self._lock:
            self._session.queue_eof()
            self._send_stdin(timeout)

    def _send_stdin(self, timeout: float | None) -> None:
        session = self._session
        if session.pump(lambda: session.stdin_sent() or session.exit is not None, self._deadline(timeout), self._room):
            return
        if not self._room():
            raise UnreadOutput(
                f"process {self.pid} waits for its {self._buffered} bytes of output to be read before it "
                "takes more stdin: read() it first (or raise max_buffered)"
            )
        raise CommandTimeout(f"process {self.pid} did not take its stdin within {timeout} s")

    def read(self, timeout: float | None = None) -> tuple[str, bytes] | None:
        """The next piece of output as ("stdout" | "stderr", data), or None once the process has exited and all
        its output has been read. CommandTimeout if nothing comes within timeout."""
        with self._lock:
            session = self._session
            if not self._chunks and session.exit is None:
                session.pump(lambda: bool(self._chunks) or session.exit is not None, self._deadline(timeout))
            if self._chunks:
                stream, data = self._chunks.popleft()
                self._buffered -= len(data)
                return stream, data
            if session.exit is not None:
                return None
            raise CommandTimeout(f"process {self.pid} wrote nothing within {timeout} s")

    def kill(self, sig: int = signals.SIGKILL) -> None:
        """Send signal sig to the process's group (a no-op once it has exited)."""
        if self._session.exit is None:
            self._session.send_control(protocol.u32_frame(FrameType.SIGNAL, int(sig)))

    def resize(self, rows: int, cols: int) -> None:
        """Set the size of the process's pty (ignored by the agent without one)."""
        if self._session.exit is None:
            self._session.send_control(protocol.resize_frame(rows, cols))

    def poll(self) -> ExecResult | None:
        """The result if the process has exited (its unread output included), else None, without waiting."""
        with self._lock:
            if self._result is None and self._session.exit is None:
                self._session.pump(lambda: self._session.exit is not None, time.monotonic(), self._room)
            return self.wait() if self._session.exit is not None else None

    def wait(self, timeout: float | None = None) -> ExecResult:
        """Wait for the process to exit; the result holds the output read() has not taken. CommandTimeout if
        it still runs after timeout (it keeps running: wait again, or kill it)."""
        with self._lock:
            if self._result is not None:
                return self._result
            session = self._session
            if not session.pump(lambda: session.exit is not None, self._deadline(timeout)):
                raise CommandTimeout(f"process {self.pid} still runs after {timeout} s")
            stdout = b"".join(data for stream, data in self._chunks if stream == "stdout")
            stderr = b"".join(data for stream, data in self._chunks if stream == "stderr")
            self._chunks.clear()
            self._buffered = 0
            self._result = session.result(stdout, stderr)
            session.close()
            return self._result

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------
# the client


def _encode_path(path: PathLike) -> bytes:
    return os.fsencode(path)


def _encode_word(word: str | bytes) -> bytes:
    return word if isinstance(word, bytes) else os.fsencode(word)


def _stdin_reader(stdin: bytes | IO[bytes]) -> Callable[[int], bytes]:
    if isinstance(stdin, bytes | bytearray | memoryview):
        view = memoryview(stdin)
        position = 0

        def take(n: int) -> bytes:
            nonlocal position
            chunk = bytes(view[position : position + n])
            position += len(chunk)
            return chunk

        return take
    return lambda n: stdin.read(n) or b""


class AgentClient:
    """popek's guest agent, reached through connect() (see the *_connector functions). timeout bounds every
    wait for the agent except a command's run: connecting, the handshake, each frame of a file transfer."""

    def __init__(self, connect: Connector, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._connect = connect
        self.timeout = timeout
        self.files = Files(self)

    # -- connections

    def _open(self, request: bytes) -> _Channel:
        """A connection past the handshake, request sent (protocol: "A connection"); closed if that fails."""
        try:
            sock = self._connect()
        except AgentError:
            raise
        except OSError as exc:
            raise AgentUnavailable(f"cannot connect to the agent: {exc}") from exc
        channel = _Channel(sock, self.timeout)
        try:
            deadline = channel.deadline()
            try:
                channel.send_all(protocol.Hello().encode() + request, deadline)
                frame = channel.recv_frame(deadline)
            except AgentDisconnected as exc:
                raise AgentUnavailable(f"the agent closed the connection during the handshake ({exc})") from exc
            if frame.type == FrameType.ERROR:
                raise _error_for(protocol.ErrorReply.decode(frame.payload))
            if frame.type != FrameType.HELLO:
                raise _unexpected(frame, "the handshake")
            hello = protocol.Hello.decode(frame.payload)
            if hello.major != protocol.VERSION_MAJOR:
                ours = f"{protocol.VERSION_MAJOR}.{protocol.VERSION_MINOR}"
                with contextlib.suppress(AgentError):
                    reply = protocol.ErrorReply(ErrorKind.VERSION, 0, f"the host speaks protocol {ours}")
                    channel.send_all(reply.encode(), time.monotonic() + 1)
                raise ProtocolError(f"the agent speaks protocol {hello.major}.{hello.minor}; popek speaks {ours}")
        except BaseException:
            channel.close()
            raise
        return channel

    @contextlib.contextmanager
    def _request(self, request: bytes) -> Iterator[_Channel]:
        with self._open(request) as channel:
            yield channel

    def ping(self) -> float:
        """Round-trip time of a PING, in seconds; AgentUnavailable if the agent does not answer."""
        started = time.monotonic()
        with self._request(protocol.encode_frame(FrameType.PING)) as channel:
            frame = channel.recv_frame(channel.deadline())
            if frame.type == FrameType.ERROR:
                raise _error_for(protocol.ErrorReply.decode(frame.payload))
            if frame.type != FrameType.OK:
                raise _unexpected(frame, "PING")
        return time.monotonic() - started

    def refresh(
        self, *, time_ns: int | None = None, entropy: bytes | None = None, mac: tuple[bytes, bytes] | None = None
    ) -> None:
        """REFRESH (docs/agent-protocol.md): make a guest restored from a snapshot differ from its sibling clones
        before anything runs in it. time_ns sets the guest's CLOCK_REALTIME (ns since the Unix epoch, e.g.
        time.time_ns()); entropy (1..512 bytes, e.g. os.urandom(64)) is mixed into the guest kernel's input pool,
        which the CRNG then reseeds from at once (otherwise clones share the CRNG state until Linux's next
        periodic reseed); mac (old, new) gives the interface whose address is old the address new (a clone's
        virtio-net device reports its own MAC, but Linux read the snapshot's at probe time and keeps it).
        InvalidRequest before anything is sent for values the protocol cannot carry; RemoteError (kind OS, the
        guest's errno; ENODEV when no interface has the old MAC) naming the step that failed in the guest."""
        request = protocol.RefreshRequest(
            time_ns=time_ns,
            entropy=bytes(entropy) if isinstance(entropy, bytearray | memoryview) else entropy,
            mac=mac,
        )
        with self._request(request.encode()) as channel:
            frame = channel.recv_frame(channel.deadline())
            if frame.type == FrameType.ERROR:
                raise _error_for(protocol.ErrorReply.decode(frame.payload))
            if frame.type != FrameType.OK:
                raise _unexpected(frame, "REFRESH")

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.05) -> float:
        """PING until the agent answers (e.g. while the guest boots): the seconds it took; AgentUnavailable."""
        started = time.monotonic()
        while True:
            try:
                self.ping()
                return time.monotonic() - started
            except (AgentUnavailable, AgentDisconnected) as exc:
                if time.monotonic() - started + interval > timeout:
                    raise AgentUnavailable(f"the agent did not answer within {timeout} s: {exc}") from exc
                time.sleep(interval)

    # -- commands

    @staticmethod
    def _exec_request(
        command: Command,
        env: Mapping[str | bytes, str | bytes | None] | None,
        clear_env: bool,
        cwd: PathLike | None,
        stdin: bool,
        timeout: float | None,
        kill_grace: float,
        pty: tuple[int, int] | None,
    ) -> protocol.ExecRequest:
        if isinstance(command, str | bytes):
            argv: tuple[bytes, ...] = ()
            shell: bytes | None = _encode_word(command)
        else:
            argv, shell = tuple(_encode_word(word) for word in command), None
        entries = []
        for name, value in (env or {}).items():
            key = _encode_word(name)
            if not key or b"=" in key:
                raise InvalidRequest(f"{key!r} cannot name an environment variable")
            entries.append(key if value is None else key + b"=" + _encode_word(value))
        if timeout is not None and timeout <= 0:
            raise InvalidRequest(f"a timeout of {timeout} s: give a positive number, or None for no timeout")
        return protocol.ExecRequest(
            argv=argv,
            shell=shell,
            env=tuple(entries),
            clear_env=clear_env,
            cwd=None if cwd is None else _encode_path(cwd),
            stdin=stdin,
            timeout_ms=0 if timeout is None else max(1, round(timeout * 1000)),
            kill_grace_ms=round(kill_grace * 1000),
            pty=pty,
        )

    def _start(self, request: protocol.ExecRequest) -> _ExecSession:
        """EXEC sent and STARTED received; CommandStartError (the connection closed) if the agent could not."""
        channel = self._open(request.encode())
        try:
            frame = channel.recv_frame(channel.deadline())
            if frame.type == FrameType.ERROR:
                raise _error_for(protocol.ErrorReply.decode(frame.payload), starting=True)
            if frame.type != FrameType.STARTED:
                raise _unexpected(frame, "EXEC")
            return _ExecSession(channel, protocol.Started.decode(frame.payload))
        except BaseException:
            channel.close()
            raise

    def exec(
        self,
        command: Command,
        *,
        env: Mapping[str | bytes, str | bytes | None] | None = None,
        clear_env: bool = False,
        cwd: PathLike | None = None,
        stdin: bytes | IO[bytes] | None = None,
        timeout: float | None = None,
        kill_grace: float = protocol.DEFAULT_KILL_GRACE_MS / 1000,
        pty: tuple[int, int] | None = None,
        on_stdout: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        check: bool = False,
    ) -> ExecResult:
        """Run a command to its end. command: a shell string (run by /bin/sh -c) or an argv sequence (looked up
        in the guest's PATH). env: variables to set (None: unset) in the agent's environment, or the whole
        environment with clear_env. stdin: bytes or a binary file read to its end (else /dev/null). timeout
        (seconds): the agent sends SIGTERM, then SIGKILL after kill_grace; the result says timed_out. pty:
        (rows, cols) for a pseudo-terminal (stdout then carries everything). on_stdout / on_stderr receive the
        output as it comes, and it is not kept in the result. check: raise CommandTimeout / CommandFailed
        instead of returning an unsuccessful result. CommandStartError if the command cannot be started."""
        request = self._exec_request(command, env, clear_env, cwd, stdin is not None, timeout, kill_grace, pty)
        stdout: list[bytes] = []
        stderr: list[bytes] = []
        session = self._start(request)
        try:
            session.on_stdout = on_stdout or stdout.append
            session.on_stderr = on_stderr or stderr.append
            if stdin is not None:
                session.stdin_source = _stdin_reader(stdin)
            # the agent ends the command by itself; this guards only against an agent that stops answering
            deadline = None if timeout is None else time.monotonic() + timeout + kill_grace + self.timeout
            if not session.pump(lambda: session.exit is not None, deadline):
                raise AgentUnavailable(
                    f"the agent did not report the command's end {kill_grace + self.timeout:.1f} s after its timeout"
                )
            result = session.result(b"".join(stdout), b"".join(stderr))
        finally:
            session.close()
        return result.check() if check else result

    def spawn(
        self,
        command: Command,
        *,
        env: Mapping[str | bytes, str | bytes | None] | None = None,
        clear_env: bool = False,
        cwd: PathLike | None = None,
        stdin: bool = True,
        timeout: float | None = None,
        kill_grace: float = protocol.DEFAULT_KILL_GRACE_MS / 1000,
        pty: tuple[int, int] | None = None,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
    ) -> Process:
        """Start a command and return at once (arguments as for exec; stdin: whether the host feeds it)."""
        request = self._exec_request(command, env, clear_env, cwd, stdin, timeout, kill_grace, pty)
        return Process(self._start(request), max_buffered)


# ---------------------------------------------------------------------------------------------------------------
# files


class Files:
    """File operations in the guest (AgentClient.files). Paths are str (encoded as os.fsencode does) or bytes
    (any byte but NUL); RemoteFileError carries the guest's errno."""

    def __init__(self, client: AgentClient) -> None:
        self._client = client

    def _final(self, channel: _Channel, path: bytes, during: str) -> int | None:
        frame = channel.recv_frame(channel.deadline())
        if frame.type == FrameType.ERROR:
            raise _error_for(protocol.ErrorReply.decode(frame.payload), path=path)
        if frame.type != FrameType.OK:
            raise _unexpected(frame, during)
        return protocol.decode_count(frame.payload)

    def read(self, path: PathLike, *, offset: int = 0, length: int | None = None) -> bytes:
        """The file's contents (from offset, at most length bytes)."""
        out = io.BytesIO()
        self.read_to(path, out, offset=offset, length=length)
        return out.getvalue()

    def read_to(self, path: PathLike, fileobj: IO[bytes], *, offset: int = 0, length: int | None = None) -> int:
        """Stream the file into fileobj, chunk by chunk; the number of bytes written."""
        request = FileRequest(FrameType.READ, _encode_path(path), offset=offset, length=length)
        total = 0
        with self._client._request(request.encode()) as channel:
            while True:
                frame = channel.recv_frame(channel.deadline())
                if frame.type == FrameType.DATA:
                    total += len(frame.payload)
                    if length is not None and total > length:
                        raise ProtocolError(f"the agent sent more than the {length} bytes asked for")
                    fileobj.write(frame.payload)
                    continue
                if frame.type == FrameType.ERROR:
                    raise _error_for(protocol.ErrorReply.decode(frame.payload), path=request.path)
                if frame.type != FrameType.OK:
                    raise _unexpected(frame, "READ")
                if protocol.decode_count(frame.payload) != total:
                    raise ProtocolError(f"the agent's READ ended with a count other than the {total} bytes sent")
                return total

    def write(
        self,
        path: PathLike,
        data: bytes | IO[bytes],
        mode: int = protocol.DEFAULT_FILE_MODE,
        *,
        append: bool = False,
        exclusive: bool = False,
    ) -> int:
        """Write data (bytes, or a binary file read to its end) to path, created if missing, replaced unless
        append, refused if it exists with exclusive; the file then has permissions mode. The agent fsyncs it
        before it answers. Returns the number of bytes written."""
        flags = protocol.WriteFlag.CREATE | (protocol.WriteFlag.APPEND if append else protocol.WriteFlag.TRUNCATE)
        if exclusive:
            flags |= protocol.WriteFlag.EXCLUSIVE
        request = FileRequest(FrameType.WRITE, _encode_path(path), flags=int(flags), mode=mode)
        source = _stdin_reader(data)
        total = 0
        with self._client._request(request.encode()) as channel:
            self._final(channel, request.path, "WRITE")  # opened
            while True:
                chunk = source(protocol.CHUNK)
                frame = protocol.encode_frame(FrameType.DATA if chunk else FrameType.DATA_END, chunk)
                answer = channel.send_all(frame, channel.deadline(), watch=True)
                if answer is not None:  # the agent stopped us half-way: an ERROR
                    if answer.type == FrameType.ERROR:
                        raise _error_for(protocol.ErrorReply.decode(answer.payload), path=request.path)
                    raise _unexpected(answer, "WRITE")
                if not chunk:
                    break
                total += len(chunk)
            if self._final(channel, request.path, "WRITE") != total:
                raise ProtocolError(f"the agent's WRITE ended with a count other than the {total} bytes sent")
        return total

    def list(self, path: PathLike) -> list[FileInfo]:
        """The directory's entries (not . and ..), sorted by name; symlinks described, not followed."""
        request = FileRequest(FrameType.LIST, _encode_path(path))
        entries: list[FileInfo] = []
        with self._client._request(request.encode()) as channel:
            while True:
                frame = channel.recv_frame(channel.deadline())
                if frame.type == FrameType.ENTRIES:
                    entries += (
                        FileInfo.from_record(name, record) for name, record in protocol.decode_entries(frame.payload)
                    )
                    continue
                if frame.type == FrameType.ERROR:
                    raise _error_for(protocol.ErrorReply.decode(frame.payload), path=request.path)
                if frame.type != FrameType.OK:
                    raise _unexpected(frame, "LIST")
                if protocol.decode_count(frame.payload) != len(entries):
                    raise ProtocolError("the agent's LIST ended with a count other than the entries it sent")
                return sorted(entries, key=lambda entry: os.fsencode(entry.name))

    def stat(self, path: PathLike, *, follow_symlinks: bool = True) -> FileInfo:
        flags = 0 if follow_symlinks else int(protocol.StatFlag.NOFOLLOW)
        request = FileRequest(FrameType.STAT, _encode_path(path), flags=flags)
        with self._client._request(request.encode()) as channel:
            frame = channel.recv_frame(channel.deadline())
            if frame.type == FrameType.ERROR:
                raise _error_for(protocol.ErrorReply.decode(frame.payload), path=request.path)
            if frame.type != FrameType.INFO:
                raise _unexpected(frame, "STAT")
            record = protocol.FileRecord.decode(frame.payload)
            self._final(channel, request.path, "STAT")
        return FileInfo.from_record(os.path.basename(request.path.rstrip(b"/")) or request.path, record)

    def remove(self, path: PathLike, recursive: bool = False) -> None:
        """Remove a file, a symlink or an empty directory; with recursive, a whole tree (symlinks not followed)."""
        flags = int(protocol.RemoveFlag.RECURSIVE) if recursive else 0
        request = FileRequest(FrameType.REMOVE, _encode_path(path), flags=flags)
        with self._client._request(request.encode()) as channel:
            self._final(channel, request.path, "REMOVE")

    def mkdir(self, path: PathLike, parents: bool = False, mode: int = protocol.DEFAULT_DIR_MODE) -> None:
        """Create a directory with permissions mode; with parents, the missing ones above it too (mkdir -p)."""
        flags = int(protocol.MkdirFlag.PARENTS) if parents else 0
        request = FileRequest(FrameType.MKDIR, _encode_path(path), flags=flags, mode=mode)
        with self._client._request(request.encode()) as channel:
            self._final(channel, request.path, "MKDIR")
