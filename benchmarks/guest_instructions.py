"""Instructions a kernel executes before it hands over to userspace, under QEMU's TCG with `-icount shift=0`:
popek's default guest kernel against Debian's generic kernel (linux-image-amd64), same initramfs, same command
line, measured in the same run.

    python3 benchmarks/guest_instructions.py [--generic PATH_TO_VMLINUZ] [--mem 256]

With `-icount shift=0` QEMU's virtual clock advances one nanosecond per guest instruction (and jumps over the
time the CPU sits idle in HLT, which makes the figure an upper bound on instructions executed). The kernel's
printk timestamp on "Run /init as init process" is read from the console (printk.time=1), so the figure is
"virtual nanoseconds = instructions (plus idle) from reset to the hand-over to /init". The wall-clock time QEMU
TCG needs to reach the same line is printed beside it.

Debian's generic kernel is taken from the package's .deb (`apt-get download`, unpacked into popek's cache, no
system install) unless --generic names a vmlinuz.
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

MARKER = re.compile(rb"\[\s*(\d+)\.(\d{6})\] Run /init as init process")


def generic_kernel() -> Path:
    """Debian's generic amd64 kernel image, unpacked from its package into the cache (once per version)."""
    from popek.image import cache_dir

    meta = subprocess.run(
        ["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"Depends: (linux-image-\S+-amd64)", meta)
    if found is None:
        sys.exit("cannot find the package behind linux-image-amd64 (run apt-get update)")
    package = found.group(1)
    dest = cache_dir() / "bench" / package
    kernels = sorted(dest.glob("boot/vmlinuz-*"))
    if not kernels:
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(["apt-get", "download", package], cwd=tmp, check=True, capture_output=True)
            deb = next(Path(tmp).glob("*.deb"))
            dest.mkdir(parents=True, exist_ok=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
        kernels = sorted(dest.glob("boot/vmlinuz-*"))
    return kernels[-1]


def measure(kernel: Path, initrd: Path, append: str, mem: int, timeout: float) -> tuple[int | None, float, str]:
    """(virtual ns at the hand-over to /init, wall seconds, note)."""
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-icount", "shift=0,sleep=off", "-m", str(mem), "-nographic",
        "-no-reboot", "-cpu", "max", "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", f"{append} printk.time=1",
    ]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    seen = b""
    try:
        while time.monotonic() - start < timeout:
            chunk = proc.stdout.read1(65536)
            if not chunk:
                break
            seen += chunk
            found = MARKER.search(seen)
            if found:
                ns = int(found.group(1)) * 1_000_000_000 + int(found.group(2)) * 1000
                return ns, time.monotonic() - start, ""
        tail = seen.decode(errors="replace").strip().splitlines()[-2:]
        return None, time.monotonic() - start, "no hand-over to /init: " + " | ".join(tail)[:200]
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--generic", type=Path, help="a vmlinuz to compare with (default: Debian's generic)")
    parser.add_argument("--mem", type=int, default=256, help="MiB")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    if shutil.which("qemu-system-x86_64") is None:
        sys.exit("needs qemu-system-x86 (apt-get install qemu-system-x86)")
    from popek import image

    guest = image.ensure_default_guest(progress=False)
    generic = args.generic or generic_kernel()
    append = guest.cmdline
    rows = [
        ("popek default guest (vmlinux, PVH)", guest.kernel),
        ("popek default guest (bzImage)", guest.bzimage),
        (f"Debian generic ({generic.name})", generic),
    ]
    results = []
    for name, kernel in rows:
        ns, seconds, note = measure(kernel, guest.initrd, append, args.mem, args.timeout)
        results.append((name, ns, seconds, note))
    print(f"QEMU TCG -icount shift=0, {args.mem} MiB, initramfs {guest.initrd}, append {append!r}")
    for name, ns, seconds, note in results:
        count = f"{ns / 1e6:9.1f} M instructions" if ns is not None else "        -              "
        print(f"{name:<44} {count}   TCG wall {seconds:6.1f} s   {note}")
    base, generic_ns = results[0][1], results[-1][1]
    if base and generic_ns:
        print(f"ratio default guest / Debian generic: {base / generic_ns:.3f}")


if __name__ == "__main__":
    main()
