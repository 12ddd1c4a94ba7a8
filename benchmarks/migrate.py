"""Live migration of the default Linux guest between two popek VMs over a Unix socket: downtime (pause to the
target's OK), total time, pre-copy rounds and bytes, for an idle guest and for one writing memory meanwhile.

    python3 benchmarks/migrate.py [--mem 512M] [--repeat 3]

Source and target run in one process here (the protocol is the same as between two; tests/integration/
test_migrate.py runs them in two). The writing guest rewrites 32 MiB of tmpfs (guest RAM) in a loop with dd from
/dev/urandom while the migration runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
from pathlib import Path

import popek
from popek.api import VM

WRITER = "while true; do dd if=/dev/urandom of=/tmp/blob bs=1M count=32 2>/dev/null; done"


def one(mem: str, workload: str | None, folder: Path) -> tuple[float, float, int, int]:
    address = str(folder / f"migrate-{threading.get_ident()}.sock")
    target = VM.incoming(address)
    started = threading.Thread(target=target.start)
    started.start()
    try:
        with popek.VM(mem=mem) as source:  # a warm start: popek.warm
            if workload:
                source.exec(["sh", "-c", f"setsid sh -c '{workload}' </dev/null >/dev/null 2>&1 &"], check=True)
                source.exec(["sleep", "2"])
            stats = source.migrate(address)
        started.join(300)
        target.exec(["true"], check=True)
        return stats.downtime_s, stats.total_s, stats.rounds, stats.bytes_sent
    finally:
        target.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mem", default="512M")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="popek-migbench-"))
    print("| guest | downtime (median) | total | pre-copy rounds | MiB sent |")
    print("|---|---|---|---|---|")
    for name, workload in (("idle", None), ("writing 32 MiB in a loop", WRITER)):
        runs = [one(args.mem, workload, folder) for _ in range(args.repeat)]
        down = statistics.median(r[0] for r in runs)
        total = statistics.median(r[1] for r in runs)
        rounds = statistics.median(r[2] for r in runs)
        sent = statistics.median(r[3] for r in runs) / 2**20
        print(f"| {name} | {down * 1000:.0f} ms | {total:.2f} s | {rounds:g} | {sent:.1f} |", flush=True)


if __name__ == "__main__":
    main()
