"""The mechanics of device snapshots: each device lists its fields with a check, `save` copies them into a
plain dict, `load` validates a dict from a snapshot against the same list before anything is touched.

A snapshot is hostile input like a kernel image (popek/snapshot.py): a field that is missing, unexpected, of the
wrong type or out of its range is one `SnapshotError` naming the device and the field, raised before the device
changes, never an IndexError or a ZeroDivisionError from deep inside the device on the guest's next access.
The checks also convert: JSON has no tuples, deques or bytearrays, so a check returns the value in the type the
device keeps (`deque_of` a deque, `raw(n)` bytes) and `save` turns each kept value into its JSON-able form.

Times are the one kind of field that does not copy: a deadline or a time base is absolute on the clock of the
machine that took the snapshot, and a restored machine's clock reads something else (KVM's host time moved on;
a fresh virtual clock starts at 0). Devices save such fields relative to their clock's `now` and add the new
`now` when they restore, so a timer 3 ms from expiry when the VM paused is 3 ms from expiry when it resumes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from popek.snapshot import SnapshotError

Check = Callable[[object], Any]
"""A field's check: returns the value as the device keeps it, or raises ValueError saying what is wrong."""

MAX_TIME_NS = 1 << 62  # a relative time beyond a century of nanoseconds is not one a device armed


class Stateful(Protocol):
    """A device whose guest-visible state a snapshot saves: `state()` is a JSON-able dict (bytes allowed),
    `restore(state)` its inverse, raising SnapshotError for a state it cannot take."""

    def state(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any]) -> None: ...


def uint(bits: int) -> Check:
    """An unsigned integer of `bits` bits (a bool is not an integer here: JSON keeps them apart)."""
    return integer(0, (1 << bits) - 1)


def integer(low: int, high: int) -> Check:
    def check(value: object) -> int:
        if type(value) is not int:
            raise ValueError(f"an integer is expected, not {type(value).__name__}")
        if not low <= value <= high:
            raise ValueError(f"{value} is outside {low}..{high}")
        return value

    return check


def masked(mask: int) -> Check:
    """An integer with no bits outside `mask` (a register whose other bits the device never sets)."""

    def check(value: object) -> int:
        number: int = uint(mask.bit_length())(value)
        if number & ~mask:
            raise ValueError(f"{number:#x} has bits outside {mask:#x}")
        return number

    return check


def one_of(*choices: object) -> Check:
    def check(value: object) -> object:
        for choice in choices:
            if type(value) is type(choice) and value == choice:
                return value
        raise ValueError(f"{value!r} is not one of {', '.join(repr(c) for c in choices)}")

    return check


def boolean(value: object) -> bool:
    if type(value) is not bool:
        raise ValueError(f"true or false is expected, not {type(value).__name__}")
    return value


def optional(inner: Check) -> Check:
    def check(value: object) -> Any:
        return None if value is None else inner(value)

    return check


def list_of(inner: Check, *, length: int | None = None, max_length: int | None = None) -> Check:
    def check(value: object) -> list[Any]:
        if not isinstance(value, list):
            raise ValueError(f"a list is expected, not {type(value).__name__}")
        if length is not None and len(value) != length:
            raise ValueError(f"{len(value)} entries, not {length}")
        if max_length is not None and len(value) > max_length:
            raise ValueError(f"{len(value)} entries, more than {max_length}")
        out = []
        for i, item in enumerate(value):
            try:
                out.append(inner(item))
            except ValueError as e:
                raise ValueError(f"[{i}]: {e}") from None
        return out

    return check


def deque_of(inner: Check, max_length: int) -> Check:
    listed = list_of(inner, max_length=max_length)

    def check(value: object) -> deque[Any]:
        return deque(listed(value))

    return check


def raw(length: int) -> Check:
    """Exactly `length` bytes (a register file, a RAM window)."""

    def check(value: object) -> bytes:
        if not isinstance(value, bytes):
            raise ValueError(f"bytes are expected, not {type(value).__name__}")
        if len(value) != length:
            raise ValueError(f"{len(value)} bytes, not {length}")
        return value

    return check


def blob(max_length: int) -> Check:
    """At most `max_length` bytes (a buffer of data not yet delivered), as a bytearray."""

    def check(value: object) -> bytearray:
        if not isinstance(value, bytes):
            raise ValueError(f"bytes are expected, not {type(value).__name__}")
        if len(value) > max_length:
            raise ValueError(f"{len(value)} bytes, more than {max_length}")
        return bytearray(value)

    return check


def text(max_length: int) -> Check:
    """A string of at most `max_length` characters (a saved error message)."""

    def check(value: object) -> str:
        if not isinstance(value, str):
            raise ValueError(f"a string is expected, not {type(value).__name__}")
        if len(value) > max_length:
            raise ValueError(f"{len(value)} characters, more than {max_length}")
        return value

    return check


def anything(value: object) -> object:
    """A nested part checked by its owner (a virtio device's own state, checked by the device)."""
    return value


def relative_ns(value: object) -> int:
    """A time relative to the device clock's `now` (negative: in the past)."""
    number: int = integer(-MAX_TIME_NS, MAX_TIME_NS)(value)
    return number


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, deque | tuple | list):
        return [_jsonable(v) for v in value]
    return value


def save(obj: object, fields: Mapping[str, Check]) -> dict[str, Any]:
    """The named attributes of `obj`, as JSON-able copies (a later change to the device does not reach them)."""
    return {name: _jsonable(getattr(obj, name)) for name in fields}


def load(state: object, fields: Mapping[str, Check], what: str) -> dict[str, Any]:
    """Every field of `fields` from `state`, checked and converted; nothing else may be there."""
    if not isinstance(state, dict):
        raise SnapshotError(f"{what}: the saved state is a {type(state).__name__}, not an object")
    missing = [name for name in fields if name not in state]
    extra = sorted(str(name) for name in state if name not in fields)
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unexpected {', '.join(extra)}"] if extra else []
        )
        raise SnapshotError(f"{what}: {'; '.join(parts)}")
    out = {}
    for name, check in fields.items():
        try:
            out[name] = check(state[name])
        except ValueError as e:
            raise SnapshotError(f"{what}.{name}: {e}") from None
    return out


def apply(obj: object, state: object, fields: Mapping[str, Check], what: str) -> dict[str, Any]:
    """`load`, then set each attribute; returns the loaded values for the device's own consistency checks."""
    values = load(state, fields, what)
    for name, value in values.items():
        setattr(obj, name, value)
    return values


def sub(state: object, key: str, what: str) -> object:
    """A nested part of a device's state (one chip of a pair, one channel), present or a SnapshotError."""
    if not isinstance(state, dict) or key not in state:
        raise SnapshotError(f"{what}: missing {key}")
    return state[key]
