"""Snapshots of the default Linux guest: restore against cold boot, snapshot cost, and what clones share.

    python3 benchmarks/snapshot.py [--sizes 128M,512M,2G] [--clones 1,4,16] [--accel kvm]

For each guest memory size, in one run:
- cold boot: `popek.VM(cold=True)` to the agent's first answer (the default guest's boot), once per size;
- snapshot: a full snapshot of the booted VM (time, bytes on disk, memory size), then a diff snapshot after a
  command ran (time, pages, bytes on disk);
- restore: `popek.VM.restore(dir)` to the VM built and running (the first guest instruction runs right after:
  Vm.restore returns a machine whose run() enters the guest) and to the first `vm.exec(["true"])` answer,
  median of `--repeat` restores;
- clones (first size only): N clones of one snapshot, each in a process of its own as a daemon would run them,
  idle after one exec; the sum of their RSS and of their PSS (/proc/PID/smaps_rollup: PSS divides each shared
  page among the processes mapping it), so what the clones share shows as RSS - PSS.
The peer is Firecracker's published snapshot restore figures (docs/benchmarks.md quotes them with their source);
Firecracker cannot run here (no /dev/kvm it can use for Linux and no network to fetch it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import popek

CLONE = """
import sys, popek
vm = popek.VM.restore(sys.argv[1])
vm.start()
vm.exec(["true"], check=True)
print("ready", flush=True)
sys.stdin.readline()
vm.close()
"""


def parse_size(text: str) -> int:
    from popek.cli import parse_size as parse

    return parse(text)


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in folder.iterdir() if f.is_file())


def rollup(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in bytes, from /proc/PID/smaps_rollup."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] in ("Rss:", "Pss:"):
            values[parts[0]] = int(parts[1]) * 1024
    return values["Rss:"], values["Pss:"]


def clones(folder: Path, count: int) -> tuple[int, int, float]:
    """Start `count` clone processes of `folder`; (sum RSS, sum PSS, seconds until all answered)."""
    started = time.monotonic()
    procs = [
        subprocess.Popen([sys.executable, "-c", CLONE, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for _ in range(count)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            if p.stdout.readline().strip() != b"ready":
                raise SystemExit("a clone did not start")
        elapsed = time.monotonic() - started
        rss = pss = 0
        for p in procs:
            r, s = rollup(p.pid)
            rss, pss = rss + r, pss + s
        return rss, pss, elapsed
    finally:
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
        for p in procs:
            p.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128M,512M,2G")
    ap.add_argument("--clones", default="1,4,16")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--accel", default="kvm")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="popek-snapbench-"))
    rows = []
    first_folder: Path | None = None
    for size in args.sizes.split(","):
        folder = tmp / f"snap-{size}"
        t0 = time.monotonic()
        with popek.VM(mem=size, accel=args.accel, cold=True) as vm:
            boot = time.monotonic() - t0
            vm.pause()
            t0 = time.monotonic()
            vm.snapshot(folder)
            full_s = time.monotonic() - t0
            full_disk = disk_bytes(folder)
            vm.resume()
            vm.exec(["sh", "-c", "echo x > /root/x"], check=True)
            vm.pause()
            t0 = time.monotonic()
            manifest = vm.snapshot(folder, diff=True)
            diff_s = time.monotonic() - t0
            diff_pages = sum(n for _, n in manifest.diff_pages or ())
            diff_disk = disk_bytes(folder) - full_disk
        built, answered = [], []
        for _ in range(args.repeat):
            t0 = time.monotonic()
            clone = popek.VM.restore(folder)
            clone.start(wait=False)
            built.append(time.monotonic() - t0)
            clone.wait_ready()
            clone.exec(["true"], check=True)
            answered.append(time.monotonic() - t0)
            clone.close()
        rows.append((size, boot, full_s, full_disk, diff_s, diff_pages, diff_disk,
                     statistics.median(built), statistics.median(answered)))  # fmt: skip
        print(f"{size}: cold boot {boot:.1f} s; full snapshot {full_s:.2f} s, {full_disk / 2**20:.1f} MiB on disk; "
              f"diff {diff_s:.2f} s, {diff_pages} pages, {diff_disk / 2**20:.1f} MiB; restore to running "
              f"{statistics.median(built) * 1000:.0f} ms, to first exec {statistics.median(answered):.2f} s "
              f"({boot / statistics.median(answered):.0f}x faster than the cold boot)", flush=True)  # fmt: skip
        if first_folder is None:
            first_folder = folder
    print("\n| guest | cold boot | full snapshot (s, MiB on disk) | diff (s, pages) | restore: running | "
          "restore: first exec | boot / restore |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for size, boot, full_s, full_disk, diff_s, pages, _, built_s, answered_s in rows:
        print(f"| {size} | {boot:.1f} s | {full_s:.2f}, {full_disk / 2**20:.1f} | {diff_s:.2f}, {pages} | "
              f"{built_s * 1000:.0f} ms | {answered_s:.2f} s | {boot / answered_s:.0f}x |")  # fmt: skip
    assert first_folder is not None
    print("\n| clones | sum RSS | sum PSS | shared (RSS - PSS) | all answered |")
    print("|---|---|---|---|---|")
    for count in (int(n) for n in args.clones.split(",")):
        rss, pss, elapsed = clones(first_folder, count)
        print(f"| {count} | {rss / 2**20:.0f} MiB | {pss / 2**20:.0f} MiB | {(rss - pss) / 2**20:.0f} MiB | "
              f"{elapsed:.1f} s |", flush=True)  # fmt: skip
    os.system(f"rm -rf {tmp}")


if __name__ == "__main__":
    main()
