"""The default Linux guest's virtio devices and agent, popek against QEMU 7.2 TCG in the same run.

    python3 benchmarks/virtio_linux.py [--mib 8] [--exec-calls 200] [--file-mib 4]

- virtio-blk: the guest's `dd` writes then reads `--mib` MiB of a raw image in 1 MiB blocks with O_DIRECT (so
  the page cache does not answer), timed in the guest from /proc/uptime; MB/s on popek `--accel kvm` and on QEMU
  TCG with the same kernel, initramfs and image. QEMU's `microvm` machine is the peer because it has the same
  transport (virtio-mmio, announced on the command line); `-accel kvm` cannot boot Linux on this host. Host CPU
  per MB: popek's process time across the guest's dd; QEMU's, a run with the transfer minus a run without.
- The agent (popek only: QEMU has no vsock without /dev/vhost-vsock): `vm.exec(["true"])` round trips (median,
  p99) against the host spawning `true` itself, and `vm.files.write/read` MB/s against the host writing and
  reading the same bytes through a file.

4 KiB random IOPS is benchmarks/blk_iops.py's (busybox has no fio, and a `dd` per request would measure process
creation: it runs python3 in the Debian root disk).
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import popek
from popek.image.build import ensure_default_guest

MIB = 1 << 20
_TIMES = re.compile(rb"popek-bench ([\d.]+) ([\d.]+) ([\d.]+)")


def dd_script(mib: int) -> str:
    """Write then read `mib` MiB of /dev/vda with O_DIRECT, printing /proc/uptime before, between and after."""
    return (
        "read a _ </proc/uptime; "
        f"dd if=/dev/zero of=/dev/vda bs=1M count={mib} oflag=direct 2>/dev/null; "
        "read b _ </proc/uptime; "
        f"dd if=/dev/vda of=/dev/null bs=1M count={mib} iflag=direct 2>/dev/null; "
        "read c _ </proc/uptime; echo popek-bench $a $b $c"
    )


def rates(output: bytes, mib: int) -> tuple[float, float]:
    """Write and read MB/s from the script's line (uptime has 10 ms steps: a run shorter than that is 'inf')."""
    match = _TIMES.search(output)
    if match is None:
        raise SystemExit(f"the guest printed no timing line:\n{output[-2000:].decode(errors='replace')}")
    a, b, c = (float(x) for x in match.groups())
    mb = mib * MIB / 1e6
    return (mb / (b - a) if b > a else float("inf")), (mb / (c - b) if c > b else float("inf"))


def qemu_run(kernel: Path, initrd: Path, cmdline: str, image: Path, script: str) -> tuple[bytes, float]:
    """One QEMU microvm TCG boot running `script`; its output and the CPU seconds it used."""
    encoded = base64.urlsafe_b64encode(script.encode()).decode()
    argv = [
        "qemu-system-x86_64", "-M", "microvm,acpi=off", "-nographic", "-no-reboot", "-m", "256", "-cpu", "max",
        "-accel", "tcg", "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", f"{cmdline} popek.cmd={encoded}",
        "-drive", f"file={image},if=none,id=d0,format=raw,cache=none", "-device", "virtio-blk-device,drive=d0",
    ]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, capture_output=True, timeout=300, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return done.stdout + done.stderr, cpu


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency_rows(label: str, ours: list[float], peer: list[float], digits: int = 2) -> list[str]:
    """Two markdown rows, the median and the p99 of two sets of seconds, in ms, and their ratio (ours / peer)."""
    rows = []
    for name, pick in (("median", statistics.median), ("p99", lambda v: percentile(v, 0.99))):
        a, b = pick(ours) * 1e3, pick(peer) * 1e3
        rows.append(f"| {label} {name}, ms ({len(ours)}) | {a:.{digits}f} | {b:.{digits}f} | {a / b:.1f} |")
    return rows


