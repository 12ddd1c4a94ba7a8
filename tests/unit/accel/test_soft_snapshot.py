"""A soft vCPU's snapshot (popek.accel.soft_snapshot): a run stopped after any number of instructions, captured and
restored into a fresh backend over a copy of memory, ends exactly as the uninterrupted run; a damaged state is a
SnapshotError and nothing else."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from popek.accel.soft import SoftAccel
from popek.cpu.state import CS, SS, Segment, TripleFault
from popek.memory import GuestMemory
from popek.snapshot import SnapshotError
from tests.unit.state_fuzz import json_value, paths

MEM = 1 << 20
CODE = 0x1000
# real mode: rdtsc; add bx,ax; add ecx,edx; mov [0x2000],bx; push bx; pop si; mul si; inc di; jmp back
PROGRAM = bytes.fromhex("0f31 01c3 6601d1 891e0020 53 5e f7e6 47 ebee".replace(" ", ""))
TOTAL = 600


def machine(mem: GuestMemory) -> SoftAccel:
    accel = SoftAccel(mem, 2)
    s = accel.cpus[0].state
    s.seg[CS] = Segment(selector=0, base=0, type=0xB)
    s.seg[SS] = Segment(selector=0, base=0)
    s.rip, s.gpr[4] = CODE, 0x8000
    return accel


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory(MEM) as m:
        m.write(CODE, PROGRAM)
        yield m


def run(accel: SoftAccel, n: int) -> None:
    assert accel.interps[0].run(n) == n


def end_state(accel: SoftAccel) -> dict[str, Any]:
    return accel.snapshot_state()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(min_value=0, max_value=TOTAL))
def test_a_run_restored_after_n_instructions_ends_as_the_uninterrupted_run(n: int) -> None:
    with GuestMemory(MEM) as mem_a, GuestMemory(MEM) as mem_b, GuestMemory(MEM) as mem_c:
        for m in (mem_a, mem_b):
            m.write(CODE, PROGRAM)
        whole = machine(mem_a)
        run(whole, TOTAL)
        first = machine(mem_b)
        run(first, n)
        saved = json.loads(json.dumps(first.snapshot_state()))  # through JSON, as a snapshot file holds it
        mem_c.write(0, mem_b.read(0, MEM))
        second = SoftAccel(mem_c, 2)
        second.restore_state(saved)
        run(second, TOTAL - n)
        assert end_state(second) == end_state(whole)
        assert second.cpus[0].instructions == TOTAL
        assert mem_c.read(0, MEM) == mem_a.read(0, MEM)


def test_the_program_changes_state_so_the_comparison_can_fail(mem: GuestMemory) -> None:
    accel = machine(mem)
    before = end_state(accel)
    run(accel, 50)
    assert end_state(accel) != before
    assert mem.read_u16(0x2000) != 0


def test_restore_drops_decoded_instructions_and_translations(mem: GuestMemory) -> None:
    accel = machine(mem)
    run(accel, 20)
    saved = accel.snapshot_state()
    assert accel.cpus[0].mmu.code_pages
    accel.restore_state(saved)
    assert not accel.cpus[0].mmu.code_pages and not accel.interps[0]._cache


@pytest.mark.parametrize(
    "path,value,named",
    [
        (("vcpus", 0, "rip"), -1, "soft.vcpus[0].rip"),
        (("vcpus", 0, "seg", 1, "dpl"), 4, "soft.vcpus[0].seg[1].dpl"),
        (("vcpus", 1, "xmm", 3), 1 << 128, "soft.vcpus[1].xmm[3]"),
        (("vcpus", 0, "xcr0"), 7, "soft.vcpus[0].xcr0"),
        (("vcpus", 0, "halted"), 1, "soft.vcpus[0].halted"),
        (("vcpus", 0, "msrs"), [[0x10, 1], [0x10, 2]], "soft.vcpus[0].msrs"),
        (("waiting_for_sipi",), [True, True], "soft.waiting_for_sipi[0]"),
        (("vcpus",), [], "soft.vcpus"),
    ],
)
def test_a_bad_field_is_a_snapshot_error_naming_it_and_changes_nothing(
    mem: GuestMemory, path: tuple[Any, ...], value: object, named: str
) -> None:
    accel = machine(mem)
    run(accel, 30)
    saved = accel.snapshot_state()
    bad = copy.deepcopy(saved)
    target: Any = bad
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(SnapshotError, match=named.replace("[", r"\[").replace("]", r"\]")):
        accel.restore_state(bad)
    assert accel.snapshot_state() == saved


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_a_fuzzed_state_is_restored_or_refused_with_a_snapshot_error(data: st.DataObject) -> None:
    with GuestMemory(MEM) as mem:
        mem.write(CODE, PROGRAM)
        accel = machine(mem)
        run(accel, 10)
        state: Any = json.loads(json.dumps(accel.snapshot_state()))
        path = data.draw(st.sampled_from(paths(state)))
        value = data.draw(json_value)
        if not path:
            state = value
        else:
            target = state
            for key in path[:-1]:
                target = target[key]
            target[path[-1]] = value
        try:
            accel.restore_state(state)
        except SnapshotError:
            return
        try:  # an accepted state is one the CPU can run from (a triple fault is the guest's business)
            accel.interps[0].run(5)
        except TripleFault:
            pass
