"""AgentClient against scripted peers on a Unix socket: Firecracker's vsock CONNECT handshake, version refusal in
both directions, an agent that is silent, busy or hostile. (The real agent is tests/integration/test_agent.py.)"""

from __future__ import annotations

import contextlib
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from popek.agent import (
    AgentClient,
    AgentUnavailable,
    InvalidRequest,
    ProtocolError,
    RemoteError,
    protocol,
    unix_connector,
    vsock_unix_connector,
)
from popek.agent.protocol import ErrorKind, FrameType

Script = Callable[[socket.socket], None]


@contextlib.contextmanager
def peer(script: Script, *, delay: float = 0.0) -> Iterator[Path]:
    """A Unix socket whose every connection is handed to script in a thread (after delay, the socket appears)."""
    folder = Path(tempfile.mkdtemp(prefix="popek-agent-"))
    path = folder / "s"
    stop = threading.Event()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def listen() -> None:
        listener.bind(str(path))
        listener.listen()
        listener.settimeout(0.05)

    if not delay:
        listen()

    def serve() -> None:
        if delay:
            time.sleep(delay)
            listen()
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)

            def handle(conn: socket.socket = conn) -> None:
                with conn, contextlib.suppress(OSError, EOFError):
                    script(conn)
                _readers.pop(id(conn), None)

            threading.Thread(target=handle, daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        path.unlink(missing_ok=True)
        folder.rmdir()


_readers: dict[int, protocol.FrameReader] = {}


def read_frame(conn: socket.socket) -> protocol.Frame:
    """The connection's next frame (one reader per connection: frames sent together are read together)."""
    reader = _readers.setdefault(id(conn), protocol.FrameReader())
    while (frame := reader.next_frame()) is None:
        data = conn.recv(4096)
        if not data:
            raise EOFError
        reader.feed(data)
    return frame


def agent_answering_ping(conn: socket.socket) -> None:
    assert read_frame(conn).type == FrameType.HELLO
    conn.sendall(protocol.Hello().encode())
    assert read_frame(conn).type == FrameType.PING
    conn.sendall(protocol.encode_frame(FrameType.OK))


def test_vsock_unix_connector_speaks_firecrackers_handshake() -> None:
    lines: list[bytes] = []

    def firecracker(conn: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\n"):
            line += conn.recv(1)
        lines.append(line)
        conn.sendall(b"OK 1073741824\n")
        agent_answering_ping(conn)  # the rest of the stream is the guest's

    with peer(firecracker) as path:
        client = AgentClient(vsock_unix_connector(path, 1024, timeout=2))
        assert client.ping() < 2
        assert client.ping() < 2
    assert lines == [b"CONNECT 1024\n", b"CONNECT 1024\n"]


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (None, "nothing listens there"),  # Firecracker closes the connection: no listener on that port
        (b"NO\n", "answered CONNECT 1024 with b'NO\\\\n'"),
        (b"OK 12x\n", "answered"),
        (b"O" * 100, "answered CONNECT 1024 with"),
        (b"", "did not answer CONNECT 1024 within 0.3 s"),  # silence
    ],
)
def test_vsock_handshake_failures_are_agent_unavailable(answer: bytes | None, match: str) -> None:
    def muxer(conn: socket.socket) -> None:
        conn.recv(64)
        if answer is None:
            return
        conn.sendall(answer)
        time.sleep(1)

    with peer(muxer) as path:
        client = AgentClient(vsock_unix_connector(path, 1024, timeout=0.3))
        started = time.monotonic()
        with pytest.raises(AgentUnavailable, match=match):
            client.ping()
        assert time.monotonic() - started < 1


def test_no_socket_is_agent_unavailable(tmp_path: Path) -> None:
    with pytest.raises(AgentUnavailable, match="cannot connect"):
        AgentClient(unix_connector(tmp_path / "missing")).ping()


def test_wait_ready_polls_until_the_agent_listens() -> None:
    with peer(agent_answering_ping, delay=0.3) as path:
        waited = AgentClient(unix_connector(path)).wait_ready(timeout=5, interval=0.02)
        assert 0.2 < waited < 5
    with pytest.raises(AgentUnavailable, match=r"did not answer within 0\.2 s"):
        AgentClient(unix_connector(path)).wait_ready(timeout=0.2, interval=0.02)


def test_another_major_version_is_refused_with_an_error_frame() -> None:
    refusals: list[protocol.ErrorReply] = []

    def future_agent(conn: socket.socket) -> None:
        read_frame(conn)
        conn.sendall(protocol.Hello(major=2, minor=7).encode())
        with contextlib.suppress(EOFError):
            while (frame := read_frame(conn)).type != FrameType.ERROR:
                pass
            refusals.append(protocol.ErrorReply.decode(frame.payload))

    with peer(future_agent) as path:
        with pytest.raises(ProtocolError, match=r"agent speaks protocol 2\.7; popek speaks 1\.0"):
            AgentClient(unix_connector(path)).ping()
        for _ in range(100):
            if refusals:
                break
            time.sleep(0.01)
    assert [(r.kind, r.message) for r in refusals] == [(ErrorKind.VERSION, "the host speaks protocol 1.0")]


