"""Live migration of a running VM to another popek process over a stream socket (a Unix socket or loopback TCP):
pre-copy rounds with the dirty log, then a short stop-and-copy, as QEMU's and Cloud Hypervisor's migrations do.

Source (`send`): with the dirty log on (KVM_MEM_LOG_DIRTY_PAGES, or the software CPU's own dirty map) it sends
the VM's spec, then every page of guest RAM that is not zero while the guest runs, then, round after round, the
pages written since the last round, until a round is small (`SMALL_ROUND` pages) or `MAX_ROUNDS` have gone by.
Then it pauses the VM (popek.vm.Vm.pause: vCPUs between two instructions, devices held), sends the last dirty
pages and the VM's state (the same dict a snapshot holds: popek.vm_snapshot) and waits for the target's answer.
Downtime is from that pause to the answer. The target's OK stops the source VM (StopReason.MIGRATED); anything
else (the target closed the connection, died, refused the state, did not answer within `ACK_TIMEOUT`) resumes the
source VM, which goes on as if nothing had happened: a failed migration loses no guest work.

Target (`receive`): reads the stream into a VM built for the spec with fresh memory (nothing loaded: the pages
come from the source), restores the state into it and answers OK; the caller runs it. The stream is hostile
input like a snapshot file: every frame's kind and size is checked before it is read, a page range must be
page-aligned and inside guest RAM, a JSON part is at most popek.snapshot.MAX_STATE_BYTES, and pages are read
straight into guest memory (never into a buffer the stream sizes), so a bad stream is one MigrationError and a
closed VM, never a host access outside guest RAM or unbounded host memory.

Frames: `kind u8 | length u32` then `length` bytes. HELLO (JSON: format, version, the spec), PAGES (`gpa u64 |
count u32` then count pages), STATE (the state, popek.snapshot's JSON encoding), and from the target one RESULT
(b"OK" or an error message).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from popek import snapshot
from popek.accel.exits import Stop, StopReason
from popek.errors import PopekError
from popek.memory import PAGE_SIZE, GuestMemory

FORMAT = "popek-migration"
VERSION = 1
HELLO, PAGES, STATE, RESULT = 1, 2, 3, 4
_FRAME = struct.Struct("<BI")
_PAGES = struct.Struct("<QI")
MAX_PAGES_PER_FRAME = 256  # 1 MiB of pages per frame
MAX_HELLO = 1 << 20
MAX_RESULT = 4096
MAX_ROUNDS = 8
SMALL_ROUND = 256  # pages: a round this small goes straight to the stop-and-copy
ACK_TIMEOUT = 60.0  # how long the source waits for the target to restore (it resumes after)
IO_TIMEOUT = 60.0  # a peer that sends nothing for this long is gone
_ZERO_PAGE = bytes(PAGE_SIZE)


class MigrationError(PopekError):
    """A migration that did not complete; on the source the VM goes on running."""


@dataclass(frozen=True)
class MigrationStats:
    rounds: int  # pre-copy rounds after the first full pass
    pages_sent: int
    bytes_sent: int
    downtime_s: float  # from the pause to the target's OK
    total_s: float


def _send_frame(sock: socket.socket, kind: int, payload: bytes | memoryview) -> int:
    sock.sendall(_FRAME.pack(kind, len(payload)))
    sock.sendall(payload)
    return _FRAME.size + len(payload)


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    while view:
        n = sock.recv_into(view)
        if n == 0:
            raise MigrationError("the peer closed the migration stream mid-frame")
        view = view[n:]


def _recv_header(sock: socket.socket) -> tuple[int, int]:
    header = bytearray(_FRAME.size)
    _recv_exact(sock, memoryview(header))
    kind, length = _FRAME.unpack(header)
    return int(kind), int(length)


def _recv_bounded(sock: socket.socket, length: int, limit: int, what: str) -> bytes:
    if length > limit:
        raise MigrationError(f"the migration stream's {what} is {length} bytes, more than {limit}")
    data = bytearray(length)
    _recv_exact(sock, memoryview(data))
    return bytes(data)


def _runs(pages: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Sorted page addresses as (first, count) runs of at most MAX_PAGES_PER_FRAME."""
    first = count = 0
    for gpa in sorted(pages):
        if count and gpa == first + count * PAGE_SIZE and count < MAX_PAGES_PER_FRAME:
            count += 1
            continue
        if count:
            yield first, count
        first, count = gpa, 1
    if count:
        yield first, count


