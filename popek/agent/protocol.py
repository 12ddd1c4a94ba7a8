"""The guest agent protocol, host side: frames, TLVs and the messages of docs/agent-protocol.md (the
specification; the agent's C constants are popek/agent/guest/protocol.h, checked against these by the tests).

Everything a peer sends is bounded here before it is kept: FrameReader refuses a length over MAX_FRAME as soon
as the four length bytes are in, and every decoder raises only ProtocolError, whatever the bytes.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from popek.agent.errors import InvalidRequest, ProtocolError

VERSION_MAJOR = 1
VERSION_MINOR = 0

HEADER_SIZE = 4
MAX_FRAME = 1 << 20
CHUNK = 64 << 10
MAX_ARGS = 4096
MAX_ENV = 4096
MAX_STRING = 128 << 10
MAX_PATH = 4095
MAX_ENTROPY = 512  # the bytes of one REFRESH's ENTROPY
STDIN_WINDOW = 256 << 10
MAX_CONNECTIONS = 128  # the agent's; more are answered with ERROR BUSY
DEFAULT_KILL_GRACE_MS = 2000
DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755
FILE_RECORD_SIZE = 28
MAX_ERROR_MESSAGE = 4096  # what the host keeps of an ERROR's text (the agent sends at most 1 KiB)


class FrameType(enum.IntEnum):
    HELLO = 0x01
    ERROR = 0x02
    OK = 0x03
    PING = 0x10
    EXEC = 0x11
    READ = 0x12
    WRITE = 0x13
    LIST = 0x14
    STAT = 0x15
    REMOVE = 0x16
    MKDIR = 0x17
    REFRESH = 0x18
    STARTED = 0x20
    STDIN = 0x21
    STDIN_EOF = 0x22
    STDOUT = 0x23
    STDERR = 0x24
    SIGNAL = 0x25
    RESIZE = 0x26
    CREDIT = 0x27
    EXIT = 0x28
    DATA = 0x30
    DATA_END = 0x31
    INFO = 0x32
    ENTRIES = 0x33


TAG_CRITICAL = 0x8000


class Tag(enum.IntEnum):
    ARG = 0x8001
    SHELL = 0x8002
    ENV = 0x8003
    CLEAR_ENV = 0x8004
    CWD = 0x8005
    STDIN = 0x8006
    TIMEOUT_MS = 0x8007
    KILL_GRACE_MS = 0x0008
    PTY = 0x8009
    PATH = 0x8010
    OFFSET = 0x8011
    LENGTH = 0x8012
    MODE = 0x8013
    FLAGS = 0x8014
    TIME_NS = 0x8015
    ENTROPY = 0x8016
    MAC = 0x8017


class ErrorKind(enum.IntEnum):
    PROTOCOL = 1
    VERSION = 2
    OS = 3
    LIMIT = 4
    UNSUPPORTED = 5
    BUSY = 6


class WriteFlag(enum.IntFlag):
    CREATE = 1
    TRUNCATE = 2
    APPEND = 4
    EXCLUSIVE = 8


class StatFlag(enum.IntFlag):
    NOFOLLOW = 1


class RemoveFlag(enum.IntFlag):
    RECURSIVE = 1


class MkdirFlag(enum.IntFlag):
    PARENTS = 1


FILE_REQUESTS = (FrameType.READ, FrameType.WRITE, FrameType.LIST, FrameType.STAT, FrameType.REMOVE, FrameType.MKDIR)

# FLAGS bits each request knows (others are refused with UNSUPPORTED)
KNOWN_FLAGS: dict[FrameType, int] = {
    FrameType.WRITE: int(WriteFlag.CREATE | WriteFlag.TRUNCATE | WriteFlag.APPEND | WriteFlag.EXCLUSIVE),
    FrameType.STAT: int(StatFlag.NOFOLLOW),
    FrameType.REMOVE: int(RemoveFlag.RECURSIVE),
    FrameType.MKDIR: int(MkdirFlag.PARENTS),
}


@dataclass(frozen=True)
class TagRule:
    requests: frozenset[FrameType]
    repeatable: bool
    min_size: int
    max_size: int
    string: bool  # no NUL inside


_FILES = frozenset(FILE_REQUESTS)
TAG_RULES: dict[Tag, TagRule] = {
    Tag.ARG: TagRule(frozenset({FrameType.EXEC}), True, 0, MAX_STRING, True),
    Tag.SHELL: TagRule(frozenset({FrameType.EXEC}), False, 0, MAX_STRING, True),
    Tag.ENV: TagRule(frozenset({FrameType.EXEC}), True, 1, MAX_STRING, True),
    Tag.CLEAR_ENV: TagRule(frozenset({FrameType.EXEC}), False, 0, 0, False),
    Tag.CWD: TagRule(frozenset({FrameType.EXEC}), False, 1, MAX_PATH, True),
    Tag.STDIN: TagRule(frozenset({FrameType.EXEC}), False, 0, 0, False),
    Tag.TIMEOUT_MS: TagRule(frozenset({FrameType.EXEC}), False, 8, 8, False),
    Tag.KILL_GRACE_MS: TagRule(frozenset({FrameType.EXEC}), False, 4, 4, False),
    Tag.PTY: TagRule(frozenset({FrameType.EXEC}), False, 4, 4, False),
    Tag.PATH: TagRule(_FILES, False, 1, MAX_PATH, True),
    Tag.OFFSET: TagRule(frozenset({FrameType.READ}), False, 8, 8, False),
    Tag.LENGTH: TagRule(frozenset({FrameType.READ}), False, 8, 8, False),
    Tag.MODE: TagRule(frozenset({FrameType.WRITE, FrameType.MKDIR}), False, 4, 4, False),
    Tag.FLAGS: TagRule(frozenset(KNOWN_FLAGS), False, 4, 4, False),
    Tag.TIME_NS: TagRule(frozenset({FrameType.REFRESH}), False, 8, 8, False),
    Tag.ENTROPY: TagRule(frozenset({FrameType.REFRESH}), False, 1, MAX_ENTROPY, False),
    Tag.MAC: TagRule(frozenset({FrameType.REFRESH}), False, 12, 12, False),
}


# ---------------------------------------------------------------------------------------------------------------
# frames


@dataclass(frozen=True)
class Frame:
    type: int
    payload: bytes


_U32 = struct.Struct("<I")


def encode_frame(type: int, payload: bytes = b"") -> bytes:
    if len(payload) + 1 > MAX_FRAME:
        raise InvalidRequest(f"a frame of {len(payload) + 1} bytes is over the protocol's {MAX_FRAME}")
    return _U32.pack(len(payload) + 1) + bytes((type,)) + payload


class FrameReader:
    """Splits a byte stream into frames. It holds at most one partial frame plus what was fed last: a length
    over max_frame (or zero) is a ProtocolError as soon as its four bytes are in, before any payload is kept."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._start = 0

    def feed(self, data: bytes) -> None:
        if self._start:
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data

    def buffered(self) -> int:
        return len(self._buffer) - self._start

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes are fed."""
        available = len(self._buffer) - self._start
        if available < HEADER_SIZE:
            return None
        (length,) = _U32.unpack_from(self._buffer, self._start)
        if length == 0 or length > self.max_frame:
            raise ProtocolError(f"a frame length of {length} is outside 1..{self.max_frame}")
        if available < HEADER_SIZE + length:
            return None
        begin = self._start + HEADER_SIZE
        frame = Frame(self._buffer[begin], bytes(self._buffer[begin + 1 : begin + length]))
        self._start = begin + length
        return frame


# ---------------------------------------------------------------------------------------------------------------
# TLVs

_TLV = struct.Struct("<HI")


def encode_tlvs(items: Iterable[tuple[int, bytes]]) -> bytes:
    return b"".join(_TLV.pack(tag, len(value)) + value for tag, value in items)


def decode_tlvs(payload: bytes) -> list[tuple[int, bytes]]:
    items = []
    at = 0
    while at < len(payload):
        if len(payload) - at < _TLV.size:
            raise ProtocolError(f"a TLV header is cut short at byte {at}")
        tag, size = _TLV.unpack_from(payload, at)
        at += _TLV.size
        if size > len(payload) - at:
            raise ProtocolError(f"a TLV value runs past the frame at byte {at}")
        items.append((tag, payload[at : at + size]))
        at += size
    return items


def checked_tlvs(request: FrameType, payload: bytes) -> list[tuple[Tag, bytes]]:
    """The request's known TLVs in order, after the agent's checks (ProtocolError names the first broken one;
    an unknown critical tag or unknown FLAGS bit is an UNSUPPORTED ProtocolError, an oversized string LIMIT)."""
    seen: set[Tag] = set()
    known: list[tuple[Tag, bytes]] = []
    counts = {Tag.ARG: 0, Tag.ENV: 0}
    for raw_tag, value in decode_tlvs(payload):
        try:
            tag = Tag(raw_tag)
        except ValueError:
            tag = None
        rule = TAG_RULES.get(tag) if tag is not None else None
        if tag is None or rule is None or request not in rule.requests:
            if raw_tag & TAG_CRITICAL:
                raise ProtocolError(f"critical tag {raw_tag:#x} is not known in {request.name}")
            continue
        if not rule.repeatable:
            if tag in seen:
                raise ProtocolError(f"{tag.name} appears twice")
            seen.add(tag)
        if not rule.min_size <= len(value) <= rule.max_size:
            raise ProtocolError(
                f"{tag.name} has a value of {len(value)} bytes, outside {rule.min_size}..{rule.max_size}"
            )
        if rule.string and b"\0" in value:
            raise ProtocolError(f"{tag.name} holds a NUL byte")
        if tag in counts:
            counts[tag] += 1
            if counts[tag] > (MAX_ARGS if tag is Tag.ARG else MAX_ENV):
                raise ProtocolError(f"more than {MAX_ARGS if tag is Tag.ARG else MAX_ENV} {tag.name} items")
        if tag is Tag.ENV and value.startswith(b"="):
            raise ProtocolError("an ENV item has an empty name")
        if tag is Tag.MODE and _U32.unpack(value)[0] & ~0o7777:
            raise ProtocolError(f"MODE {_U32.unpack(value)[0]:#o} has bits outside 07777")
        if tag is Tag.FLAGS and _U32.unpack(value)[0] & ~KNOWN_FLAGS[request]:
            raise ProtocolError(f"FLAGS {_U32.unpack(value)[0]:#x} has bits {request.name} does not know")
        known.append((tag, value))
    return known


def _check_string(what: str, value: bytes, limit: int, *, empty: bool = True) -> bytes:
    if b"\0" in value:
        raise InvalidRequest(f"{what} cannot hold a NUL byte: {value[:60]!r}")
    if len(value) > limit:
        raise InvalidRequest(f"{what} is {len(value)} bytes, over the protocol's {limit}")
    if not empty and not value:
        raise InvalidRequest(f"{what} cannot be empty")
    return value


# ---------------------------------------------------------------------------------------------------------------
# fixed messages

_HELLO = struct.Struct("<HHI")
_ERROR = struct.Struct("<HI")
_STARTED = struct.Struct("<II")
_EXIT = struct.Struct("<BBHIQ")
_RESIZE = struct.Struct("<HH")
_U64 = struct.Struct("<Q")
_RECORD = struct.Struct("<IIIQq")
assert _RECORD.size == FILE_RECORD_SIZE


def _fixed(frame_name: str, layout: struct.Struct, payload: bytes) -> tuple[int, ...]:
    if len(payload) < layout.size:
        raise ProtocolError(f"{frame_name} needs {layout.size} bytes of payload, got {len(payload)}")
    return layout.unpack_from(payload)


@dataclass(frozen=True)
class Hello:
    major: int = VERSION_MAJOR
    minor: int = VERSION_MINOR
    max_frame: int = MAX_FRAME

    def encode(self) -> bytes:
        return encode_frame(FrameType.HELLO, _HELLO.pack(self.major, self.minor, self.max_frame))

    @classmethod
    def decode(cls, payload: bytes) -> Hello:
        return cls(*_fixed("HELLO", _HELLO, payload))


@dataclass(frozen=True)
class ErrorReply:
    kind: int
    errno: int
    message: str

    def encode(self) -> bytes:
        text = self.message.encode()[:1024]
        return encode_frame(FrameType.ERROR, _ERROR.pack(self.kind, self.errno) + text)

    @classmethod
    def decode(cls, payload: bytes) -> ErrorReply:
        kind, errno = _fixed("ERROR", _ERROR, payload)
        text = payload[_ERROR.size : _ERROR.size + MAX_ERROR_MESSAGE].decode("utf-8", "replace")
        return cls(kind, errno, text)


@dataclass(frozen=True)
class Started:
    pid: int
    stdin_window: int

    def encode(self) -> bytes:
        return encode_frame(FrameType.STARTED, _STARTED.pack(self.pid, self.stdin_window))

    @classmethod
    def decode(cls, payload: bytes) -> Started:
        return cls(*_fixed("STARTED", _STARTED, payload))


@dataclass(frozen=True)
class ExitStatus:
    """EXIT: exit_code for a child that exited, signal for one that was killed (exactly one is not None)."""

    exit_code: int | None
    signal: int | None
    timed_out: bool
    core_dumped: bool
    duration_ns: int

    def encode(self) -> bytes:
        how, value = (0, self.exit_code) if self.exit_code is not None else (1, self.signal)
        flags = int(self.timed_out) | int(self.core_dumped) << 1
        return encode_frame(FrameType.EXIT, _EXIT.pack(how, flags, 0, value or 0, self.duration_ns))

    @classmethod
    def decode(cls, payload: bytes) -> ExitStatus:
        how, flags, _reserved, value, duration = _fixed("EXIT", _EXIT, payload)
        if how == 0:
            if value > 255:
                raise ProtocolError(f"EXIT with an exit status of {value}")
            return cls(value, None, bool(flags & 1), bool(flags & 2), duration)
        if how == 1:
            if not 1 <= value <= 64:
                raise ProtocolError(f"EXIT with signal {value}")
            return cls(None, value, bool(flags & 1), bool(flags & 2), duration)
        raise ProtocolError(f"EXIT with an unknown 'how' of {how}")


def u32_frame(type: FrameType, value: int) -> bytes:
    """CREDIT, SIGNAL: one u32."""
    return encode_frame(type, _U32.pack(value))


def decode_u32(frame_name: str, payload: bytes) -> int:
    (value,) = _fixed(frame_name, _U32, payload)
    return value


def resize_frame(rows: int, cols: int) -> bytes:
    return encode_frame(FrameType.RESIZE, _RESIZE.pack(rows, cols))


def decode_count(payload: bytes) -> int | None:
    """OK's optional u64 count."""
    if not payload:
        return None
    (count,) = _fixed("OK", _U64, payload)
    return count


