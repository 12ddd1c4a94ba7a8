"""Assist cost: µs per instruction that popek completes for KVM (the host's emulator failed on it), against a
plain port-I/O exit of the same VM, measured in the same run.

    python3 benchmarks/assist_cost.py [--count 20000] [--repeat 3]

Each guest is a real-mode boot sector (code the hosts this project runs on emulate instruction by instruction)
that executes one instruction N times in a loop, then writes to the debug-exit port:
- `out dx, al` to an unclaimed port: an ordinary exit (KVM_EXIT_IO, bus dispatch, stats);
- `popcnt eax, ebx` and `pxor xmm0, xmm0`: emulation failures on such hosts, executed by popek's software CPU
  (`popek.accel.kvm_softcpu`) with the vCPU's state loaded from KVM and written back;
- `nop`: the loop alone, subtracted from the others.
Where the host runs an instruction itself (hardware KVM), its row says so: there is nothing for popek to do.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from popek.vm import Vm, VmSpec

# mov eax, cr4 ; or eax, 0x200 (OSFXSR, for SSE) ; mov cr4, eax ; mov ecx, N ; mov dx, 0x510 ; l: INSN ;
# dec ecx ; jnz l ; mov al, 0 ; out 0xf4, al ; hlt
PROLOGUE = bytes.fromhex("0f20e0 660d00020000 0f22e0") + b"\x66\xb9"
INSTRUCTIONS = {
    "nop": bytes.fromhex("90"),
    "out dx, al (port exit)": bytes.fromhex("ee"),
    "popcnt eax, ebx": bytes.fromhex("66f30fb8c3"),
    "pxor xmm0, xmm0": bytes.fromhex("660fefc0"),
}


def boot_sector(insn: bytes, count: int) -> bytes:
    loop = insn + b"\x66\x49"  # INSN ; dec ecx
    code = PROLOGUE + count.to_bytes(4, "little") + b"\xba\x10\x05" + loop
    code += b"\x75" + (-(len(loop) + 2) & 0xFF).to_bytes(1, "little")  # jnz l
    code += b"\xb0\x00\xe6\xf4\xf4"
    return code.ljust(510, b"\0") + b"\x55\xaa"


def run(path: Path) -> tuple[float, int]:
    """Wall time of the guest and the assists popek made."""
    with Vm(VmSpec(kernel=path, mem=16 << 20)) as vm:
        start = time.perf_counter()
        stop = vm.run()
        elapsed = time.perf_counter() - start
        assert stop.status == 1, stop
        assert vm.accel is not None
        return elapsed, sum(vm.accel.assists.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, tuple[float, int]] = {}
    with tempfile.TemporaryDirectory() as d:
        for name, insn in INSTRUCTIONS.items():
            path = Path(d) / "guest.bin"
            path.write_bytes(boot_sector(insn, args.count))
            runs = [run(path) for _ in range(args.repeat)]
            results[name] = (statistics.median(t for t, _ in runs), runs[0][1])
    base = results.pop("nop")[0]
    print(f"instructions per run: {args.count}, median of {args.repeat}; the loop alone: {base:.3f} s")
    per: dict[str, float] = {}
    for name, (elapsed, assists) in results.items():
        per[name] = (elapsed - base) / args.count * 1e6
        note = "" if name.startswith("out") else f"  ({assists} assists)" if assists else "  (run by the host itself)"
        print(f"{name:<24} {per[name]:8.2f} us each{note}")
    exit_cost = per.pop("out dx, al (port exit)")
    for name, cost in per.items():
        print(f"ratio {name} / port exit: {cost / exit_cost:.2f}")


if __name__ == "__main__":
    main()
