"""The error that refuses a KVM snapshot saved with another CPUID names the first leaf that differs."""

from __future__ import annotations

from hypothesis import given, settings

from popek.accel.kvm_snapshot import _cpuid_difference
from tests.unit.state_fuzz import json_value

HERE = [[[0, 0, 0, 0x10, 0x68747541, 0x444D4163, 0x69746E65], [7, 0, 1, 0, 0x1C038B, 0x8040000C, 0]]]


def test_the_differing_leaf_and_both_values_are_named() -> None:
    saved = [[HERE[0][0], [7, 0, 1, 0, 0x1C038B, 0x80400004, 0]]]
    assert _cpuid_difference(saved, HERE) == (
        "vCPU 0 leaf 0x7.0: saved EAX..EDX 0x0 0x1c038b 0x80400004 0x0, here 0x0 0x1c038b 0x8040000c 0x0"
    )
    assert _cpuid_difference([HERE[0][:1]], HERE).endswith("saved EAX..EDX absent, here 0x0 0x1c038b 0x8040000c 0x0")


@settings(max_examples=200, deadline=None)
@given(saved=json_value)
def test_a_hostile_saved_cpuid_is_described_not_raised(saved: object) -> None:
    assert isinstance(_cpuid_difference(saved, HERE), str)