@dataclass(frozen=True)
class FileRecord:
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int

    def encode(self) -> bytes:
        return _RECORD.pack(self.mode, self.uid, self.gid, self.size, self.mtime_ns)

    @classmethod
    def decode(cls, payload: bytes) -> FileRecord:
        if len(payload) != FILE_RECORD_SIZE:
            raise ProtocolError(f"INFO needs {FILE_RECORD_SIZE} bytes of payload, got {len(payload)}")
        return cls(*_RECORD.unpack(payload))


def encode_entries(entries: Iterable[tuple[bytes, FileRecord]]) -> bytes:
    return b"".join(record.encode() + struct.pack("<H", len(name)) + name for name, record in entries)


def decode_entries(payload: bytes) -> list[tuple[bytes, FileRecord]]:
    """ENTRIES: (name, record) pairs; a name that could not be a directory entry is a ProtocolError."""
    entries = []
    at = 0
    while at < len(payload):
        if len(payload) - at < FILE_RECORD_SIZE + 2:
            raise ProtocolError(f"an ENTRIES record is cut short at byte {at}")
        record = FileRecord(*_RECORD.unpack_from(payload, at))
        (size,) = struct.unpack_from("<H", payload, at + FILE_RECORD_SIZE)
        at += FILE_RECORD_SIZE + 2
        name = payload[at : at + size]
        if len(name) != size:
            raise ProtocolError(f"an ENTRIES name runs past the frame at byte {at}")
        if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
            raise ProtocolError(f"ENTRIES has an impossible name {name[:60]!r}")
        at += size
        entries.append((name, record))
    return entries


