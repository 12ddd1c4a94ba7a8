"""Hypothesis pieces for fuzzing saved state (device, CPU and backend snapshots): JSON-like values, and the paths
into a state where one can replace a node."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as hs

json_leaf = (
    hs.none()
    | hs.booleans()
    | hs.integers(min_value=-(1 << 70), max_value=1 << 70)
    | hs.sampled_from([-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 15, 16, 255, 256, 0xFFFF, 0x10000, 1 << 32, 1 << 64, 1 << 256])
    | hs.text(max_size=3)
    | hs.binary(max_size=6)
)
json_value = hs.recursive(
    json_leaf, lambda inner: hs.lists(inner, max_size=4) | hs.dictionaries(hs.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every node of a nested dict/list state, as the keys that reach it (the root is `()`)."""
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += paths(item, (*prefix, i))
    return out


def at(value: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        value = value[key]
    return value
