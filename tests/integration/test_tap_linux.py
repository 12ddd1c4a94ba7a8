"""The default Linux guest on a TAP device (`net="tap:NAME,ip=..."`, root only), in a network namespace of its own
(`unshare -n`) so the host's network is never touched: a bridge pbr0 (10.77.0.1/24) with two TAP ports, ptap0
and ptap1. The guest on ptap0, given a static address on the kernel command line (popek.ip=), fetches a page
from an HTTP server on the bridge's address and serves a line to a host client (both directions, no NAT); then
it is snapshotted and stopped, and its clone on ptap1 has a MAC of its own (the device's, which the guest's eth0
took through the agent's REFRESH) that the host's neighbour table learns from its traffic. Last, a VM confined as
`popek run --jail` confines it (its own mount, PID and IPC namespaces, but the TAP device's network namespace) on
ptap2 fetches the same page.

The scenario runs in a child Python (`unshare -n python3 -c ...`: this process stays in the host's namespace)
that prints one JSON line of what it saw."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from popek import image

from .guests import KVM_MARKS

pytestmark = [
    *KVM_MARKS,
    pytest.mark.linux,
    pytest.mark.slow,
    pytest.mark.timeout(2700),
    pytest.mark.skipif(os.geteuid() != 0, reason="TAP devices and a network namespace need root"),
    pytest.mark.skipif(not os.path.exists("/dev/net/tun"), reason="needs /dev/net/tun"),
    pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("ip") is None, reason="needs unshare and ip"),
]

SCENARIO = textwrap.dedent(
    r'''
    import http.server, json, socket, subprocess, sys, threading, time
    import popek

    def sh(*argv):
        subprocess.run(argv, check=True, capture_output=True)

    sh("ip", "link", "set", "lo", "up")
    sh("ip", "link", "add", "pbr0", "type", "bridge")
    sh("ip", "addr", "add", "10.77.0.1/24", "dev", "pbr0")
    sh("ip", "link", "set", "pbr0", "up")
    for tap in ("ptap0", "ptap1", "ptap2"):
        sh("ip", "tuntap", "add", tap, "mode", "tap")
        sh("ip", "link", "set", tap, "master", "pbr0")
        sh("ip", "link", "set", tap, "up")

    PAGE = b"popek-tap-page\n"

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAGE)))
            self.end_headers()
            self.wfile.write(PAGE)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("10.77.0.1", 8000), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    seen = {}
    fetch = ["sh", "-c", "timeout 60 wget -q -O - http://10.77.0.1:8000/page"]

    def mac_of(vm):
        return vm.exec(["cat", "/sys/class/net/eth0/address"], check=True).stdout.decode().strip()

    def neighbour():
        out = subprocess.run(["ip", "neigh", "show", "10.77.0.2", "dev", "pbr0"], capture_output=True, text=True)
        words = out.stdout.split()
        return words[words.index("lladdr") + 1] if "lladdr" in words else None

    def from_the_guest(vm):
        """The host connects to a server in the guest: one line back (retried while the guest's nc starts)."""
        script = ("echo guest-line | timeout 120 nc -l -p 8080 & "
                  "n=0; while ! grep -q ':1F90 00000000:0000 0A' /proc/net/tcp && [ $n -lt 300 ]; "
                  "do sleep 0.2; n=$((n+1)); done; echo listening; wait")
        done = {}
        t = threading.Thread(target=lambda: done.update(r=vm.exec(["sh", "-c", script], timeout=200)), daemon=True)
        t.start()
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("10.77.0.2", 8080), timeout=20) as conn:
                    data = b""
                    while b"\n" not in data:
                        chunk = conn.recv(100)
                        if not chunk:
                            break
                        data += chunk
                    if data:
                        t.join(60)
                        return data.decode().strip()
            except OSError:
                time.sleep(1)
        return None

    folder = sys.argv[1]
    with popek.VM(mem="256M", net="tap:ptap0,ip=10.77.0.2/24", cold=True, boot_timeout=900) as vm:
        seen["original_device_mac"] = vm.net.mac_text
        seen["original_mac"] = mac_of(vm)
        seen["original_fetch"] = vm.exec(fetch, check=True, timeout=120).stdout.decode()
        seen["original_served"] = from_the_guest(vm)
        seen["original_neighbour"] = neighbour()
        vm.snapshot(folder)
    with popek.VM.restore(folder, net="tap:ptap1") as clone:
        seen["clone_device_mac"] = clone.net.mac_text
        seen["clone_mac"] = mac_of(clone)
        seen["clone_fetch"] = clone.exec(fetch, check=True, timeout=120).stdout.decode()
        seen["clone_neighbour"] = neighbour()
    # a confined VMM (popek run --jail) keeps this network namespace for its TAP device, and nothing else of the host
    jailed = subprocess.run(
        [sys.executable, "-m", "popek", "run", "--jail", "--mem", "256M", "--boot-timeout", "900",
         "--net", "tap:ptap2,ip=10.77.0.3/24", "--", *fetch],
        capture_output=True, text=True, timeout=1200,
    )
    seen["jailed_fetch"] = jailed.stdout
    seen["jailed_status"] = str(jailed.returncode) + " " + jailed.stderr[-3000:]
    print(json.dumps(seen))
    '''
)


@pytest.fixture(scope="module")
def seen(guest: image.GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str | None]]:
    folder: Path = tmp_path_factory.mktemp("tap") / "snap"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), *sys.path])}
    done = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", SCENARIO, str(folder)],
        capture_output=True, text=True, timeout=2400, env=env, check=False,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, f"the scenario failed ({done.returncode}):\n{done.stderr[-6000:]}"
    yield json.loads(lines[-1])


def test_a_guest_on_a_tap_reaches_the_host_and_is_reached(seen: dict[str, str | None]) -> None:
    assert seen["original_mac"] == seen["original_device_mac"]
    assert seen["original_fetch"] == "popek-tap-page\n"
    assert seen["original_served"] == "guest-line"
    assert seen["original_neighbour"] == seen["original_mac"]


def test_its_clone_on_the_same_bridge_has_a_mac_of_its_own(seen: dict[str, str | None]) -> None:
    assert seen["clone_mac"] == seen["clone_device_mac"] != seen["original_mac"]
    assert seen["clone_fetch"] == "popek-tap-page\n"
    assert seen["clone_neighbour"] == seen["clone_mac"], "the host still knows the guest by the snapshot's MAC"


def test_a_jailed_vm_on_a_tap_reaches_the_host(seen: dict[str, str | None]) -> None:
    assert seen["jailed_fetch"] == "popek-tap-page\n", seen["jailed_status"]