# ---------------------------------------------------------------------------------------------------------------
# requests


@dataclass(frozen=True)
class ExecRequest:
    """EXEC: argv (looked up in PATH), or shell (a string for /bin/sh -c); env items are NAME=VALUE to set or
    NAME to unset, in order."""

    argv: tuple[bytes, ...] = ()
    shell: bytes | None = None
    env: tuple[bytes, ...] = ()
    clear_env: bool = False
    cwd: bytes | None = None
    stdin: bool = False
    timeout_ms: int = 0
    kill_grace_ms: int = DEFAULT_KILL_GRACE_MS
    pty: tuple[int, int] | None = None  # rows, cols

    def __post_init__(self) -> None:
        if (self.shell is None) == (not self.argv):
            raise InvalidRequest("a command is either an argv (a non-empty sequence) or a shell string")
        if len(self.argv) > MAX_ARGS:
            raise InvalidRequest(f"{len(self.argv)} arguments are over the protocol's {MAX_ARGS}")
        if len(self.env) > MAX_ENV:
            raise InvalidRequest(f"{len(self.env)} environment entries are over the protocol's {MAX_ENV}")
        for arg in self.argv:
            _check_string("an argument", arg, MAX_STRING)
        if self.shell is not None:
            _check_string("the shell command", self.shell, MAX_STRING)
        for entry in self.env:
            _check_string("an environment entry", entry, MAX_STRING, empty=False)
            if entry.startswith(b"="):
                raise InvalidRequest(f"an environment entry needs a name: {entry[:60]!r}")
        if self.cwd is not None:
            _check_string("the working directory", self.cwd, MAX_PATH, empty=False)
        if not 0 <= self.timeout_ms < 1 << 64 or not 0 <= self.kill_grace_ms < 1 << 32:
            raise InvalidRequest("a timeout or grace period out of range")
        if self.pty is not None and not all(0 <= n < 1 << 16 for n in self.pty):
            raise InvalidRequest(f"a pty size of {self.pty} rows and columns is out of range")

    def tlvs(self) -> list[tuple[int, bytes]]:
        items: list[tuple[int, bytes]] = [(Tag.ARG, arg) for arg in self.argv]
        if self.shell is not None:
            items.append((Tag.SHELL, self.shell))
        items += [(Tag.ENV, entry) for entry in self.env]
        if self.clear_env:
            items.append((Tag.CLEAR_ENV, b""))
        if self.cwd is not None:
            items.append((Tag.CWD, self.cwd))
        if self.stdin:
            items.append((Tag.STDIN, b""))
        if self.timeout_ms:
            items.append((Tag.TIMEOUT_MS, _U64.pack(self.timeout_ms)))
        if self.kill_grace_ms != DEFAULT_KILL_GRACE_MS:
            items.append((Tag.KILL_GRACE_MS, _U32.pack(self.kill_grace_ms)))
        if self.pty is not None:
            items.append((Tag.PTY, _RESIZE.pack(*self.pty)))
        return items

    def encode(self) -> bytes:
        return encode_frame(FrameType.EXEC, encode_tlvs(self.tlvs()))

    @classmethod
    def decode(cls, payload: bytes) -> ExecRequest:
        fields: dict[str, object] = {}
        argv: list[bytes] = []
        env: list[bytes] = []
        for tag, value in checked_tlvs(FrameType.EXEC, payload):
            if tag is Tag.ARG:
                argv.append(value)
            elif tag is Tag.ENV:
                env.append(value)
            elif tag is Tag.SHELL:
                fields["shell"] = value
            elif tag is Tag.CLEAR_ENV:
                fields["clear_env"] = True
            elif tag is Tag.CWD:
                fields["cwd"] = value
            elif tag is Tag.STDIN:
                fields["stdin"] = True
            elif tag is Tag.TIMEOUT_MS:
                fields["timeout_ms"] = _U64.unpack(value)[0]
            elif tag is Tag.KILL_GRACE_MS:
                fields["kill_grace_ms"] = _U32.unpack(value)[0]
            elif tag is Tag.PTY:
                fields["pty"] = _RESIZE.unpack(value)
        try:
            return cls(argv=tuple(argv), env=tuple(env), **fields)  # type: ignore[arg-type]
        except InvalidRequest as exc:
            raise ProtocolError(f"EXEC: {exc}") from exc


