"""The default guest's init configures eth0 by itself: its real network lines, run by busybox on the host inside a
network and mount namespace of the test's own, where eth0 is a TAP device relayed (by popek's TapHost) to a real
passt in the host's namespace. DHCP from passt sets the address, the default route and /etc/resolv.conf; a
static popek.ip= sets them without DHCP; without eth0 the section does nothing and waits for nothing."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from popek.image.build import recipe_init

BUSYBOX = Path("/bin/busybox")
ROOT = Path(__file__).resolve().parents[3]

pytestmark = [
    pytest.mark.skipif(not BUSYBOX.is_file(), reason="busybox-static is not installed"),
    pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare(1)"),
]

# In the namespaces: eth0 is a TAP device whose frames go to and from passt's socket (fd PASST_FD); the init's
# network section runs with /proc/cmdline replaced by a file, and then the result is printed.
CHILD = r"""
import os, select, subprocess, sys, threading
from popek.devices.virtio.net import StreamHost, TapHost
import socket
mode, section, cmdline, bindir = sys.argv[1:5]
for target in ("/run", "/etc"):
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", target], check=True)
subprocess.run(["mount", "-t", "sysfs", "sysfs", "/sys"], check=True)  # /sys/class/net of this namespace
if mode != "none":
    tap = TapHost.open("eth0")
if mode == "tap":
    passt = StreamHost(socket.socket(fileno=int(os.environ["PASST_FD"])))
    def relay():
        while True:
            readable, _, _ = select.select([tap.fd, passt.fd], [], [])
            if tap.fd in readable and (frame := tap.recv_frame()) is not None:
                passt.send_frame([memoryview(frame)])
            if passt.fd in readable:
                while (frame := passt.recv_frame()) is not None:
                    tap.send_frame([memoryview(frame)])
    threading.Thread(target=relay, daemon=True).start()
script = open(section).read().replace("/proc/cmdline", cmdline)
r = subprocess.run([bindir + "/sh", "-c", script], env={"PATH": bindir}, capture_output=True, text=True, timeout=60)
print("status", r.returncode, r.stdout, r.stderr)
def show(*argv):
    print(" ".join(argv), "=>", subprocess.run(argv, capture_output=True, text=True).stdout.strip())
show("ip", "-o", "-4", "addr", "show", "dev", "eth0") if mode != "none" else None
show("ip", "route")
show("cat", "/etc/resolv.conf")
show("ip", "-o", "link", "show", "lo")
"""


def network_section() -> str:
    """init's lines from `ip link set lo up` to the end of the eth0 block."""
    lines = recipe_init().decode().splitlines()
    start = lines.index("ip link set lo up")
    end = next(i for i in range(start, len(lines)) if lines[i] == "fi")
    return "\n".join(lines[start : end + 1]) + "\n"


def run_section(tmp_path: Path, mode: str, cmdline: str) -> tuple[str, float]:
    probe = subprocess.run(["unshare", "-n", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create namespaces: {probe.stderr.decode().strip()}")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for applet in ("sh", "ip", "udhcpc", "cat", "chmod", "echo"):
        (bindir / applet).symlink_to(BUSYBOX)
    (tmp_path / "section.sh").write_text(network_section())
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    argv = ["unshare", "-n", "-m", sys.executable, "-c", CHILD, mode, str(tmp_path / "section.sh")]
    argv += [str(tmp_path / "cmdline"), str(bindir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    host = None
    pass_fds: list[int] = []
    if mode == "tap":
        from popek.devices.virtio.net import PasstHost

        host = PasstHost()  # in the host's namespace, where passt finds the host's addresses
        child_end = os.dup(host.sock.fileno())
        os.set_blocking(child_end, False)
        env["PASST_FD"] = str(child_end)
        pass_fds.append(child_end)
    started = time.monotonic()
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, pass_fds=pass_fds, cwd=ROOT)
    finally:
        for fd in pass_fds:
            os.close(fd)
        if host is not None:
            host.close()
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout, time.monotonic() - started


@pytest.mark.skipif(shutil.which("passt") is None, reason="passt is not installed (apt-get install passt)")
def test_init_takes_eth0_s_address_route_and_dns_from_passt_by_dhcp(tmp_path: Path) -> None:
    out, _ = run_section(tmp_path, "tap", "console=ttyS0")
    assert out.startswith("status 0"), out
    addr_line = next(line for line in out.splitlines() if line.startswith("ip -o -4 addr"))
    assert " inet " in addr_line, out
    route_line = next(line for line in out.splitlines() if line.startswith("ip route"))
    assert "default via" in route_line, out
    # passt hands out the host's own address and gateway (passt(1) NOTES): the guest has the same
    host_route = subprocess.run(["ip", "route", "show", "default"], capture_output=True, text=True).stdout
    if host_route.startswith("default via"):
        assert host_route.split()[2] in route_line, out
    resolv = next(line for line in out.splitlines() if line.startswith("cat /etc/resolv.conf"))
    assert "nameserver" in resolv or not Path("/etc/resolv.conf").read_text().strip(), out
    assert "lo: <LOOPBACK,UP" in out, out
    socket.inet_aton(addr_line.split(" inet ")[1].split("/")[0])  # a dotted-quad address


def test_a_static_address_on_the_command_line_needs_no_dhcp(tmp_path: Path) -> None:
    """popek.ip= with no eth0 reaching anything: the section sets it and returns at once (no udhcpc wait)."""
    out, elapsed = run_section(tmp_path, "static", "console=ttyS0 popek.ip=10.7.0.2/24,10.7.0.1 quiet")
    assert out.startswith("status 0"), out
    assert "default via 10.7.0.1 dev eth0" in out and "inet 10.7.0.2/24" in out, out
    assert elapsed < 20, elapsed


def test_without_eth0_the_section_only_brings_up_loopback(tmp_path: Path) -> None:
    out, elapsed = run_section(tmp_path, "none", "console=ttyS0")
    assert out.startswith("status 0"), out
    assert "lo: <LOOPBACK,UP" in out and "eth0" not in out and "\nip route => \n" in out, out
    assert elapsed < 20, elapsed
