"""Exit cost: µs per port-I/O exit in popek (full VM: bus dispatch, stats) against a bare KVM_RUN loop driving the
same guest through popek.kvm only, measured in the same run.

    python3 benchmarks/exit_cost.py [--exits 200000]

The guest is a boot sector that writes to an unclaimed port N times, then to the debug-exit port.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from popek.accel.kvm_state import apply_entry
from popek.boot import load_kernel
from popek.kvm import ExitReason, Kvm
from popek.memory import GuestMemory
from popek.vm import Vm, VmSpec


def boot_sector(exits: int) -> bytes:
    # mov ecx, N ; mov dx, 0x510 ; l: out dx, al ; dec ecx ; jnz l ; mov al, 0 ; out 0xf4, al ; hlt
    code = b"\x66\xb9" + exits.to_bytes(4, "little") + b"\xba\x10\x05" + b"\xee\x66\x49\x75\xfb"
    code += b"\xb0\x00\xe6\xf4\xf4"
    return code.ljust(510, b"\0") + b"\x55\xaa"


def popek_run(image: Path) -> float:
    with Vm(VmSpec(kernel=image, mem=16 << 20)) as vm:
        start = time.perf_counter()
        vm.run()
        return time.perf_counter() - start


def bare_run(image: bytes) -> float:
    """The least a Python VMM can do per exit: KVM_RUN, look at the exit reason, go back in."""
    kvm = Kvm()
    with GuestMemory(16 << 20) as mem:
        vm = kvm.create_vm()
        vm.set_tss_addr(0xFFFBD000)
        region = mem.regions[0]
        vm.set_user_memory_region(0, 0, region.size, region.host_address)
        vcpu = vm.create_vcpu(0)
        apply_entry(vcpu, load_kernel(mem, image).entry)
        run = vcpu.run_page
        start = time.perf_counter()
        while True:
            vcpu.run()
            if run.exit_reason != ExitReason.IO or run.exit.io.port == 0xF4:
                break
        elapsed = time.perf_counter() - start
        del run
        vcpu.close()
        vm.close()
    kvm.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--exits", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    image = boot_sector(args.exits)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "pio.bin"
        path.write_bytes(image)
        popek = statistics.median(popek_run(path) for _ in range(args.repeat))
        bare = statistics.median(bare_run(image) for _ in range(args.repeat))
    per_popek, per_bare = popek / args.exits * 1e6, bare / args.exits * 1e6
    print(f"exits per run: {args.exits}, median of {args.repeat}")
    print(f"popek VM:        {per_popek:7.2f} us/exit")
    print(f"bare KVM_RUN:    {per_bare:7.2f} us/exit")
    print(f"ratio popek/bare: {per_popek / per_bare:.2f}")


if __name__ == "__main__":
    main()