def _send_pages(sock: socket.socket, mem: GuestMemory, pages: Iterable[int]) -> tuple[int, int]:
    """Send the pages (gpa list); (pages, bytes) sent."""
    sent_pages = sent_bytes = 0
    for first, count in _runs(pages):
        sock.sendall(_FRAME.pack(PAGES, _PAGES.size + count * PAGE_SIZE) + _PAGES.pack(first, count))
        sock.sendall(mem.view(first, count * PAGE_SIZE))
        sent_pages += count
        sent_bytes += _FRAME.size + _PAGES.size + count * PAGE_SIZE
    return sent_pages, sent_bytes


def _nonzero_pages(mem: GuestMemory) -> Iterator[int]:
    for region in mem.regions:
        view = memoryview(region.mapping)
        for offset in range(0, region.size, PAGE_SIZE):
            if view[offset : offset + PAGE_SIZE] != _ZERO_PAGE:
                yield region.gpa + offset


def send(
    vm: Any, sock: socket.socket, *, max_rounds: int = MAX_ROUNDS, small_round: int = SMALL_ROUND
) -> MigrationStats:
    """Migrate the running `vm` (popek.vm.Vm) through `sock` (connected to a `receive`); on success the VM is
    stopped with StopReason.MIGRATED, on failure it runs on and MigrationError says why."""
    accel = vm.accel
    mem: GuestMemory = vm.mem
    started = time.monotonic()
    sock.settimeout(IO_TIMEOUT)
    try:
        accel.start_dirty_log()
        accel.collect_dirty()
        mem.dirty_pages(clear=True)
        vm.forget_diff_base()  # the dirty map now counts from here, not from the last full snapshot
        from popek import vm_snapshot

        hello = {"format": FORMAT, "version": VERSION, "spec": vm_snapshot.spec_state(vm.spec)}
        sent_bytes = _send_frame(sock, HELLO, snapshot.encode_state(hello))
        sent_pages, n = _send_pages(sock, mem, _nonzero_pages(mem))
        sent_bytes += n
        rounds = 0
        while rounds < max_rounds:
            accel.collect_dirty()
            dirty = mem.dirty_pages(clear=True)
            rounds += 1
            p, n = _send_pages(sock, mem, dirty)
            sent_pages, sent_bytes = sent_pages + p, sent_bytes + n
            if len(dirty) <= small_round:
                break
    except OSError as e:
        raise MigrationError(f"the migration stream failed during pre-copy: {e.strerror or e}") from None
    vm.pause()
    paused = time.monotonic()
    try:
        accel.collect_dirty()
        p, n = _send_pages(sock, mem, mem.dirty_pages(clear=True))
        sent_pages, sent_bytes = sent_pages + p, sent_bytes + n
        sent_bytes += _send_frame(sock, STATE, snapshot.encode_state(vm.capture_state()))
        sock.settimeout(ACK_TIMEOUT)
        kind, length = _recv_header(sock)
        answer = _recv_bounded(sock, length, MAX_RESULT, "result")
        if kind != RESULT:
            raise MigrationError(f"the target answered with frame kind {kind}, not a result")
        if answer != b"OK":
            raise MigrationError(f"the target refused the VM: {answer.decode(errors='replace')}")
    except (OSError, MigrationError) as e:
        vm.resume()  # the source goes on: nothing of the guest's work is lost
        if isinstance(e, MigrationError):
            raise
        raise MigrationError(f"the migration stream failed at the stop-and-copy: {e.strerror or e}") from None
    done = time.monotonic()
    vm.request_stop(Stop(StopReason.MIGRATED, "the VM migrated to another popek"))  # its parked vCPUs end
    return MigrationStats(rounds, sent_pages, sent_bytes, done - paused, done - started)


