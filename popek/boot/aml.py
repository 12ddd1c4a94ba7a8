"""AML, the byte code of ACPI definition blocks, encoded by hand: enough of ACPI 6.0 §20.2 for popek's DSDT.

popek has no firmware and no ASL compiler at run time, so the few AML objects its DSDT needs are built here
from the grammar: name strings (§20.2.2: NameSeg, root and parent prefixes, DualNamePrefix, MultiNamePrefix),
integers (§20.2.3: ZeroOp, OneOp, BytePrefix ... QWordPrefix), package lengths
(§20.2.4: one to four bytes, the length counting itself), and the Name and Package terms (§20.2.5).
Every helper returns bytes; a definition block is those bytes after an ACPI table header
(`popek.boot.acpi.table`).
"""

from __future__ import annotations

import string

ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
QWORD_PREFIX = 0x0E
PACKAGE_OP = 0x12
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
ROOT_CHAR = ord("\\")
PARENT_PREFIX_CHAR = ord("^")
NULL_NAME = 0x00

PKG_LENGTH_MAX = (1 << 28) - 1  # four bytes: 4 bits in the lead byte and 8 in each of the three that follow
_LEAD_CHARS = set(string.ascii_uppercase + "_")
_NAME_CHARS = _LEAD_CHARS | set(string.digits)


def pkg_length(body: int) -> bytes:
    """The PkgLength of an object whose encoding after the PkgLength is `body` bytes long (§20.2.4): the
    encoded length includes the PkgLength bytes themselves, so one byte holds lengths up to 63."""
    if body < 0:
        raise ValueError("a package length cannot be negative")
    if body + 1 < 0x40:
        return bytes([body + 1])
    for extra in (1, 2, 3):
        total = body + 1 + extra
        if total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0x0F)
            return bytes([lead]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"an AML object of {body} bytes does not fit a package length (at most {PKG_LENGTH_MAX})")


def name_seg(seg: str) -> bytes:
    """A four-character NameSeg, short names padded with '_' as ASL does."""
    if not 1 <= len(seg) <= 4 or seg[0] not in _LEAD_CHARS or any(c not in _NAME_CHARS for c in seg):
        raise ValueError(f"{seg!r} is not an ACPI name segment (1-4 of A-Z, 0-9, _, not starting with a digit)")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    r"""A NameString: optional root (\) or parent (^) prefixes, then dot-separated segments."""
    prefix = b""
    rest = path
    if rest.startswith("\\"):
        prefix, rest = bytes([ROOT_CHAR]), rest[1:]
    else:
        while rest.startswith("^"):
            prefix, rest = prefix + bytes([PARENT_PREFIX_CHAR]), rest[1:]
    segs = [name_seg(s) for s in rest.split(".")] if rest else []
    if not segs:
        return prefix + bytes([NULL_NAME])
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise ValueError(f"a name path has at most 255 segments, not {len(segs)}")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def integer(value: int) -> bytes:
    """The shortest encoding of an integer constant (ZeroOp, OneOp, or a Byte/Word/DWord/QWord constant)."""
    if not 0 <= value < 1 << 64:
        raise ValueError(f"AML integers are unsigned 64-bit, not {value}")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, size in ((BYTE_PREFIX, 1), (WORD_PREFIX, 2), (DWORD_PREFIX, 4), (QWORD_PREFIX, 8)):
        if value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise AssertionError("unreachable: the range was checked")


def package(*elements: bytes) -> bytes:
    """Package (n) {elements}: each element an already-encoded data object."""
    if len(elements) > 255:
        raise ValueError(f"a Package holds at most 255 elements, not {len(elements)} (VarPackage is not needed)")
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def name(path: str, value: bytes) -> bytes:
    """Name (path, value): a named data object."""
    return bytes([NAME_OP]) + name_string(path) + value


# --- named objects and buffers (§20.2.5.2, §20.2.5.4) and resource descriptors (§6.4) for device declarations ---
STRING_PREFIX = 0x0D
SCOPE_OP = 0x10
BUFFER_OP = 0x11
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82  # after ExtOpPrefix

# large resource data types (§6.4.3, Table 6.43): the tag byte is 0x80 | type, then a 16-bit length
MEMORY32_FIXED_TAG = 0x86
EXTENDED_INTERRUPT_TAG = 0x89
END_TAG = 0x79  # small item 0xF, length 1 (§6.4.2.9): a checksum byte follows
MEMORY32_READ_WRITE = 1 << 0  # §6.4.3.4, information byte bit 0
# Extended Interrupt Descriptor flags (§6.4.3.6)
INTERRUPT_CONSUMER = 1 << 0
INTERRUPT_EDGE = 1 << 1
INTERRUPT_ACTIVE_LOW = 1 << 2
INTERRUPT_SHARED = 1 << 3


def string_const(text: str) -> bytes:
    """A String constant (§20.2.3): StringPrefix, ASCII characters 0x01-0x7F, NullChar."""
    raw = text.encode("ascii")
    if any(not 0x01 <= c <= 0x7F for c in raw):
        raise ValueError(f"an AML string holds ASCII 0x01-0x7F only, not {text!r}")
    return bytes([STRING_PREFIX]) + raw + b"\0"


def buffer(data: bytes) -> bytes:
    """Buffer (n) {data} (§20.2.5.4): BufferOp PkgLength BufferSize ByteList."""
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def scope(path: str, *terms: bytes) -> bytes:
    """Scope (path) {terms} (§20.2.5.1): opens a namespace location for the terms inside."""
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    """Device (path) {terms} (§20.2.5.2, DefDevice := DeviceOp PkgLength NameString TermList)."""
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def memory32_fixed(base: int, size: int, writable: bool = True) -> bytes:
    """A 32-bit Fixed Memory Range Descriptor (§6.4.3.4): 12 bytes, the range must lie below 4 GiB."""
    if not (base >= 0 and size > 0 and base + size <= 1 << 32):
        raise ValueError(f"a Memory32Fixed range lies in the first 4 GiB: not {size:#x} bytes at {base:#x}")
    info = MEMORY32_READ_WRITE if writable else 0
    return bytes([MEMORY32_FIXED_TAG]) + (9).to_bytes(2, "little") + bytes([info]) + \
        base.to_bytes(4, "little") + size.to_bytes(4, "little")  # fmt: skip


def extended_interrupt(irq: int, edge: bool, active_low: bool = False, shared: bool = False) -> bytes:
    """An Extended Interrupt Descriptor (§6.4.3.6) for one interrupt this device consumes, no resource
    source: on x86 the number is a GSI, routed by the MADT like any other."""
    if not 0 <= irq < 1 << 32:
        raise ValueError(f"an interrupt number is 32-bit, not {irq}")
    flags = INTERRUPT_CONSUMER
    flags |= INTERRUPT_EDGE if edge else 0
    flags |= INTERRUPT_ACTIVE_LOW if active_low else 0
    flags |= INTERRUPT_SHARED if shared else 0
    return bytes([EXTENDED_INTERRUPT_TAG]) + (6).to_bytes(2, "little") + bytes([flags, 1]) + irq.to_bytes(4, "little")


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate () {descriptors}: a Buffer of the descriptors closed by an End Tag (§6.4.2.9) whose
    checksum byte makes the whole template sum to zero (0 would also mean "not checked"; iasl writes 0)."""
    raw = b"".join(descriptors) + bytes([END_TAG])
    return buffer(raw + bytes([(-sum(raw)) & 0xFF]))
