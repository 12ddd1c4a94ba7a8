"""Clones of a networked guest are machines of their own on the network: the default Linux guest on passt
(`net="passt"`), booted once and snapshotted; each clone restored from that snapshot gets a virtio-net device with
a random MAC of its own, the guest's eth0 takes that MAC when the agent first answers (REFRESH, MAC), and the
clone's network works through its own passt (it fetches a page from an HTTP server on the host loopback, which
passt maps to the gateway address, passt(1) NOTES). A clone given a MAC of the caller's gets exactly that one."""

from __future__ import annotations

import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import popek
from popek.api import VM
from popek.devices.virtio.net import NetSpec

from .guests import KVM_MARKS

PAGE = b"popek-clone-net-page\n"

pytestmark = [
    *KVM_MARKS,
    pytest.mark.linux,
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(shutil.which("passt") is None, reason="needs passt (Debian package passt)"),
]


class PageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_port() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), PageHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


def fetch(vm: VM, port: int) -> bytes:
    script = f"gw=$(ip route | awk '/^default/ {{print $3}}'); timeout 60 wget -q -O - http://$gw:{port}/page"
    return vm.exec(["sh", "-c", script], check=True, timeout=120).stdout


def guest_mac(vm: VM) -> str:
    return vm.exec(["cat", "/sys/class/net/eth0/address"], check=True).stdout.decode().strip()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, http_port: int) -> Iterator[tuple[Path, str]]:
    folder = tmp_path_factory.mktemp("net-snapshot") / "snap"
    with popek.VM(mem="256M", net="passt", cold=True, boot_timeout=900) as vm:
        assert fetch(vm, http_port) == PAGE
        mac = guest_mac(vm)
        assert vm.net is not None and mac == vm.net.mac_text
        vm.snapshot(folder)
    yield folder, mac


def test_each_clone_gets_a_mac_of_its_own_and_its_network_works(saved: tuple[Path, str], http_port: int) -> None:
    folder, original = saved
    with VM.restore(folder) as first, VM.restore(folder) as second:
        macs = []
        for clone in (first, second):
            assert clone.net is not None and clone.net.backend == "passt"
            mac = guest_mac(clone)
            assert mac == clone.net.mac_text, "the guest's eth0 did not take its device's MAC"
            macs.append(mac)
            assert fetch(clone, http_port) == PAGE
        assert len({original, *macs}) == 3, f"clones share a MAC: {original} {macs}"


def test_a_clone_given_a_mac_gets_that_one(saved: tuple[Path, str], http_port: int) -> None:
    folder, _ = saved
    chosen = bytes.fromhex("525400c10e01")
    with VM.restore(folder, net=NetSpec("passt", mac=chosen)) as clone:
        assert guest_mac(clone) == "52:54:00:c1:0e:01"
        assert fetch(clone, http_port) == PAGE