def receive(
    sock: socket.socket,
    console: Callable[[bytes], None] | None = None,
    adjust: Callable[[Any], Any] | None = None,
) -> Any:
    """Build the VM the stream on `sock` carries and restore it (not yet run: call run()); MigrationError or
    SnapshotError for a stream that is broken or hostile, after telling the source (which then resumes)."""
    from popek import vm_snapshot
    from popek.vm import Vm

    sock.settimeout(IO_TIMEOUT)
    vm: Vm | None = None
    try:
        kind, length = _recv_header(sock)
        if kind != HELLO:
            raise MigrationError(f"a migration stream starts with HELLO, not frame kind {kind}")
        hello = snapshot.decode_state(_recv_bounded(sock, length, MAX_HELLO, "HELLO"))
        if hello.get("format") != FORMAT or hello.get("version") != VERSION:
            raise MigrationError(f"not a {FORMAT} {VERSION} stream: {str(hello.get('format'))[:40]} "
                                 f"{str(hello.get('version'))[:20]}")  # fmt: skip
        spec = vm_snapshot.spec_from_state(hello.get("spec"))
        if adjust is not None:
            spec = adjust(spec)
        vm = Vm(spec, console, memory=GuestMemory(spec.mem))
        while True:
            kind, length = _recv_header(sock)
            if kind == PAGES:
                _receive_pages(sock, vm.mem, length)
            elif kind == STATE:
                state = snapshot.decode_state(_recv_bounded(sock, length, snapshot.MAX_STATE_BYTES, "state"))
                Vm.spec_of_state(state)  # the backend check
                vm.restore_state(state)
                break
            else:
                raise MigrationError(f"unexpected frame kind {kind} in a migration stream")
        _send_frame(sock, RESULT, b"OK")
        return vm
    except (MigrationError, snapshot.SnapshotError, PopekError, OSError) as e:
        if vm is not None:
            vm.close()
        message = str(e) if not isinstance(e, OSError) else f"the migration stream failed: {e.strerror or e}"
        try:
            _send_frame(sock, RESULT, message.encode()[:MAX_RESULT])
        except OSError:
            pass
        if isinstance(e, MigrationError | snapshot.SnapshotError):
            raise
        raise MigrationError(message) from None


def _receive_pages(sock: socket.socket, mem: GuestMemory, length: int) -> None:
    if length < _PAGES.size:
        raise MigrationError("a PAGES frame shorter than its header")
    header = bytearray(_PAGES.size)
    _recv_exact(sock, memoryview(header))
    gpa, count = _PAGES.unpack(header)
    if not 0 < count <= MAX_PAGES_PER_FRAME or length != _PAGES.size + count * PAGE_SIZE:
        raise MigrationError(f"a PAGES frame of {count} pages in {length} bytes")
    if gpa % PAGE_SIZE or not mem.contains(gpa, count * PAGE_SIZE):
        raise MigrationError(f"a PAGES frame for {gpa:#x}+{count} pages outside guest RAM")
    _recv_exact(sock, mem.view(gpa, count * PAGE_SIZE))


def connect(address: str) -> socket.socket:
    """A stream socket to a migration target: `unix:PATH` / a path, or `tcp:HOST:PORT` / `HOST:PORT`."""
    family, target = parse_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(IO_TIMEOUT)
        sock.connect(target)
    except OSError as e:
        sock.close()
        raise MigrationError(f"cannot reach the migration target {address}: {e.strerror or e}") from None
    return sock


def listen(address: str) -> socket.socket:
    """A listening socket for one incoming migration; a Unix socket file nobody listens on any more (a target
    that ended) is replaced, one that a live target holds is refused."""
    family, target = parse_address(address)
    if family == socket.AF_UNIX and os.path.exists(target):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(target)
            except ConnectionRefusedError:
                os.unlink(target)  # stale: its listener is gone
            except OSError:
                pass  # not a socket, or not ours to judge: bind says what is wrong
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(target)
        sock.listen(1)
    except OSError as e:
        sock.close()
        raise MigrationError(f"cannot listen for a migration on {address}: {e.strerror or e}") from None
    return sock


def parse_address(address: str) -> tuple[socket.AddressFamily, Any]:
    if address.startswith("unix:"):
        return socket.AF_UNIX, address[5:]
    rest = address[4:] if address.startswith("tcp:") else address
    host, sep, port = rest.rpartition(":")
    if sep and port.isdigit() and host and "/" not in rest:
        if not 0 < int(port) < 65536:
            raise MigrationError(f"port {port} of {address!r} is not a TCP port")
        return socket.AF_INET, (host, int(port))
    if address.startswith("tcp:"):
        raise MigrationError(f"{address!r} is not tcp:HOST:PORT")
    return socket.AF_UNIX, address


def describe(stats: MigrationStats) -> str:
    fields: dict[str, float] = {"rounds": stats.rounds, "pages": stats.pages_sent, "bytes": stats.bytes_sent}
    fields |= {"downtime_ms": round(stats.downtime_s * 1000, 1), "total_s": round(stats.total_s, 3)}
    return json.dumps(fields)