def test_a_silent_agent_is_unavailable_after_the_clients_timeout() -> None:
    def silent(conn: socket.socket) -> None:
        time.sleep(2)

    with peer(silent) as path:
        started = time.monotonic()
        with pytest.raises(AgentUnavailable, match=r"did not answer within 0\.2 s"):
            AgentClient(unix_connector(path), timeout=0.2).ping()
        assert time.monotonic() - started < 1.5


def test_a_hostile_length_is_refused_without_reading_it() -> None:
    def hostile(conn: socket.socket) -> None:
        read_frame(conn)
        conn.sendall(struct.pack("<I", 0xFFFFFFFF) + b"\x01")
        time.sleep(1)

    with peer(hostile) as path, pytest.raises(ProtocolError, match=r"outside 1\.\.1048576"):
        AgentClient(unix_connector(path)).ping()


@pytest.mark.parametrize(
    ("reply", "error", "match"),
    [
        (protocol.ErrorReply(ErrorKind.BUSY, 0, "full").encode(), AgentUnavailable, "full"),
        (protocol.ErrorReply(ErrorKind.PROTOCOL, 0, "bad").encode(), ProtocolError, "refused the request: bad"),
        (protocol.encode_frame(FrameType.STDOUT, b"x"), ProtocolError, "sent STDOUT during the handshake"),
        (protocol.encode_frame(0x7F, b""), ProtocolError, "type 0x7f during the handshake"),
        (b"\x09\0\0\0\x01\x01\0", AgentUnavailable, "closed the connection during the handshake"),  # cut short
    ],
)
def test_handshake_answers_other_than_hello(reply: bytes, error: type[Exception], match: str) -> None:
    def agent(conn: socket.socket) -> None:
        read_frame(conn)
        conn.sendall(reply)

    with peer(agent) as path, pytest.raises(error, match=match):
        AgentClient(unix_connector(path)).ping()


def agent_answering_refresh(answer: bytes, seen: list[protocol.Request | None]) -> Script:
    def agent(conn: socket.socket) -> None:
        assert read_frame(conn).type == FrameType.HELLO
        conn.sendall(protocol.Hello().encode())
        seen.append(protocol.decode_request(read_frame(conn)))
        conn.sendall(answer)

    return agent


def test_refresh_sends_the_time_and_the_entropy_and_takes_ok() -> None:
    seen: list[protocol.Request | None] = []
    with peer(agent_answering_refresh(protocol.encode_frame(FrameType.OK), seen)) as path:
        client = AgentClient(unix_connector(path))
        client.refresh(time_ns=1_700_000_000_123_456_789, entropy=bytearray(b"\x00\xff" * 16))
        client.refresh(entropy=b"e")
        client.refresh()
    assert seen == [
        protocol.RefreshRequest(time_ns=1_700_000_000_123_456_789, entropy=b"\x00\xff" * 16),
        protocol.RefreshRequest(entropy=b"e"),
        protocol.RefreshRequest(),
    ]


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        (
            protocol.ErrorReply(ErrorKind.OS, 1, "REFRESH: cannot set CLOCK_REALTIME (clock_settime): no").encode(),
            RemoteError,
            r"clock_settime\): no \[EPERM\]",
        ),
        (protocol.ErrorReply(ErrorKind.PROTOCOL, 0, "TIME_NS has").encode(), ProtocolError, "refused the request"),
        (protocol.encode_frame(FrameType.INFO, b""), ProtocolError, "sent INFO during REFRESH"),
    ],
)
def test_refresh_failures_are_errors(answer: bytes, error: type[Exception], match: str) -> None:
    seen: list[protocol.Request | None] = []
    with peer(agent_answering_refresh(answer, seen)) as path, pytest.raises(error, match=match) as caught:
        AgentClient(unix_connector(path)).refresh(time_ns=5)
    if error is RemoteError:
        assert isinstance(caught.value, RemoteError)
        assert (caught.value.kind, caught.value.errno) == (ErrorKind.OS, 1)


def test_refresh_values_the_protocol_cannot_carry_are_refused_without_connecting() -> None:
    def connect() -> socket.socket:
        raise AssertionError("refresh connected for a request it cannot send")

    client = AgentClient(connect)
    with pytest.raises(InvalidRequest, match="513 bytes of entropy"):
        client.refresh(entropy=b"x" * 513)
    with pytest.raises(InvalidRequest, match="0 bytes of entropy"):
        client.refresh(entropy=b"")
    with pytest.raises(InvalidRequest, match="not a u64"):
        client.refresh(time_ns=-1)


@pytest.mark.parametrize(
    ("exit_code", "signum", "timed_out", "status"),
    [(0, None, False, 0), (3, None, False, 3), (256 + 7, None, False, 7), (None, 9, False, 137),
     (None, 15, True, 124), (None, 9, True, 124)],
)  # fmt: skip
def test_an_exec_results_status_is_what_a_shell_would_report(
    exit_code: int | None, signum: int | None, timed_out: bool, status: int
) -> None:
    """`popek run`, `popek exec` and `popek ssh` exit with it: timeout(1)'s 124 even though the agent's kill at the
    deadline is a signal, 128+N for a signal N, the exit code's low byte."""
    from popek.agent.client import ExecResult

    assert ExecResult(b"", b"", exit_code, signum, 0.0, timed_out).status == status