def host_exec(calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        subprocess.run(["true"], check=True)
        out.append(time.perf_counter() - t0)
    return out


def host_files(data: bytes, folder: Path) -> tuple[float, float]:
    path = folder / "host-copy"
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
    t1 = time.perf_counter()
    back = path.read_bytes()
    t2 = time.perf_counter()
    assert back == data
    return len(data) / 1e6 / (t1 - t0), len(data) / 1e6 / (t2 - t1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=8, help="MiB the guest's dd writes and reads")
    parser.add_argument("--exec-calls", type=int, default=200, help="vm.exec(['true']) round trips")
    parser.add_argument("--file-mib", type=int, default=4, help="MiB through vm.files.write and read")
    parser.add_argument("--boot-timeout", type=float, default=1800)
    args = parser.parse_args()
    guest = ensure_default_guest()
    with tempfile.TemporaryDirectory(prefix="popek-bench-") as tmp:
        folder = Path(tmp)
        image = folder / "disk.img"
        with open(image, "wb") as f:
            f.truncate(max(64, 2 * args.mib) * MIB)

        out, qemu_cpu = qemu_run(guest.kernel, guest.initrd, guest.cmdline, image, dd_script(args.mib))
        qemu_w, qemu_r = rates(out, args.mib)
        _, qemu_idle_cpu = qemu_run(guest.kernel, guest.initrd, guest.cmdline, image, dd_script(0))
        qemu_cpu_mb = max(0.0, qemu_cpu - qemu_idle_cpu) / (2 * args.mib * MIB / 1e6)

        t0 = time.monotonic()
        with popek.VM(accel="kvm", disks=[str(image)], boot_timeout=args.boot_timeout) as vm:
            boot = time.monotonic() - t0
            cpu0 = time.process_time()
            result = vm.exec(["sh", "-c", dd_script(args.mib)], timeout=3600)
            popek_cpu_mb = (time.process_time() - cpu0) / (2 * args.mib * MIB / 1e6)
            popek_w, popek_r = rates(result.stdout, args.mib)

            latencies = []
            for _ in range(args.exec_calls):
                t = time.perf_counter()
                vm.exec(["true"])
                latencies.append(time.perf_counter() - t)

            data = os.urandom(args.file_mib * MIB)
            t = time.perf_counter()
            vm.files.write("/tmp/popek-bench", data)
            write_s = time.perf_counter() - t
            t = time.perf_counter()
            back = vm.files.read("/tmp/popek-bench")
            read_s = time.perf_counter() - t
            if back != data:
                raise SystemExit("files.read did not return what files.write wrote")
        host_lat = host_exec(args.exec_calls)
        host_w, host_r = host_files(data, folder)

    mb = args.file_mib * MIB / 1e6
    print(f"default guest {guest.key}: popek --accel kvm booted to its agent in {boot:.1f} s; dd of {args.mib} MiB")
    print("| | popek --accel kvm | QEMU 7.2 TCG (microvm) | popek / QEMU |")
    print("|---|---|---|---|")
    print(f"| virtio-blk write, MB/s | {popek_w:.2f} | {qemu_w:.2f} | {popek_w / qemu_w:.4f} |")
    print(f"| virtio-blk read, MB/s | {popek_r:.2f} | {qemu_r:.2f} | {popek_r / qemu_r:.4f} |")
    print(f"| host CPU s per MB moved | {popek_cpu_mb:.3f} | {qemu_cpu_mb:.3f} | "
          f"{popek_cpu_mb / qemu_cpu_mb if qemu_cpu_mb else float('inf'):.1f} |")  # fmt: skip
    print()
    print("| | popek agent | host | popek / host |")
    print("|---|---|---|---|")
    print("\n".join(latency_rows("exec(['true'])", latencies, host_lat)))
    for name, seconds, host in (("write", write_s, host_w), ("read", read_s, host_r)):
        rate = mb / seconds
        print(f"| files.{name} {args.file_mib} MiB, MB/s | {rate:.2f} | {host:.1f} | {rate / host:.4f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
