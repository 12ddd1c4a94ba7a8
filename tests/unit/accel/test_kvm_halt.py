"""Which vCPU states the KVM backend takes for "nothing can ever wake it" (StopReason.HALTED)."""

from __future__ import annotations

import pytest

from popek.accel.kvm import can_never_wake
from popek.kvm import IdleState, MpState


@pytest.mark.parametrize(
    "state,dead",
    [
        (IdleState(MpState.HALTED, interrupts_enabled=False, event_pending=False), True),
        (IdleState(MpState.HALTED, interrupts_enabled=True, event_pending=False), False),  # an IRQ can come
        (IdleState(MpState.HALTED, interrupts_enabled=False, event_pending=True), False),  # an NMI is on its way
        (IdleState(MpState.RUNNABLE, interrupts_enabled=False, event_pending=False), False),  # cli; jmp $ runs
        (IdleState(MpState.UNINITIALIZED, interrupts_enabled=False, event_pending=False), True),  # waits for SIPI
        (IdleState(MpState.INIT_RECEIVED, interrupts_enabled=True, event_pending=False), True),
        (IdleState(MpState.SIPI_RECEIVED, interrupts_enabled=False, event_pending=False), False),
        (IdleState(5, interrupts_enabled=False, event_pending=False), False),  # a state popek does not know
    ],
)
def test_a_vcpu_can_never_wake_only_when_halted_with_nothing_to_deliver(state: IdleState, dead: bool) -> None:
    assert can_never_wake(state) is dead
