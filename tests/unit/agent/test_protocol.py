"""The protocol's host side (popek/agent/protocol.py): every message round-trips; arbitrary and mutated bytes raise
only ProtocolError; lengths are refused before anything they claim is kept; the C agent's constants are these."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popek.agent import protocol
from popek.agent.errors import InvalidRequest, ProtocolError
from popek.agent.protocol import (
    ErrorKind,
    ExecRequest,
    ExitStatus,
    FileRecord,
    FileRequest,
    Frame,
    FrameReader,
    FrameType,
    RefreshRequest,
    Tag,
)

HEADER = Path(protocol.__file__).parent / "guest" / "protocol.h"

# strings as the protocol carries them: any byte but NUL
words = st.binary(max_size=40).filter(lambda b: b"\0" not in b)
names = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b and b"=" not in b)
paths = st.binary(min_size=1, max_size=60).filter(lambda b: b"\0" not in b)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)


def frames_of(data: bytes) -> list[Frame]:
    reader = FrameReader()
    reader.feed(data)
    out = []
    while (frame := reader.next_frame()) is not None:
        out.append(frame)
    return out


def only_frame(data: bytes) -> Frame:
    (frame,) = frames_of(data)
    return frame


@st.composite
def exec_requests(draw: st.DrawFn) -> ExecRequest:
    shell = draw(st.none() | words)
    argv = () if shell is not None else tuple(draw(st.lists(words, min_size=1, max_size=5)))
    env = tuple(
        name + (b"" if value is None else b"=" + value)
        for name, value in draw(st.lists(st.tuples(names, st.none() | words), max_size=4))
    )
    return ExecRequest(
        argv=argv,
        shell=shell,
        env=env,
        clear_env=draw(st.booleans()),
        cwd=draw(st.none() | paths),
        stdin=draw(st.booleans()),
        timeout_ms=draw(u64),
        kill_grace_ms=draw(u32),
        pty=draw(st.none() | st.tuples(u16, u16)),
    )


@st.composite
def file_requests(draw: st.DrawFn) -> FileRequest:
    op = draw(st.sampled_from(protocol.FILE_REQUESTS))
    flags = draw(st.integers(0, protocol.KNOWN_FLAGS.get(op, 0))) & protocol.KNOWN_FLAGS.get(op, 0)
    takes_mode = op in (FrameType.WRITE, FrameType.MKDIR)
    reading = op is FrameType.READ
    return FileRequest(
        op=op,
        path=draw(paths),
        flags=flags,
        mode=draw(st.none() | st.integers(0, 0o7777)) if takes_mode else None,
        offset=draw(u64) if reading else 0,
        length=draw(st.none() | u64) if reading else None,
    )


unicast_macs = st.binary(min_size=6, max_size=6).filter(lambda m: not m[0] & 1 and m != bytes(6))
refresh_requests = st.builds(
    RefreshRequest,
    time_ns=st.none() | u64,
    entropy=st.none() | st.binary(min_size=1, max_size=protocol.MAX_ENTROPY),
    mac=st.none() | st.tuples(st.binary(min_size=6, max_size=6), unicast_macs),
)

requests = exec_requests() | file_requests() | refresh_requests


# ---------------------------------------------------------------------------------------------------------------
# round trips


@given(requests)
def test_requests_round_trip(request: protocol.Request) -> None:
    assert protocol.decode_request(only_frame(request.encode())) == request


@given(st.builds(protocol.Hello, u16, u16, u32))
def test_hello_round_trips(hello: protocol.Hello) -> None:
    frame = only_frame(hello.encode())
    assert frame.type == FrameType.HELLO and protocol.Hello.decode(frame.payload) == hello


@given(st.sampled_from(ErrorKind), u32, st.text(max_size=200))
def test_error_round_trips(kind: ErrorKind, errno: int, message: str) -> None:
    frame = only_frame(protocol.ErrorReply(kind, errno, message).encode())
    assert protocol.ErrorReply.decode(frame.payload) == protocol.ErrorReply(kind, errno, message)


@given(st.none() | st.integers(0, 255), st.integers(1, 64), st.booleans(), st.booleans(), u64)
def test_exit_round_trips(code: int | None, sig: int, timed_out: bool, core: bool, duration: int) -> None:
    status = ExitStatus(code, None if code is not None else sig, timed_out, core, duration)
    frame = only_frame(status.encode())
    assert frame.type == FrameType.EXIT and ExitStatus.decode(frame.payload) == status


@given(st.lists(st.tuples(paths.filter(lambda n: b"/" not in n and n not in (b".", b"..")), st.builds(
    FileRecord, u32, u32, u32, u64, st.integers(-(1 << 63), (1 << 63) - 1)
)), max_size=5))  # fmt: skip
def test_entries_round_trip(entries: list[tuple[bytes, FileRecord]]) -> None:
    assert protocol.decode_entries(protocol.encode_entries(entries)) == entries
    for _name, record in entries:
        assert FileRecord.decode(record.encode()) == record


def test_fixed_layouts_are_the_documented_ones() -> None:
    assert protocol.Hello().encode() == struct.pack("<IBHHI", 9, 1, 1, 0, 1 << 20)
    assert protocol.Started(77, 4096).encode() == struct.pack("<IBII", 9, 0x20, 77, 4096)
    assert ExitStatus(None, 9, True, False, 5).encode() == struct.pack("<IBBBHIQ", 17, 0x28, 1, 1, 0, 9, 5)
    assert protocol.u32_frame(FrameType.SIGNAL, 15) == b"\x05\0\0\0\x25\x0f\0\0\0"
    assert protocol.resize_frame(24, 80) == struct.pack("<IBHH", 5, 0x26, 24, 80)
    request = ExecRequest(argv=(b"ls", b"-l"), stdin=True)
    assert request.encode()[5:] == b"\x01\x80\x02\0\0\0ls\x01\x80\x02\0\0\0-l\x06\x80\0\0\0\0"
    refresh = RefreshRequest(time_ns=0x0102030405060708, entropy=b"\xaa\xbb")
    assert refresh.encode() == (
        struct.pack("<IB", 1 + 14 + 8, 0x18)
        + b"\x15\x80\x08\0\0\0\x08\x07\x06\x05\x04\x03\x02\x01"
        + b"\x16\x80\x02\0\0\0\xaa\xbb"
    )
    assert RefreshRequest().encode() == b"\x01\0\0\0\x18"  # an empty REFRESH: nothing to do, OK


# ---------------------------------------------------------------------------------------------------------------
# framing and bounds


def test_frames_split_at_any_byte() -> None:
    stream = protocol.Hello().encode() + protocol.encode_frame(FrameType.STDOUT, b"x" * 70000) + b"\x01\0\0\0\x10"
    reader = FrameReader()
    seen = []
    for byte in stream:
        reader.feed(bytes((byte,)))
        while (frame := reader.next_frame()) is not None:
            seen.append(frame)
    assert [frame.type for frame in seen] == [FrameType.HELLO, FrameType.STDOUT, FrameType.PING]
    assert seen[1].payload == b"x" * 70000 and reader.buffered() == 0


def test_a_frame_claiming_4_gib_is_refused_from_its_length_alone() -> None:
    reader = FrameReader()
    reader.feed(b"\xff\xff\xff\xff")
    assert reader.buffered() == 4
    with pytest.raises(ProtocolError, match=r"outside 1\.\.1048576"):
        reader.next_frame()
    reader = FrameReader()
    reader.feed(struct.pack("<I", protocol.MAX_FRAME + 1))
    with pytest.raises(ProtocolError):
        reader.next_frame()
    reader = FrameReader()
    reader.feed(b"\0\0\0\0")
    with pytest.raises(ProtocolError):
        reader.next_frame()
    # the largest frame is accepted
    assert only_frame(protocol.encode_frame(FrameType.DATA, b"\xaa" * (protocol.MAX_FRAME - 1))).type == FrameType.DATA


def test_tlv_sizes_are_checked_against_the_frame_before_use() -> None:
    claim = struct.pack("<HI", Tag.PATH, 0xFFFFFFFF) + b"abc"
    with pytest.raises(ProtocolError, match="runs past"):
        protocol.decode_tlvs(claim)
    with pytest.raises(ProtocolError, match="cut short"):
        protocol.decode_tlvs(b"\x10\x80\x01")


def test_agent_side_rules_are_enforced_on_decode() -> None:
    def decode(op: FrameType, items: list[tuple[int, bytes]]) -> object:
        return protocol.decode_request(Frame(op, protocol.encode_tlvs(items)))

    with pytest.raises(ProtocolError, match="critical tag 0x8fff"):
        decode(FrameType.STAT, [(Tag.PATH, b"/"), (0x8FFF, b"")])
    assert decode(FrameType.STAT, [(Tag.PATH, b"/"), (0x0FFF, b"ignored")]) == FileRequest(FrameType.STAT, b"/")
    with pytest.raises(ProtocolError, match="critical tag"):  # a known tag outside its request is unknown there
        decode(FrameType.LIST, [(Tag.PATH, b"/"), (Tag.MODE, struct.pack("<I", 0o755))])
    with pytest.raises(ProtocolError, match="twice"):
        decode(FrameType.STAT, [(Tag.PATH, b"/"), (Tag.PATH, b"/")])
    with pytest.raises(ProtocolError, match="NUL"):
        decode(FrameType.STAT, [(Tag.PATH, b"/a\0b")])
    with pytest.raises(ProtocolError, match="no PATH"):
        decode(FrameType.STAT, [])
    with pytest.raises(ProtocolError, match="FLAGS"):
        decode(FrameType.REMOVE, [(Tag.PATH, b"/x"), (Tag.FLAGS, struct.pack("<I", 2))])
    with pytest.raises(ProtocolError, match="MODE"):
        decode(FrameType.MKDIR, [(Tag.PATH, b"/x"), (Tag.MODE, struct.pack("<I", 0o10000))])
    with pytest.raises(ProtocolError, match=r"outside 8\.\.8"):
        decode(FrameType.READ, [(Tag.PATH, b"/x"), (Tag.OFFSET, b"\0")])
    with pytest.raises(ProtocolError, match="either an argv"):
        decode(FrameType.EXEC, [(Tag.ARG, b"ls"), (Tag.SHELL, b"ls")])
    with pytest.raises(ProtocolError, match="more than 4096 ARG"):
        decode(FrameType.EXEC, [(Tag.ARG, b"x")] * (protocol.MAX_ARGS + 1))
    with pytest.raises(ProtocolError, match="not a request"):
        protocol.decode_request(Frame(FrameType.STDOUT, b""))


def refresh_frame(items: list[tuple[int, bytes]]) -> Frame:
    return Frame(FrameType.REFRESH, protocol.encode_tlvs(items))


@pytest.mark.parametrize(
    ("items", "match"),
    [
        ([(Tag.ENTROPY, b"")], r"ENTROPY has a value of 0 bytes, outside 1\.\.512"),
        ([(Tag.ENTROPY, b"\x01" * 513)], r"ENTROPY has a value of 513 bytes, outside 1\.\.512"),
        ([(Tag.TIME_NS, b"\0" * 7)], r"TIME_NS has a value of 7 bytes, outside 8\.\.8"),
        ([(Tag.TIME_NS, b"\0" * 9)], r"TIME_NS has a value of 9 bytes"),
        ([(Tag.TIME_NS, b"\0" * 8), (Tag.TIME_NS, b"\1" * 8)], "TIME_NS appears twice"),
        ([(Tag.ENTROPY, b"a"), (Tag.ENTROPY, b"b")], "ENTROPY appears twice"),
        ([(Tag.PATH, b"/")], "critical tag 0x8010 is not known in REFRESH"),  # no PATH here, unlike files
        ([(Tag.MAC, b"\x02" * 11)], r"MAC has a value of 11 bytes, outside 12\.\.12"),
        ([(Tag.MAC, b"\x02" * 13)], r"MAC has a value of 13 bytes"),
        ([(Tag.MAC, b"\x02" * 6 + b"\x01" * 6)], "not a unicast address"),  # a multicast new MAC
        ([(Tag.MAC, b"\x02" * 6 + b"\0" * 6)], "not a unicast address"),
        ([(0x8018, b"")], "critical tag 0x8018"),
    ],
)
def test_refresh_sizes_and_tags_are_checked_on_decode(items: list[tuple[int, bytes]], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        protocol.decode_request(refresh_frame(items))


def test_refresh_decodes_what_the_agent_accepts() -> None:
    assert protocol.decode_request(refresh_frame([])) == RefreshRequest()
    # ENTROPY holds any bytes, NUL included (it is no string); an unknown non-critical tag is ignored
    items = [(0x0FFF, b"later"), (Tag.ENTROPY, b"\0" * 512), (Tag.TIME_NS, struct.pack("<Q", (1 << 64) - 1))]
    assert protocol.decode_request(refresh_frame(items)) == RefreshRequest(time_ns=(1 << 64) - 1, entropy=b"\0" * 512)
    # and REFRESH's tags are unknown in the other requests
    mac = b"\x52\x54\x00\x12\x34\x56", b"\x02\x00\x00\xab\xcd\xef"
    assert protocol.decode_request(refresh_frame([(Tag.MAC, mac[0] + mac[1])])) == RefreshRequest(mac=mac)
    for tag in (Tag.TIME_NS, Tag.ENTROPY, Tag.MAC):
        with pytest.raises(ProtocolError, match=f"critical tag {tag:#x} is not known in STAT"):
            protocol.decode_request(Frame(FrameType.STAT, protocol.encode_tlvs([(Tag.PATH, b"/"), (tag, b"\0" * 8)])))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"entropy": b""}, r"0 bytes of entropy are outside 1\.\.512"),
        ({"entropy": b"x" * 513}, r"513 bytes of entropy are outside 1\.\.512"),
        ({"entropy": "text"}, "entropy is bytes, not str"),
        ({"time_ns": -1}, "not a u64"),
        ({"time_ns": 1 << 64}, "not a u64"),  # what would need more than TIME_NS's 8 bytes
        ({"time_ns": 1.5}, "not a u64"),
        ({"time_ns": True}, "not a u64"),
        ({"mac": (b"\x02" * 6,)}, "two 6-byte addresses"),
        ({"mac": (b"\x02" * 6, b"\x02" * 5)}, "two 6-byte addresses"),
        ({"mac": [b"\x02" * 6, b"\x02" * 6]}, "two 6-byte addresses"),
        ({"mac": ("02:00:00:00:00:01", b"\x02" * 6)}, "two 6-byte addresses"),
        ({"mac": (b"\x02" * 6, b"\xff" * 6)}, "ff:ff:ff:ff:ff:ff is not a unicast address"),
    ],
)
def test_refresh_values_the_protocol_cannot_carry_are_refused_before_sending(
    fields: dict[str, object], match: str
) -> None:
    with pytest.raises(InvalidRequest, match=match):
        RefreshRequest(**fields)  # type: ignore[arg-type]


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_raise_only_protocol_errors(data: bytes) -> None:
    reader = FrameReader()
    reader.feed(data)
    try:
        while (frame := reader.next_frame()) is not None:
            for decode in (protocol.decode_request, lambda f: protocol.ExitStatus.decode(f.payload)):
                try:
                    decode(frame)
                except ProtocolError:
                    pass
            for payload_decoder in (
                protocol.decode_entries,
                FileRecord.decode,
                protocol.Hello.decode,
                protocol.ErrorReply.decode,
                protocol.Started.decode,
                protocol.decode_count,
            ):
                try:
                    payload_decoder(frame.payload)
                except ProtocolError:
                    pass
    except ProtocolError:
        pass
    assert reader.buffered() <= len(data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    frame = bytearray(draw(requests).encode())
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "length"]))
        if action == "flip" and frame:
            at = draw(st.integers(0, len(frame) - 1))
            frame[at] ^= draw(st.integers(1, 255))
        elif action == "cut" and frame:
            del frame[draw(st.integers(0, len(frame) - 1)) :]
        elif action == "insert":
            at = draw(st.integers(0, len(frame)))
            frame[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "length" and len(frame) >= 4:
            frame[0:4] = struct.pack("<I", draw(u32))
    return bytes(frame)


@given(mutated())
def test_mutated_requests_decode_or_raise_protocol_errors(data: bytes) -> None:
    try:
        for frame in frames_of(data):
            request = protocol.decode_request(frame)
            # what decodes is a request the encoder would produce again
            if request is not None:
                assert protocol.decode_request(only_frame(request.encode())) == request
    except ProtocolError:
        pass


# ---------------------------------------------------------------------------------------------------------------
# what the host refuses to send


def test_requests_the_protocol_cannot_carry_are_refused_before_sending() -> None:
    with pytest.raises(InvalidRequest, match="NUL"):
        ExecRequest(argv=(b"echo", b"a\0b"))
    with pytest.raises(InvalidRequest, match="either"):
        ExecRequest()
    with pytest.raises(InvalidRequest, match="4097 arguments"):
        ExecRequest(argv=(b"x",) * (protocol.MAX_ARGS + 1))
    with pytest.raises(InvalidRequest, match="over the protocol's 131072"):
        ExecRequest(shell=b"x" * (protocol.MAX_STRING + 1))
    with pytest.raises(InvalidRequest, match="needs a name"):
        ExecRequest(argv=(b"env",), env=(b"=x",))
    with pytest.raises(InvalidRequest, match="4095"):
        FileRequest(FrameType.READ, b"/" * 4096)
    with pytest.raises(InvalidRequest, match="empty"):
        FileRequest(FrameType.STAT, b"")
    with pytest.raises(InvalidRequest, match="flags"):
        FileRequest(FrameType.LIST, b"/", flags=1)
    with pytest.raises(InvalidRequest, match="mode"):
        FileRequest(FrameType.STAT, b"/", mode=0o644)
    with pytest.raises(InvalidRequest, match="over the protocol"):
        protocol.encode_frame(FrameType.DATA, b"x" * protocol.MAX_FRAME)


# ---------------------------------------------------------------------------------------------------------------
# one set of constants on both sides


def c_constants() -> dict[str, int]:
    values = {}
    for name, expression in re.findall(r"^#define (PA_\w+) (.+?)(?:\s*/\*.*)?$", HEADER.read_text(), re.MULTILINE):
        expression = re.sub(r"(?<=\d)u\b", "", expression.strip())
        expression = re.sub(r"\b0([0-7]+)\b", r"0o\1", expression)  # C's octal
        assert re.fullmatch(r"[0-9a-fox()<> ]+", expression), (name, expression)
        values[name] = int(eval(expression, {"__builtins__": {}}))
    return values


def test_the_c_header_and_the_python_module_agree() -> None:
    c = c_constants()
    python = {
        "PA_VERSION_MAJOR": protocol.VERSION_MAJOR,
        "PA_VERSION_MINOR": protocol.VERSION_MINOR,
        "PA_HEADER_SIZE": protocol.HEADER_SIZE,
        "PA_MAX_FRAME": protocol.MAX_FRAME,
        "PA_CHUNK": protocol.CHUNK,
        "PA_MAX_ARGS": protocol.MAX_ARGS,
        "PA_MAX_ENV": protocol.MAX_ENV,
        "PA_MAX_STRING": protocol.MAX_STRING,
        "PA_MAX_PATH": protocol.MAX_PATH,
        "PA_MAX_ENTROPY": protocol.MAX_ENTROPY,
        "PA_STDIN_WINDOW": protocol.STDIN_WINDOW,
        "PA_MAX_CONNECTIONS": protocol.MAX_CONNECTIONS,
        "PA_DEFAULT_KILL_GRACE_MS": protocol.DEFAULT_KILL_GRACE_MS,
        "PA_FILE_RECORD_SIZE": protocol.FILE_RECORD_SIZE,
        "PA_DEFAULT_FILE_MODE": protocol.DEFAULT_FILE_MODE,
        "PA_DEFAULT_DIR_MODE": protocol.DEFAULT_DIR_MODE,
        "PA_TAG_CRITICAL": protocol.TAG_CRITICAL,
    }
    python |= {f"PA_{member.name}": member.value for member in FrameType}
    python |= {f"PA_TAG_{member.name}": member.value for member in Tag}
    python |= {f"PA_ERR_{member.name}": member.value for member in ErrorKind}
    python |= {f"PA_WRITE_{member.name}": member.value for member in protocol.WriteFlag}
    python |= {"PA_STAT_NOFOLLOW": 1, "PA_REMOVE_RECURSIVE": 1, "PA_MKDIR_PARENTS": 1}
    assert {name: c.get(name) for name in python} == python
    # and the C side defines no frame type or tag that is not here
    text = HEADER.read_text()
    types_block = text[text.index("/* frame types */") : text.index("/* TLV tags")]
    assert set(re.findall(r"#define PA_(\w+) ", types_block)) == set(FrameType.__members__)
    assert {name[7:] for name in c if name.startswith("PA_TAG_") and name != "PA_TAG_CRITICAL"} == set(Tag.__members__)


def test_the_c_agents_tag_rules_are_the_python_ones() -> None:
    """request.c's RULES table (which request takes a tag, repeatable, sizes, string) is TAG_RULES."""
    source = (HEADER.parent / "request.c").read_text()
    table = source[source.index("RULES[] = {") : source.index("};", source.index("RULES[] = {"))]
    c = c_constants()
    sets = {f"IN_{t.name}": {t} for t in FrameType} | {"IN_FILES": set(protocol.FILE_REQUESTS)}
    rules = {}
    row = r'\{PA_TAG_(\w+), "(\w+)", ([A-Z_| ]+), ([01]), (\w+), (\w+), ([01])\}'
    for tag, name, requests, repeatable, low, high, string in re.findall(row, table):
        assert tag == name
        takes = set().union(*(sets[part.strip()] for part in requests.split("|")))
        size = [int(v) if v.isdigit() else c[v] for v in (low, high)]
        rules[Tag[tag]] = protocol.TagRule(frozenset(takes), repeatable == "1", size[0], size[1], string == "1")
    assert rules == protocol.TAG_RULES


def test_the_specification_documents_every_frame_and_tag() -> None:
    doc = (Path(__file__).parents[3] / "docs" / "agent-protocol.md").read_text()
    for member in FrameType:
        assert re.search(rf"\| {member.value:#04x} \| {member.name} +\|", doc), member
    for tag in Tag:
        assert re.search(rf"\| {tag.value:#06x} \| {tag.name} +\|", doc), tag
