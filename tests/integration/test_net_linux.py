"""The default Linux guest on the network through passt (`--net passt`), on the KVM backend, booted once: its init
brings eth0 up by DHCP with no step of the user's; the guest fetches a page with wget from an HTTP server this test
runs on the host loopback (passt maps TCP to the gateway address to the host's loopback, passt(1) NOTES); and a
forwarded port (`--port HOST:8080`) reaches a server in the guest (busybox nc), both directions."""

from __future__ import annotations

import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from popek import image

BOOT_TIMEOUT = 900
PAGE = b"popek-net-page-from-the-host\n"
HOST_TO_GUEST = "host-says-hello"
GUEST_TO_HOST = "guest-says-hi"
GUEST_PORT = 8080

pytestmark = [
    pytest.mark.timeout(BOOT_TIMEOUT + 300),
    pytest.mark.kvm,
    pytest.mark.linux,
    pytest.mark.slow,
    pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK), reason="needs a usable /dev/kvm"),
    pytest.mark.skipif(shutil.which("passt") is None, reason="needs passt (Debian package passt)"),
]


def guest_script(http_port: int) -> str:
    # no `wget -T`: Debian 12's static busybox 1.35 wget crashes on that option (on the host as well)
    return f"""
echo "eth0-addr=$(ip -o -f inet addr show dev eth0 | awk '{{print $4}}')"
gw=$(ip route | awk '/^default/ {{print $3}}')
echo "gateway=$gw"
echo "fetched=$(timeout 60 wget -q -O - http://$gw:{http_port}/page.txt)"
echo {GUEST_TO_HOST} | timeout 120 nc -l -p {GUEST_PORT} >/tmp/from-host &
# ready once the socket listens (state 0A in /proc/net/tcp), not after a guess: a slow guest takes seconds
n=0
while ! grep -q ':{GUEST_PORT:04X} 00000000:0000 0A' /proc/net/tcp && [ $n -lt 300 ]; do sleep 0.2; n=$((n + 1)); done
echo guest-server-ready
wait
echo "nc-got=$(cat /tmp/from-host)"
"""


class PageHandler(http.server.BaseHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self) -> None:
        PageHandler.requests.append(self.path)
        if self.path != "/page.txt":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: object) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Run:
    stdout: list[str] = field(default_factory=list)
    stderr: str = ""
    returncode: int | None = None
    from_guest: bytes = b""
    forward_error: str | None = None

    @property
    def log(self) -> str:
        return "stdout:\n" + "".join(self.stdout)[-6000:] + "\nstderr:\n" + self.stderr[-4000:]

    def value(self, key: str) -> str:
        for line in self.stdout:
            if line.startswith(key + "="):
                return line[len(key) + 1 :].strip()
        raise AssertionError(f"no {key}= in the guest's output\n{self.log}")


def talk_to_the_guest(port: int, run: Run) -> None:
    """Through the forwarded host port: send a line to the guest's nc and read its line back."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(HOST_TO_GUEST.encode() + b"\n")
            data = b""
            deadline = time.monotonic() + 30
            while GUEST_TO_HOST.encode() not in data and time.monotonic() < deadline:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            run.from_guest = data
    except OSError as e:
        run.forward_error = f"{type(e).__name__}: {e}"


@pytest.fixture(scope="module")
def net_boot(guest: image.GuestImage) -> Iterator[Run]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    http_port, host_port = server.server_address[1], free_port()
    run = Run()
    argv = [sys.executable, "-m", "popek", "run", "--timeout", str(BOOT_TIMEOUT), "--stats", "--net", "passt"]
    argv += ["--port", f"{host_port}:{GUEST_PORT}", "--", "sh", "-c", guest_script(int(http_port))]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr or []), daemon=True)
    reader.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            run.stdout.append(line)
            if line.strip() == "guest-server-ready":
                threading.Thread(target=talk_to_the_guest, args=(host_port, run), daemon=True).start()
        run.returncode = proc.wait(timeout=BOOT_TIMEOUT + 120)
        reader.join(10)
        run.stderr = "".join(stderr)
        yield run
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.shutdown()
        server.server_close()


def test_init_configures_eth0_by_dhcp_from_passt(net_boot: Run) -> None:
    address = net_boot.value("eth0-addr")
    assert "/" in address and not address.startswith("0."), net_boot.log
    assert net_boot.value("gateway"), net_boot.log
    assert net_boot.returncode == 0, net_boot.log


def test_the_guest_fetches_a_page_from_the_host_with_wget(net_boot: Run) -> None:
    assert net_boot.value("fetched") == PAGE.decode().strip(), net_boot.log
    assert "/page.txt" in PageHandler.requests


def test_a_forwarded_port_reaches_a_server_in_the_guest(net_boot: Run) -> None:
    assert net_boot.forward_error is None, net_boot.forward_error + "\n" + net_boot.log
    assert GUEST_TO_HOST.encode() in net_boot.from_guest, net_boot.log
    assert net_boot.value("nc-got") == HOST_TO_GUEST, net_boot.log


def test_the_device_counted_the_traffic_and_dropped_nothing_malformed(net_boot: Run) -> None:
    line = next((x for x in net_boot.stderr.splitlines() if x.startswith("virtio-net eth0")), None)
    assert line is not None, net_boot.log
    assert "tx-malformed=0" in line and "rx-malformed=0" in line and "LINK DOWN" not in line, line
    counts = re.search(r"tx=(\d+) frames/\d+ bytes rx=(\d+) frames", line)
    assert counts is not None and int(counts[1]) > 0 and int(counts[2]) > 0, line