@dataclass(frozen=True)
class FileRequest:
    """READ, WRITE, LIST, STAT, REMOVE, MKDIR: a path and what the operation takes of offset, length, mode, flags."""

    op: FrameType
    path: bytes
    flags: int = 0
    mode: int | None = None
    offset: int = 0
    length: int | None = None

    def __post_init__(self) -> None:
        if self.op not in FILE_REQUESTS:
            raise InvalidRequest(f"{self.op!r} is not a file request")
        _check_string("a path", self.path, MAX_PATH, empty=False)
        if self.flags & ~KNOWN_FLAGS.get(self.op, 0):
            raise InvalidRequest(f"flags {self.flags:#x} are not {self.op.name} flags")
        if self.mode is not None and (self.op not in (FrameType.WRITE, FrameType.MKDIR) or self.mode & ~0o7777):
            raise InvalidRequest(f"mode {self.mode:#o} does not apply to {self.op.name}")
        if (self.offset or self.length is not None) and self.op is not FrameType.READ:
            raise InvalidRequest("an offset or a length applies to READ only")
        if not 0 <= self.offset < 1 << 64 or (self.length is not None and not 0 <= self.length < 1 << 64):
            raise InvalidRequest("an offset or a length out of range")

    def tlvs(self) -> list[tuple[int, bytes]]:
        items: list[tuple[int, bytes]] = [(Tag.PATH, self.path)]
        if self.offset:
            items.append((Tag.OFFSET, _U64.pack(self.offset)))
        if self.length is not None:
            items.append((Tag.LENGTH, _U64.pack(self.length)))
        if self.mode is not None:
            items.append((Tag.MODE, _U32.pack(self.mode)))
        if self.flags:
            items.append((Tag.FLAGS, _U32.pack(self.flags)))
        return items

    def encode(self) -> bytes:
        return encode_frame(self.op, encode_tlvs(self.tlvs()))

    @classmethod
    def decode(cls, op: FrameType, payload: bytes) -> FileRequest:
        fields: dict[str, object] = {}
        for tag, value in checked_tlvs(op, payload):
            if tag is Tag.PATH:
                fields["path"] = value
            elif tag is Tag.OFFSET:
                fields["offset"] = _U64.unpack(value)[0]
            elif tag is Tag.LENGTH:
                fields["length"] = _U64.unpack(value)[0]
            elif tag is Tag.MODE:
                fields["mode"] = _U32.unpack(value)[0]
            elif tag is Tag.FLAGS:
                fields["flags"] = _U32.unpack(value)[0]
        if "path" not in fields:
            raise ProtocolError(f"{op.name} has no PATH")
        try:
            return cls(op=op, **fields)  # type: ignore[arg-type]
        except InvalidRequest as exc:
            raise ProtocolError(f"{op.name}: {exc}") from exc


