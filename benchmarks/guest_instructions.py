"""Instructions a guest executes from reset to its kernel's hand-over to /init and to userspace, counted exactly by
QEMU's TCG in record mode: popek's default guest kernel against Debian's generic kernel (linux-image-amd64), same
initramfs, same command line, measured in the same run.

    python3 benchmarks/guest_instructions.py [--generic PATH_TO_VMLINUZ] [--mem 256]

QEMU runs with `-icount shift=0,rr=record` and a QMP socket; when a marker appears on the console the script
asks QMP `query-replay` for the instruction count. The guest keeps running for the few milliseconds the query
takes, so a figure may be high by up to about a million instructions. (Printk timestamps would not do: Linux
restarts its clock at TSC initialisation, after the decompressor and early setup have run.)

Debian's generic kernel is taken from the package's .deb (`apt-get download`, unpacked into popek's cache, no
system install) unless --generic names a vmlinuz.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKERS = (b"Run /init as init process", b"popek-guest-ready")


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


def _qmp(path: Path) -> tuple[socket.socket, object]:
    for _ in range(100):
        try:
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(str(path))
            break
        except OSError:
            time.sleep(0.05)
    else:
        raise RuntimeError("QEMU's QMP socket did not appear")
    stream = sock.makefile("rw")
    stream.readline()  # greeting
    stream.write(json.dumps({"execute": "qmp_capabilities"}) + "\n")
    stream.flush()
    stream.readline()
    return sock, stream


def _icount(stream: object) -> int:
    stream.write(json.dumps({"execute": "query-replay"}) + "\n")  # type: ignore[attr-defined]
    stream.flush()  # type: ignore[attr-defined]
    while True:
        reply = json.loads(stream.readline())  # type: ignore[attr-defined]
        if "return" in reply:
            return int(reply["return"]["icount"])


def measure(kernel: Path, initrd: Path, append: str, mem: int, timeout: float) -> tuple[list[int | None], float]:
    """(instructions at each of MARKERS, wall seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        qmp_path, rr_path = Path(tmp) / "qmp.sock", Path(tmp) / "replay.bin"
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-icount", f"shift=0,rr=record,rrfile={rr_path}",
            "-m", str(mem), "-display", "none", "-serial", "stdio", "-no-reboot", "-cpu", "max",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
        ]  # fmt: skip
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout is not None
        counts: list[int | None] = [None] * len(MARKERS)
        seen = b""
        try:
            sock, stream = _qmp(qmp_path)
            with sock:
                while time.monotonic() - start < timeout and None in counts:
                    chunk = proc.stdout.read1(65536)
                    if not chunk:
                        break
                    seen += chunk
                    for i, marker in enumerate(MARKERS):
                        if counts[i] is None and marker in seen:
                            counts[i] = _icount(stream)
        finally:
            proc.kill()
            proc.wait()
        return counts, time.monotonic() - start


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
    append = f"{guest.cmdline} {image.command_parameter(['true'])}"
    rows = [
        ("popek default guest (vmlinux, PVH)", guest.kernel),
        ("popek default guest (bzImage)", guest.bzimage),
        (f"Debian generic ({generic.name})", generic),
    ]
    results = []
    for name, kernel in rows:
        counts, seconds = measure(kernel, guest.initrd, append, args.mem, args.timeout)
        results.append((name, counts, seconds))
    print(f"QEMU TCG -icount shift=0,rr=record, {args.mem} MiB, initramfs {guest.initrd}, append {append!r}")
    for name, counts, seconds in results:
        cells = [f"{c / 1e6:8.1f} M" if c is not None else "       - " for c in counts]
        print(f"{name:<44} to /init {cells[0]}   to userspace {cells[1]}   (TCG record mode {seconds:5.1f} s)")
    base, generic_counts = results[0][1][1], results[-1][1][1]
    if base and generic_counts:
        print(f"ratio default guest / Debian generic (to userspace): {base / generic_counts:.3f}")


if __name__ == "__main__":
    main()
