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
