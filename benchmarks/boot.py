"""Boot time and VMM memory overhead: popek against QEMU (TCG, and KVM where QEMU can use it) on the same kernel,
initrd and command line, measured in the same run.

    python3 benchmarks/boot.py [--kernel vmlinux --initrd initrd.cpio] [--mem 256] [--marker TEXT]

Time is from process start to the first appearance of the marker on the serial console (default: the default
guest's init announcing userspace, `popek-guest-ready`). Memory overhead is the VMM's resident set minus the
resident part of its guest-RAM mapping (from /proc/PID/smaps), sampled when the marker appears. A peer that cannot
reach the marker is reported as such, with the end of its output.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MARKER = "popek-guest-ready"


@dataclass
class Result:
    name: str
    seconds: float | None
    overhead_kib: int | None
    note: str = ""


def rss_overhead_kib(pid: int, guest_bytes: int) -> int | None:
    """RSS minus the RSS of the mapping that holds guest RAM (the anonymous mapping of exactly that size)."""
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return None
    total, guest = 0, 0
    size = 0
    for line in text.splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            size = end - start
        elif line.startswith("Rss:"):
            kib = int(line.split()[1])
            total += kib
            if size >= guest_bytes and size <= guest_bytes + (4 << 20):
                guest = max(guest, kib)
    return total - guest


def measure(name: str, argv: list[str], marker: str, guest_bytes: int, timeout: float) -> Result:
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    seen = b""
    try:
        while time.monotonic() - start < timeout:
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                seen += chunk
                if marker.encode() in seen:
                    elapsed = time.monotonic() - start
                    return Result(name, elapsed, rss_overhead_kib(proc.pid, guest_bytes))
            elif proc.poll() is not None:
                break
        tail = seen.decode(errors="replace").strip().splitlines()[-3:]
        return Result(name, None, None, "did not reach the marker: " + " | ".join(tail)[:300])
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernel", type=Path)
    parser.add_argument("--initrd", type=Path)
    parser.add_argument("--append")
    parser.add_argument("--mem", type=int, default=256, help="MiB")
    parser.add_argument("--marker", default=DEFAULT_MARKER)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    if args.kernel is None:
        from popek import image

        guest = image.ensure_default_guest(progress=False)
        args.kernel, args.initrd = guest.kernel, guest.initrd
        args.append = args.append or guest.cmdline
    append = args.append or "console=ttyS0 reboot=k panic=-1"
    guest_bytes = args.mem << 20
    popek = [
        sys.executable,
        "-m",
        "popek",
        "run",
        "--kernel",
        str(args.kernel),
        "--append",
        append,
        "--mem",
        f"{args.mem}M",
        "--timeout",
        str(args.timeout),
    ]
    qemu = [
        "qemu-system-x86_64",
        "-nographic",
        "-no-reboot",
        "-m",
        str(args.mem),
        "-kernel",
        str(args.kernel),
        "-append",
        append,
        "-cpu",
        "max",
    ]
    if args.initrd:
        popek += ["--initrd", str(args.initrd)]
        qemu += ["-initrd", str(args.initrd)]
    results = [measure("popek (kvm)", popek, args.marker, guest_bytes, args.timeout)]
    results.append(measure("qemu -accel tcg", [*qemu, "-accel", "tcg"], args.marker, guest_bytes, args.timeout))
    results.append(
        measure(
            "qemu -accel kvm",
            [*qemu[:-2], "-cpu", "host", "-accel", "kvm"],
            args.marker,
            guest_bytes,
            min(args.timeout, 300),
        )
    )
    print(f"kernel {args.kernel}, {args.mem} MiB, marker {args.marker!r}")
    for r in results:
        t = f"{r.seconds:8.1f} s" if r.seconds is not None else "       - "
        m = f"{r.overhead_kib / 1024:8.1f} MiB" if r.overhead_kib is not None else "        - "
        print(f"{r.name:<18} time {t}   VMM overhead {m}   {r.note}")
    base = results[0]
    for r in results[1:]:
        if base.seconds and r.seconds:
            print(f"time ratio popek / {r.name}: {base.seconds / r.seconds:.2f}")
        if base.overhead_kib and r.overhead_kib:
            print(f"memory overhead ratio popek / {r.name}: {base.overhead_kib / r.overhead_kib:.2f}")


if __name__ == "__main__":
    main()
