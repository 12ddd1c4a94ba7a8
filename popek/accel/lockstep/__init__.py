"""The lockstep checker: a guest runs on popek's software CPU and on KVM side by side, KVM single-stepping, and the
architectural state of the two is compared after every instruction; the first divergence is reported with the
instruction (bytes and disassembly), the state before it and both states after it, differing fields marked.

On hosts that run guest ring 3 natively, KVM is a hardware oracle for user-level instruction semantics.

How one step goes (`Lockstep.step`):
1. The software CPU executes the instruction first, *speculatively*: its port and MMIO writes are recorded, not
   performed; a port or MMIO *read* aborts the attempt (`_NeedKvm`) before any state is written (handlers read
   their operands first), because the value must come from KVM's side.
2. KVM executes one instruction: single-step (KVM_GUESTDBG_SINGLESTEP) plus a hardware execute breakpoint (DR0)
   at the address where the software CPU went (or, after an aborted attempt, the next instruction). The
   breakpoint is what makes the step exact on hosts that emulate guest ring 0: their emulator runs an
   exception handler's first instruction before trapping, runs the instruction after an IRET, completes an OUT
   before exiting, and loses RFLAGS.TF across an IRET to ring 3, where the guest then runs natively. A REP
   string instruction traps after some iterations with RIP unchanged; KVM is resumed until it moves on.
   Such hosts also deliver the single-step trap of a native ring-3 instruction to the guest's #DB handler
   instead of exiting: a second breakpoint on that handler stops KVM there, and the trap is taken back
   (`_undo_debug_trap`: registers from the frame, the frame's stack bytes restored), so ring 3 can be stepped
   only by guests with a present #DB gate on those hosts. And since no breakpoint or trap stops KVM right after
   a return to ring 3, IRET/SYSRET/SYSEXIT from ring 0 to ring 3 are executed by the software CPU alone and its
   result loaded into KVM (`transplant_returns`; on these hosts they are emulated in software anyway). Port
   and MMIO exits go to the machine's buses (`popek.accel.exits.handle_exit`) and are recorded; emulation
   failures are completed with `popek.accel.kvm_assist`, as the KVM backend does.
3. After an aborted attempt the software CPU executes the instruction again, its reads answered from KVM's
   recorded accesses (same port or address, same size, in the same order; anything else is an "io"
   divergence). Its writes are compared with KVM's, never performed twice.
4. The two states are compared (`popek.accel.kvm_convert.ArchState`: GPRs, RIP, RFLAGS without TF and RF, which
   single-stepping disturbs, segment registers, TR, LDTR, GDTR, IDTR, CR0, CR2, CR3, CR4, EFER), then the bytes
   each side's instruction wrote to memory (as iced-x86 lists the instruction's memory writes; not the frames
   of exception delivery, nor REP strings), both memories read at the address the software CPU's page tables
   give.

What is taken from KVM instead of compared:
- Flags the SDM leaves undefined after the instruction (`undefined_flags`, table `UNDEFINED_FLAGS` below): a
  difference only there is not a divergence, and the software CPU takes KVM's values, so that the next
  instructions compare from equal states.
- The results of CPUID, RDTSC, RDTSCP, RDPMC, RDRAND and RDSEED (`NONDETERMINISTIC`): the software CPU executes the
  instruction (faults included) and then takes KVM's output registers (and RDRAND/RDSEED's flags).
- Reads from devices KVM keeps in the kernel (PIC, PIT, port 0x61, ELCR, local APIC, I/O APIC), which never
  exit to popek: the software CPU gets the value from KVM's destination register after the step, where the
  instruction is IN or a MOV load; writes to them are not compared. Any other form is an "io" divergence.

Interrupts: the KVM side keeps the in-kernel irqchip and PIT, so the machine's devices work as with `--accel kvm`,
but nothing is replayed on the software CPU (it has no interrupt source). An interrupt KVM delivers shows up as a
divergence; when KVM's RIP is then at (or one instruction into) the handler of IDT vector 2 or >= 32 the kind is
"external event" and the vector is named. Guests to check should run with interrupts off, or until their first.
HLT ends the run (single-stepping KVM does not wait in HLT): reason "halted".

Limits: one vCPU. SYSCALL from ring 3 on hosts that do only half of it (`popek.accel.kvm_syscall`) is reported as
a divergence, not completed. A guest that sets RFLAGS.TF or uses debug registers conflicts with the single-step
machinery. A REP string instruction reading MMIO cannot be replayed if it had already done iterations. x87/SSE
registers and MSRs are not compared (their effects show up in GPRs or memory soon enough).

The package has one module per job: `compare` (what is compared and what is taken from KVM, the replayed device
accesses, the divergence report), `driver` (`Lockstep`, the single-step driver of steps 1-4) and `backend`
(`LockstepAccel`, `--accel lockstep` behind the builder's backend protocol).
"""

from popek.accel.lockstep.backend import LockstepAccel
from popek.accel.lockstep.compare import Divergence, Outcome, undefined_flags
from popek.accel.lockstep.driver import Lockstep, copy_guest_memory, run_lockstep

__all__ = ["Divergence", "Lockstep", "LockstepAccel", "Outcome", "copy_guest_memory", "run_lockstep", "undefined_flags"]