@dataclass(frozen=True)
class RefreshRequest:
    """REFRESH: what a guest restored from a snapshot needs to be a clone of its own (docs/agent-protocol.md,
    "REFRESH"): time_ns, the CLOCK_REALTIME to set (ns since the Unix epoch); entropy, 1..MAX_ENTROPY bytes the
    agent mixes into the kernel's input pool before it reseeds the CRNG; mac, (old, new): the interface whose
    address is old (the snapshot's) gets new, the clone's own, which its virtio-net device now reports. Any may
    be left out."""

    time_ns: int | None = None
    entropy: bytes | None = None
    mac: tuple[bytes, bytes] | None = None

    def __post_init__(self) -> None:
        if self.time_ns is not None and (
            not isinstance(self.time_ns, int) or isinstance(self.time_ns, bool) or not 0 <= self.time_ns < 1 << 64
        ):
            raise InvalidRequest(f"a time of {self.time_ns!r} ns is not a u64 count of nanoseconds since the epoch")
        if self.entropy is not None:
            if not isinstance(self.entropy, bytes):
                raise InvalidRequest(f"entropy is bytes, not {type(self.entropy).__name__}")
            if not 1 <= len(self.entropy) <= MAX_ENTROPY:
                raise InvalidRequest(f"{len(self.entropy)} bytes of entropy are outside 1..{MAX_ENTROPY}")
        if self.mac is not None:
            if (
                not isinstance(self.mac, tuple)
                or len(self.mac) != 2
                or not all(isinstance(m, bytes) and len(m) == 6 for m in self.mac)
            ):
                raise InvalidRequest(f"a MAC change is (old, new), two 6-byte addresses, not {self.mac!r}")
            if self.mac[1][0] & 1 or self.mac[1] == bytes(6):
                raise InvalidRequest(f"{self.mac[1].hex(':')} is not a unicast address an interface can take")

    def tlvs(self) -> list[tuple[int, bytes]]:
        items: list[tuple[int, bytes]] = []
        if self.time_ns is not None:
            items.append((Tag.TIME_NS, _U64.pack(self.time_ns)))
        if self.entropy is not None:
            items.append((Tag.ENTROPY, self.entropy))
        if self.mac is not None:
            items.append((Tag.MAC, self.mac[0] + self.mac[1]))
        return items

    def encode(self) -> bytes:
        return encode_frame(FrameType.REFRESH, encode_tlvs(self.tlvs()))

    @classmethod
    def decode(cls, payload: bytes) -> RefreshRequest:
        time_ns: int | None = None
        entropy: bytes | None = None
        mac: tuple[bytes, bytes] | None = None
        for tag, value in checked_tlvs(FrameType.REFRESH, payload):  # sizes: TAG_RULES, as the agent has them
            if tag is Tag.TIME_NS:
                (time_ns,) = _U64.unpack(value)
            elif tag is Tag.ENTROPY:
                entropy = value
            elif tag is Tag.MAC:
                mac = (value[:6], value[6:])
        try:
            return cls(time_ns=time_ns, entropy=entropy, mac=mac)
        except InvalidRequest as exc:
            raise ProtocolError(f"REFRESH: {exc}") from exc


Request = ExecRequest | FileRequest | RefreshRequest


def decode_request(frame: Frame) -> Request | None:
    """A request frame as the agent reads it (None for PING); ProtocolError for anything else."""
    if frame.type == FrameType.PING:
        return None
    if frame.type == FrameType.REFRESH:
        return RefreshRequest.decode(frame.payload)
    if frame.type == FrameType.EXEC:
        return ExecRequest.decode(frame.payload)
    if frame.type in FILE_REQUESTS:
        return FileRequest.decode(FrameType(frame.type), frame.payload)
    raise ProtocolError(f"frame type {frame.type:#x} is not a request")
