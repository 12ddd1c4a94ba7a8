"""virtio-blk 4 KiB random IOPS in the Debian guest, popek `--accel kvm` against QEMU 7.2 TCG in the same run.

    python3 benchmarks/blk_iops.py [--seconds 20] [--mib 64]

busybox has no fio, and a `dd` per request would measure process creation, so the guest is popek's Debian 12 root
disk (`popek image build --rootfs debian`) and the requests come from its python3: a data disk of `--mib` MiB
opened with O_DIRECT (no page cache), one 4 KiB request at a time (queue depth 1) at a random aligned offset, reads
for `--seconds` then writes for `--seconds`, counted and timed by the guest's monotonic clock. QEMU runs the same
kernel, initramfs, root disk (`snapshot=on`: the cached image is not changed) and script on its `microvm` machine
(the same virtio-mmio transport; `-accel kvm` cannot boot Linux on this host), with the data disk `cache=none`.
Both find the data disk by its serial, so the order in which the transports are probed does not matter.
"""

from __future__ import annotations

import argparse
import base64
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import popek
from popek.image import rootfs

MIB = 1 << 20
SERIAL = "popek-iops"
_RESULT = re.compile(r"popek-iops (read|write) (\d+) ([\d.]+)")


def guest_script(seconds: float) -> str:
    """The guest's python3 program: the data disk by its serial, then QD1 random 4 KiB reads, then writes."""
    return f"""
import glob, mmap, os, random, time
(dev,) = [p.split("/")[3] for p in glob.glob("/sys/block/vd*/serial") if open(p).read().strip() == "{SERIAL}"]
fd = os.open("/dev/" + dev, os.O_RDWR | os.O_DIRECT)
blocks = os.lseek(fd, 0, os.SEEK_END) // 4096
buf = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
buf.write(b"popek" * 819)
rng = random.Random(7)
for mode in ("read", "write"):
    n, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < {seconds}:
        offset = rng.randrange(blocks) * 4096
        done = os.preadv(fd, [buf], offset) if mode == "read" else os.pwritev(fd, [buf], offset)
        assert done == 4096, done
        n += 1
    print("popek-iops", mode, n, round(time.monotonic() - t0, 3), flush=True)
os.fsync(fd)
"""


def results(output: str, who: str) -> dict[str, float]:
    found = {m[1]: int(m[2]) / float(m[3]) for m in _RESULT.finditer(output)}
    if set(found) != {"read", "write"}:
        raise SystemExit(f"{who}: the guest printed no IOPS lines:\n{output[-3000:]}")
    return found


def qemu_run(root: rootfs.RootfsImage, data: Path, script: str, timeout: float) -> str:
    shell = f"python3 -c {_quote(script)}"
    encoded = base64.urlsafe_b64encode(shell.encode()).decode()
    argv = [
        "qemu-system-x86_64", "-M", "microvm,acpi=off", "-nographic", "-no-reboot", "-m", "512", "-cpu", "max",
        "-accel", "tcg", "-kernel", str(root.guest.kernel), "-initrd", str(root.guest.initrd),
        "-append", f"{root.cmdline} popek.cmd={encoded}",
        "-drive", f"file={root.disk},if=none,id=root,format=raw,snapshot=on",
        "-device", f"virtio-blk-device,drive=root,serial={rootfs.ROOT_SERIAL}",
        "-drive", f"file={data},if=none,id=data,format=raw,cache=none",
        "-device", f"virtio-blk-device,drive=data,serial={SERIAL}",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, errors="replace", timeout=timeout, check=False)
    return done.stdout + done.stderr


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of reads, then of writes")
    parser.add_argument("--mib", type=int, default=64, help="the data disk's size")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    if not 0 < args.seconds <= 3600 or not 1 <= args.mib <= 65536:
        parser.error("--seconds is in (0, 3600] and --mib in [1, 65536]")
    root = rootfs.ensure_rootfs("debian")
    script = guest_script(args.seconds)
    with tempfile.TemporaryDirectory(prefix="popek-iops-") as tmp:
        data = Path(tmp) / "data.img"
        with open(data, "wb") as f:
            f.truncate(args.mib * MIB)
        qemu = results(qemu_run(root, data, script, args.timeout), "QEMU")
        t0 = time.monotonic()
        with popek.VM(image="debian", disks=[f"{data},serial={SERIAL}"], boot_timeout=args.timeout) as vm:
            boot = time.monotonic() - t0
            r = vm.exec(["python3", "-c", script], timeout=args.timeout)
        out = r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
        ours = results(out, f"popek (exit {r.exit_code})")
    print(f"Debian root disk {root.key}: popek --accel kvm booted to its agent in {boot:.1f} s; "
          f"QD1 4 KiB O_DIRECT on a {args.mib} MiB disk, {args.seconds:g} s each")  # fmt: skip
    print("| | popek `--accel kvm` | QEMU 7.2 TCG (microvm) | popek / QEMU |")
    print("|---|---|---|---|")
    for mode in ("read", "write"):
        print(f"| 4 KiB random {mode}s, IOPS | {ours[mode]:.1f} | {qemu[mode]:.1f} | {ours[mode] / qemu[mode]:.4f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
