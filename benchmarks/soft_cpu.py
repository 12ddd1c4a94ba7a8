"""Guest instructions per second of popek's software CPU against QEMU's TCG on the same CPU-bound guest, measured
in the same run.

    python3 benchmarks/soft_cpu.py [--popek-iterations 200000] [--qemu-iterations 200000000]

The guest is a Multiboot kernel (both VMMs load it with -kernel) that runs a loop of four integer instructions
(ADD, XOR, DEC, JNZ) a given number of times, in 32-bit protected mode, then ends the VM through the debug-exit
port (QEMU: isa-debug-exit at 0xF4). Instructions executed = 4 * iterations (plus a few dozen around the loop).
Each VMM gets a count that makes its run take seconds, so start-up time is small against the loop; the rate is
instructions / wall time. popek's own figure is also checked against the instructions its --stats reports.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GUEST = """bits 32
org 0x100000
header:
    dd 0x1BADB002
    dd 0x00010000
    dd -(0x1BADB002 + 0x00010000)
    dd header, header, end, end, start
start:
    mov ecx, {iterations}
    xor eax, eax
    xor ebx, ebx
.loop:
    add eax, ecx
    xor ebx, eax
    dec ecx
    jnz .loop
    mov al, 0
    out 0xf4, al
    hlt
end:
"""
INSTRUCTIONS_PER_ITERATION = 4


def build(tmp: Path, iterations: int) -> Path:
    src, out = tmp / f"loop{iterations}.asm", tmp / f"loop{iterations}.bin"
    src.write_text(GUEST.format(iterations=iterations))
    subprocess.run(["nasm", "-f", "bin", "-o", str(out), str(src)], check=True)
    return out


def timed(argv: list[str]) -> tuple[float, str]:
    start = time.monotonic()
    r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    return time.monotonic() - start, r.stdout + r.stderr


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--popek-iterations", type=int, default=200_000)
    parser.add_argument("--qemu-iterations", type=int, default=200_000_000)
    args = parser.parse_args()
    if shutil.which("nasm") is None or shutil.which("qemu-system-x86_64") is None:
        sys.exit("needs nasm and qemu-system-x86")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        popek_guest, qemu_guest = build(tmp, args.popek_iterations), build(tmp, args.qemu_iterations)
        seconds, out = timed(
            [sys.executable, "-m", "popek", "run", "--accel", "soft", "--kernel", str(popek_guest), "--stats"]
        )
        retired = re.search(r"^instructions: (\d+) retired", out, re.MULTILINE)
        if retired is None:
            sys.exit("popek did not report its instruction count:\n" + out[-2000:])
        popek_instructions = int(retired.group(1))
        expected = INSTRUCTIONS_PER_ITERATION * args.popek_iterations
        if not expected <= popek_instructions < expected + 100:
            sys.exit(f"popek retired {popek_instructions} instructions, expected about {expected}")
        qemu_seconds, _ = timed(
            ["qemu-system-x86_64", "-accel", "tcg", "-m", "64", "-display", "none", "-no-reboot",
             "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel", str(qemu_guest)]
        )  # fmt: skip
        qemu_instructions = INSTRUCTIONS_PER_ITERATION * args.qemu_iterations
    popek_rate, qemu_rate = popek_instructions / seconds, qemu_instructions / qemu_seconds
    print(f"popek --accel soft: {popek_instructions} instructions in {seconds:.2f} s = {popek_rate / 1e6:.3f} M/s")
    print(f"qemu -accel tcg:    {qemu_instructions} instructions in {qemu_seconds:.2f} s = {qemu_rate / 1e6:.1f} M/s")
    print(f"ratio popek / qemu tcg: {popek_rate / qemu_rate:.5f}")


if __name__ == "__main__":
    main()
