"""The default Linux guest's virtio-net, popek through passt against QEMU 7.2 TCG's user networking, in one run.

    python3 benchmarks/net.py [--mib 2] [--pings 100]

Both VMMs run the same kernel and initramfs with one virtio-mmio network device (QEMU's `microvm` machine has the
same transport; `-accel kvm` cannot boot Linux on this host) and the same guest script:

- **Round-trip latency, host -> guest -> host**: the guest runs `nc -l -p 8080 -e cat` (busybox), the host reaches
  it through a forwarded port (popek `--port`, QEMU `hostfwd`) and sends one byte at a time, `--pings` times,
  waiting for each echo. Median and p99 of the host's clock; no process is created per sample.
- **TCP throughput, guest -> host**: the guest's `dd if=/dev/zero bs=64k | nc GATEWAY PORT` sends `--mib` MiB to a
  sink on the host's loopback, reached through the gateway address (passt maps it to the host's loopback, passt(1)
  NOTES; QEMU's slirp maps 10.0.2.2 the same way). MB/s between the sink's first and last byte. Host CPU per MB:
  popek's process time across the transfer (the VMM and passt are separate processes: passt's is not counted, as
  QEMU's slirp, inside QEMU, is); QEMU's, a run with the transfer minus a run without.

The guest's interface comes up by DHCP in its init on both (passt's DHCP, slirp's).
"""

from __future__ import annotations

import argparse
import base64
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import popek
from popek.image import GuestImage
from popek.image.build import ensure_default_guest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from virtio_linux import latency_rows  # benchmarks/virtio_linux.py: one way to print latency rows

MIB = 1 << 20
# Debian 12's passt (0.0~git20230309) resets a connection the guest opened 24 s after its handshake (a 10 s SYN
# timeout, then 7 retries 2 s apart) unless the host side has sent the guest data by then: the guest's ACK of passt's
# SYN-ACK does not clear the flag that says an ACK is due (tcp.c: tcp_conn_from_tap sets seq_ack_from_tap one past
# seq_to_tap, so that ACK is not "greater"). An upload from a guest whose ring 0 this host emulates takes longer
# than that, so the sink sends the guest one byte when it accepts (QEMU's run gets the same byte).
PASST_QUIRK = "passt 2023-03-09 resets guest-opened connections that received nothing in 24 s"
GUEST_PORT = 8080
READY = "popek-net-ready"
DONE = re.compile(r"popek-net-done (\d+)")


def guest_script(sink_port: int, mib: int) -> str:
    """Serve one echo connection, then send `mib` MiB to the host's sink (0: none), then print how it went."""
    return (
        "gw=$(ip route | awk '/^default/ {print $3}'); "
        f"nc -l -p {GUEST_PORT} -e cat & "
        "n=0; "
        f"while ! grep -q ':{GUEST_PORT:04X} 00000000:0000 0A' /proc/net/tcp && [ $n -lt 600 ]; "
        "do sleep 0.2; n=$((n + 1)); done; "
        f"echo {READY}; wait; "
        f"if [ {mib} -gt 0 ]; then dd if=/dev/zero bs=64k count={mib * 16} 2>/dev/null "
        f"| nc $gw {sink_port} >/dev/null; fi; "
        "echo popek-net-done $?"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Sink:
    """A TCP server on the host's loopback that reads one connection to its end and times its first `expected`
    bytes."""

    expected: int
    listener: socket.socket = field(default_factory=socket.socket)
    received: int = 0
    first: float = 0.0
    last: float = 0.0
    cpu_at_first: float = 0.0
    cpu_at_last: float = 0.0

    def __post_init__(self) -> None:
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(3600)
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def port(self) -> int:
        port: int = self.listener.getsockname()[1]
        return port

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:  # to the sender's end of stream (nc shuts its side down at its input's end): no reset races
            conn.sendall(b"\n")  # see PASST_QUIRK
            while chunk := conn.recv(1 << 16):
                if not self.received:
                    self.first, self.cpu_at_first = time.perf_counter(), time.process_time()
                self.received += len(chunk)
                if self.received >= self.expected and not self.last:
                    self.last, self.cpu_at_last = time.perf_counter(), time.process_time()

    def rate(self) -> float:
        if self.received != self.expected:
            raise SystemExit(f"the sink received {self.received} bytes, not {self.expected}")
        return self.received / 1e6 / (self.last - self.first)


@dataclass
class Pinger:
    """Round trips of one byte through a forwarded port to the guest's echo server, once the guest is ready."""

    port: int
    count: int
    samples: list[float] = field(default_factory=list)
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=120) as conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for i in range(self.count):
                    byte = bytes([65 + i % 26])
                    t0 = time.perf_counter()
                    conn.sendall(byte)
                    if conn.recv(1) != byte:
                        raise OSError("the echo server answered something else")
                    self.samples.append(time.perf_counter() - t0)
        except OSError as e:
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.done.set()

    def check(self) -> list[float]:
        if self.error is not None or len(self.samples) < self.count:
            raise SystemExit(f"round trips failed after {len(self.samples)}: {self.error}")
        return self.samples


