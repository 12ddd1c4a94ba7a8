"""The daemon (popek serve) with VMs restored from one snapshot: API latency, and how many idle VMs fit.

    python3 benchmarks/daemon.py [--latency 100] [--peer 100] [--density 16] [--mem 256M] [--accel kvm]
                                 [--snapshot DIR]

One daemon on a temporary socket; the default guest boots once in it (`--mem`), is snapshotted through the API
(POST /vms/{id}/snapshots) and deleted (or `--snapshot DIR`, a snapshot of the default guest taken already, with
`--mem` its memory size: no boot). Then, in one run:
- API latency, `--latency` times in sequence: POST /vms {"snapshot"} -> the first answer of an exec of `true`
  (POST /vms/{id}/exec, retried every 10 ms while the VM is still starting) -> DELETE /vms/{id}; the time of
  each step and of the whole cycle. The peer, `--peer` times in the same run: the same snapshot with
  `popek.VM.restore(dir)` -> `vm.exec(["true"])` -> `vm.close()` in this process, no daemon and no VM process
  of its own: what the daemon's process per VM, its HTTP API and its agent proxying cost on top.
- VMs per host, `--density` VMs: all POSTed from the snapshot at once, each idle after one exec. Each VM
  process's RSS and PSS (/proc/PID/smaps_rollup, benchmarks/snapshot.py's `rollup`), the daemon's own RSS, and
  MemAvailable (/proc/meminfo) before and after. How many fit:
      per VM  = max(sum PSS / N, (MemAvailable before - after) / N)
      fit     = floor(MemAvailable before / per VM)
  (PSS divides the pages the VMs share, the snapshot's memory they only read and the interpreter's, among them;
  the MemAvailable drop also counts what the kernel spends on them. A VM whose guest touches all its memory
  costs up to guest memory + its VMM's own PSS; `fit, touched` gives that bound.)
The host's load average is printed with each phase: other work on the machine moves every figure here.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import popek
from popek.daemon.client import ApiError, Client, RemoteVM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from snapshot import parse_size, rollup  # benchmarks/snapshot.py: one smaps_rollup reader

READY_TIMEOUT = 1200.0
RETRY = 0.01


def meminfo(field: str = "MemAvailable") -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise SystemExit(f"no {field} in /proc/meminfo")


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def percentiles(samples: list[float]) -> tuple[float, float, float, float]:
    """(median, p90, p99, max); percentiles by linear interpolation between the closest ranks."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0], samples[0]
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return statistics.median(samples), cuts[89], cuts[98], max(samples)


def serve(sock: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "popek", "serve", "--socket", str(sock)], stdout=out, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 60
    while not sock.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the daemon did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    return process


def first_exec(vm: RemoteVM, deadline: float, retry: float = RETRY) -> None:
    """The first answer of `true` in a VM that is still restoring: 409 (starting, booting) and 503 (the agent
    not yet listening) are retried every `retry` s; any other state is the end of the run."""
    while True:
        try:
            vm.exec(["true"], check=True)
            return
        except ApiError as exc:
            waiting = exc.status == 503 or (
                exc.status == 409 and (" is starting" in str(exc) or " is booting" in str(exc))
            )
            if not waiting or time.monotonic() > deadline:
                raise SystemExit(f"{vm.name}: {exc}\n{vm.console().decode(errors='replace')[-3000:]}") from exc
            time.sleep(retry)


def latency(client: Client, snap: Path, count: int) -> dict[str, list[float]]:
    steps: dict[str, list[float]] = {"POST /vms": [], "-> first exec": [], "DELETE": [], "cycle": []}
    for i in range(count):
        t0 = time.monotonic()
        vm = client.create(name=f"lat-{i}", snapshot=str(snap), boot_timeout=READY_TIMEOUT)
        t1 = time.monotonic()
        first_exec(vm, t0 + READY_TIMEOUT)
        t2 = time.monotonic()
        vm.delete()
        t3 = time.monotonic()
        for key, value in zip(steps, (t1 - t0, t2 - t0, t3 - t2, t3 - t0), strict=True):
            steps[key].append(value)
        print(f"  daemon {i + 1}/{count}: POST {t1 - t0:.2f} s, first exec {t2 - t0:.2f} s, DELETE {t3 - t2:.2f} s "
              f"({load()})", flush=True)  # fmt: skip
    return steps


def peer(snap: Path, count: int) -> dict[str, list[float]]:
    steps: dict[str, list[float]] = {"-> first exec": [], "close": [], "cycle": []}
    for i in range(count):
        t0 = time.monotonic()
        vm = popek.VM.restore(snap, boot_timeout=READY_TIMEOUT)
        try:
            vm.start()
            vm.exec(["true"], check=True)
            t1 = time.monotonic()
        finally:
            vm.close()
        t2 = time.monotonic()
        for key, value in zip(steps, (t1 - t0, t2 - t1, t2 - t0), strict=True):
            steps[key].append(value)
        print(f"  in-process {i + 1}/{count}: first exec {t1 - t0:.2f} s, close {t2 - t1:.2f} s ({load()})", flush=True)
    return steps


def density(client: Client, sock: Path, snap: Path, count: int, mem: int, daemon_pid: int) -> None:
    before = meminfo()
    print(f"\ndensity: {count} idle VMs from one snapshot ({load()})", flush=True)
    t0 = time.monotonic()
    vms: list[RemoteVM] = []
    lock = threading.Lock()

    def post(i: int) -> None:
        with Client(sock, timeout=600) as own:
            created = own.create(name=f"idle-{i}", snapshot=str(snap), boot_timeout=READY_TIMEOUT)
        vm = RemoteVM(client, created.id, created.name)
        first_exec(vm, time.monotonic() + READY_TIMEOUT, retry=0.5)  # 16 pollers must not load the cores
        with lock:
            vms.append(vm)

    try:
        with ThreadPoolExecutor(count) as pool:
            for future in [pool.submit(post, i) for i in range(count)]:
                future.result()
        ready = time.monotonic() - t0
        time.sleep(5)  # idle: let the restores' last page faults and the guests' timers settle
        after = meminfo()
        per_vm = []
        for vm in vms:
            pid = int(vm.info()["pid"])
            per_vm.append(rollup(pid))
        daemon_rss, daemon_pss = rollup(daemon_pid)
        metrics_rss = client.metrics()["daemon"]["rss"]
        print(f"  all {count} answered in {ready:.1f} s ({load()})")
    finally:
        t1 = time.monotonic()
        with ThreadPoolExecutor(min(count, 8)) as pool:
            list(pool.map(lambda vm: vm.delete(), vms))
        print(f"  deleted in {time.monotonic() - t1:.1f} s")
    rss = [r for r, _ in per_vm]
    pss = [p for _, p in per_vm]
    drop = max(0, before - after)
    cost = max(sum(pss) / count, drop / count)
    fit = math.floor(before / cost)
    touched = math.floor(before / (mem + statistics.median(pss)))
    mib = 2**20
    print("\n| VMs | RSS per VM (median, max) | PSS per VM (median, max) | sum PSS | daemon RSS (PSS) | "
          "MemAvailable before -> after | per VM | fit | fit, touched |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {count} | {statistics.median(rss) / mib:.0f}, {max(rss) / mib:.0f} MiB | "
          f"{statistics.median(pss) / mib:.0f}, {max(pss) / mib:.0f} MiB | {sum(pss) / mib:.0f} MiB | "
          f"{daemon_rss / mib:.0f} MiB ({daemon_pss / mib:.0f}; /metrics {metrics_rss / mib:.0f}) | "
          f"{before / mib:.0f} -> {after / mib:.0f} MiB ({drop / mib:.0f}) | {cost / mib:.1f} MiB | {fit} | "
          f"{touched} |")  # fmt: skip


def table(title: str, steps: dict[str, list[float]]) -> None:
    print(f"\n{title}\n\n| step | median | p90 | p99 | max |\n|---|---|---|---|---|")
    for key, samples in steps.items():
        cells = " | ".join(f"{x * 1000:.0f} ms" for x in percentiles(samples))
        print(f"| {key} | {cells} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", type=int, default=100, help="create -> exec -> delete cycles through the daemon")
    ap.add_argument("--peer", type=int, default=100, help="restore -> exec -> close cycles in this process")
    ap.add_argument("--density", type=int, default=16, help="idle VMs at once (0: skip)")
    ap.add_argument("--mem", default="256M")
    ap.add_argument("--accel", default="kvm")
    ap.add_argument("--snapshot", type=Path, help="an existing snapshot of the default guest (no base boot)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="popek-daemonbench-"))
    sock, snap = tmp / "popek.sock", tmp / "snap"
    print(f"popek daemon benchmark, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {os.cpu_count()} cores, "
          f"MemTotal {meminfo('MemTotal') / 2**30:.1f} GiB ({load()})", flush=True)  # fmt: skip
    process = serve(sock, tmp / "daemon.log")
    client = Client(sock, timeout=600)
    try:
        if args.snapshot is not None:
            shutil.copytree(args.snapshot, snap)  # its own copy: the original's owner may remove it meanwhile
            print(f"snapshot: a copy of {args.snapshot}; cgroups: {client.metrics()['cgroups']}", flush=True)
        else:
            t0 = time.monotonic()
            base = client.create(name="base", mem=args.mem, accel=args.accel, boot_timeout=READY_TIMEOUT)
            base.wait_ready(timeout=READY_TIMEOUT, interval=0.2)
            booted = time.monotonic() - t0
            t0 = time.monotonic()
            base.snapshot(snap)
            print(f"base VM ({args.mem}) ready in {booted:.1f} s; snapshot in {time.monotonic() - t0:.2f} s; "
                  f"cgroups: {client.metrics()['cgroups']}", flush=True)  # fmt: skip
            base.delete()
        results = []
        if args.latency:
            print(f"\nAPI latency, {args.latency} cycles ({load()})", flush=True)
            results.append((f"daemon: POST /vms (snapshot) -> first exec -> DELETE, {args.latency} in sequence",
                            latency(client, snap, args.latency)))  # fmt: skip
        if args.peer:
            print(f"\nin-process peer, {args.peer} cycles ({load()})", flush=True)
            results.append((f"peer: popek.VM.restore -> exec -> close in-process, {args.peer} in sequence",
                            peer(snap, args.peer)))  # fmt: skip
        for title, steps in results:
            table(title, steps)
        if len(results) == 2:
            daemon_steps, peer_steps = results[0][1], results[1][1]
            for key in ("-> first exec", "cycle"):
                d, p = percentiles(daemon_steps[key]), percentiles(peer_steps[key])
                print(f"ratio daemon / in-process, {key}: median {d[0] / p[0]:.2f}, p99 {d[2] / p[2]:.2f}")
        if args.density:
            density(client, sock, snap, args.density, parse_size(args.mem), process.pid)
        print(f"\nend ({load()})")
    finally:
        try:
            for info in client.list():
                client.get(info["id"]).delete()
        finally:
            client.close()
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