def on_lines(pinger: Pinger) -> tuple[list[str], Callable[[bytes], None]]:
    """A stdout callback that starts the pings at the guest's ready line (output arrives in arbitrary chunks)."""
    lines: list[str] = []
    pending = [""]

    def feed(chunk: bytes) -> None:
        pending[0] += chunk.decode(errors="replace")
        *complete, pending[0] = pending[0].split("\n")
        for line in complete:
            lines.append(line)
            if line.strip() == READY:
                pinger.start()

    return lines, feed


def qemu_run(guest: GuestImage, script: str, pinger: Pinger, timeout: float) -> tuple[list[str], float]:
    """One QEMU microvm TCG boot with user networking running `script`; its output lines and its CPU seconds."""
    encoded = base64.urlsafe_b64encode(script.encode()).decode()
    argv = [
        "qemu-system-x86_64", "-M", "microvm,acpi=off", "-nographic", "-no-reboot", "-m", "256", "-cpu", "max",
        "-accel", "tcg", "-kernel", str(guest.kernel), "-initrd", str(guest.initrd),
        "-append", f"{guest.cmdline} popek.cmd={encoded}",
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{pinger.port}-:{GUEST_PORT}",
        "-device", "virtio-net-device,netdev=n0",
    ]  # fmt: skip
    lines, feed = on_lines(pinger)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    for raw in proc.stdout:
        feed(raw)
    proc.wait()
    killer.cancel()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return lines, cpu


def finished(lines: list[str], who: str, received: int) -> None:
    status = next((m[1] for line in lines if (m := DONE.search(line))), None)
    if status != "0":
        tail = "\n".join(lines[-40:])
        raise SystemExit(f"{who}: the guest's transfer did not finish (status {status}, {received} bytes "
                         f"received):\n{tail}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=2, help="MiB the guest sends to the host")
    parser.add_argument("--pings", type=int, default=100, help="one-byte round trips host -> guest -> host")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()
    if args.mib < 1 or args.pings < 1:
        parser.error("--mib and --pings are at least 1")
    guest = ensure_default_guest()
    nbytes = args.mib * MIB

    sink, pinger = Sink(nbytes), Pinger(free_port(), args.pings)
    lines, qemu_cpu = qemu_run(guest, guest_script(sink.port, args.mib), pinger, args.timeout)
    finished(lines, "QEMU", sink.received)
    qemu_rtt, qemu_rate = pinger.check(), sink.rate()
    idle_pinger = Pinger(free_port(), args.pings)
    idle_lines, qemu_idle_cpu = qemu_run(guest, guest_script(0, 0), idle_pinger, args.timeout)
    finished(idle_lines, "QEMU (no transfer)", 0)
    qemu_cpu_mb = max(0.0, qemu_cpu - qemu_idle_cpu) / (nbytes / 1e6)

    sink, pinger = Sink(nbytes), Pinger(free_port(), args.pings)
    t0 = time.monotonic()
    with popek.VM(accel="kvm", net="passt", ports=[f"{pinger.port}:{GUEST_PORT}"], boot_timeout=args.timeout) as vm:
        boot = time.monotonic() - t0
        lines, feed = on_lines(pinger)
        result = vm.exec(["sh", "-c", guest_script(sink.port, args.mib)], timeout=args.timeout, on_stdout=feed)
        feed(b"\n")
    finished(lines, f"popek (exit {result.exit_code}, stderr {result.stderr[-500:]!r})", sink.received)
    popek_rtt, popek_rate = pinger.check(), sink.rate()
    popek_cpu_mb = (sink.cpu_at_last - sink.cpu_at_first) / (nbytes / 1e6)

    print(f"default guest {guest.key}: popek --accel kvm --net passt booted to its agent in {boot:.1f} s; "
          f"{args.mib} MiB guest -> host, {args.pings} round trips")  # fmt: skip
    print("| | popek `--accel kvm`, passt | QEMU 7.2 TCG (microvm), user networking | popek / QEMU |")
    print("|---|---|---|---|")
    print("\n".join(latency_rows("TCP round trip host -> guest -> host", popek_rtt, qemu_rtt, digits=3)))
    print(f"| TCP guest -> host, MB/s ({args.mib} MiB) | {popek_rate:.2f} | {qemu_rate:.2f} | "
          f"{popek_rate / qemu_rate:.4f} |")  # fmt: skip
    ratio = popek_cpu_mb / qemu_cpu_mb if qemu_cpu_mb else float("inf")
    print(f"| host CPU s per MB sent | {popek_cpu_mb:.3f} | {qemu_cpu_mb:.3f} | {ratio:.1f} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
