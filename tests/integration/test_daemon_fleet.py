"""The daemon under load: ONE daemon (a module fixture) boots the default guest once (256 MiB), snapshots it
through the API and deletes it, then FLEET (four) VMs are POSTed from that snapshot at once, from as many threads.
With all of them running, several client threads (each with its own popek.Client) run commands and move files in every
VM at the same time, and every answer must be the one for that VM and that call: each clone carries an identity
file of its own, and every call echoes a token of its own, so an answer routed to the wrong VM or the wrong
call is caught. The listing and /metrics must show exactly the fleet; a change in one clone must not show in
another; deleting them all must leave no VM process and no socket behind.

Four VMs on this 2-core nested-KVM machine are slow: every wait here is generous (restores that take seconds
alone take minutes together while other engineers' tests share the cores)."""

from __future__ import annotations

import hashlib
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from popek import image
from popek.daemon.client import ApiError, Client, RemoteVM

from . import daemons
from .daemons import alive as _alive
from .guests import linux_marks

BOOT_TIMEOUT = 1200  # one boot, then FLEET restores at once on 2 shared cores
FLEET = 4  # concurrency, not scale: benchmarks/daemon.py measures VMs per host (docs/benchmarks.md)
CLIENTS = 4
ROUNDS = 1  # call groups per (client thread, VM): on a loaded host each agent call takes seconds
ID_FILE = "/tmp/popek-fleet-id"
BASE_FILE = "/tmp/from-the-base"

# pytest-timeout counts the module fixture's setup in the first test: one boot, a snapshot, FLEET restores and then
# 16 call groups on a loaded host (a cold boot took 18 min at load average 7-11) need more than BOOT_TIMEOUT + 600
pytestmark = [pytest.mark.timeout(3 * BOOT_TIMEOUT), *linux_marks(BOOT_TIMEOUT)[1:]]

T = TypeVar("T")


@dataclass
class Fleet:
    socket: Path
    state: Path
    client: Client
    vms: list[RemoteVM]
    pids: dict[str, int]


def _parallel(calls: list[Callable[[], T]], workers: int) -> list[T]:
    """Run the calls on `workers` threads at once; their results in order (the first exception is raised)."""
    with ThreadPoolExecutor(workers) as pool:
        return [future.result() for future in [pool.submit(call) for call in calls]]


def _processes_naming(folder: Path) -> list[int]:
    """PIDs of live processes whose command line names `folder` (the daemon's VM processes name their dirs)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                words = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(str(folder).encode() in word for word in words) and _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def fleet(guest: image.GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    run = tmp_path_factory.mktemp("fleet")
    snap = run / "snap"
    with daemons.running(run, client_timeout=300) as server:
        sock, client = server.socket, server.client
        base = client.create(name="base", mem="256M", boot_timeout=BOOT_TIMEOUT)
        try:
            base.wait_ready(timeout=BOOT_TIMEOUT)
        except ApiError as e:
            pytest.fail(f"the base VM did not boot: {e}\nconsole:\n{base.console().decode(errors='replace')[-6000:]}")
        base.files.write(BASE_FILE, b"written before the snapshot\n")
        base.snapshot(snap)
        base.delete()

        def create(i: int) -> Callable[[], RemoteVM]:
            def post() -> RemoteVM:
                with Client(sock, timeout=300) as own:
                    vm = own.create(name=f"clone-{i}", snapshot=str(snap), boot_timeout=BOOT_TIMEOUT)
                return RemoteVM(client, vm.id, vm.name)

            return post

        vms = _parallel([create(i) for i in range(FLEET)], FLEET)  # FLEET POSTs at once
        for vm in vms:
            try:
                vm.wait_ready(timeout=BOOT_TIMEOUT)
            except ApiError as e:
                tail = vm.console().decode(errors="replace")[-6000:]
                pytest.fail(f"{vm.name} did not restore to its agent: {e}\nconsole:\n{tail}")
        for vm in vms:  # each clone's identity, which every later answer repeats
            vm.files.write(ID_FILE, f"{vm.name} {vm.id}\n".encode())
        pids = {vm.name: int(vm.info()["pid"]) for vm in vms}
        yield Fleet(sock, server.state, client, vms, pids)


def _identity(vm: RemoteVM) -> str:
    return f"{vm.name} {vm.id}\n"


def _calls(vm: RemoteVM, thread: int, round_: int) -> Callable[[RemoteVM], list[str]]:
    """One client thread's calls in one VM, each checked: an exec that repeats the VM's identity, a token of its
    own and the hash of its stdin; a file of the call's own written; the file read back through exec with the
    identity again. What went wrong is returned (nothing when every answer was this VM's and this call's)."""
    token = secrets.token_hex(8)
    payload = f"{vm.name}/{thread}/{round_}/{token}\n".encode() * (1 + 1000 * ((thread + round_) % 2))  # to 60 KiB
    digest = hashlib.sha256(payload).hexdigest()
    path = f"/tmp/t-{thread}-{round_}"

    def run(remote: RemoteVM) -> list[str]:
        wrong: list[str] = []
        first = remote.exec(["sh", "-c", f"cat {ID_FILE}; echo {token}; sha256sum"], stdin=payload)
        if (first.stdout, first.exit_code) != (f"{_identity(vm)}{token}\n{digest}  -\n".encode(), 0):
            wrong.append(f"exec in {vm.name}: {first.stdout!r} {first.stderr!r} {first.exit_code}")
        remote.files.write(path, payload)
        seen = remote.exec(["sh", "-c", f"cat {ID_FILE}; sha256sum {path}; rm {path}"])
        if seen.stdout != f"{_identity(vm)}{digest}  {path}\n".encode():
            wrong.append(f"the file in {vm.name}: {seen.stdout!r} {seen.stderr!r}")
        return wrong

    return run


def test_concurrent_clients_get_each_vms_own_answers(fleet: Fleet) -> None:
    def worker(thread: int) -> list[str]:
        rng = random.Random(thread)
        with Client(fleet.socket, timeout=300) as own:
            mine = [RemoteVM(own, vm.id, vm.name) for vm in fleet.vms]
            work = [(i, r) for i in range(FLEET) for r in range(ROUNDS)]
            rng.shuffle(work)  # each thread goes through the VMs in an order of its own
            wrong: list[str] = []
            for i, r in work:
                wrong += _calls(fleet.vms[i], thread, r)(mine[i])
            return wrong

    started = time.monotonic()
    results = _parallel([lambda t=t: worker(t) for t in range(CLIENTS)], CLIENTS)
    elapsed = time.monotonic() - started
    wrong = [w for result in results for w in result]
    assert wrong == [], wrong
    print(f"{CLIENTS * FLEET * ROUNDS} checked call groups in {elapsed:.1f} s")  # shown with -s


def test_listing_and_metrics_show_exactly_the_fleet_running(fleet: Fleet) -> None:
    listed = fleet.client.list()
    assert sorted(vm["name"] for vm in listed) == sorted(vm.name for vm in fleet.vms)
    assert {vm["name"]: vm["state"] for vm in listed} == {vm.name: "running" for vm in fleet.vms}
    assert {vm["name"]: vm["pid"] for vm in listed} == fleet.pids
    assert len(set(fleet.pids.values())) == FLEET and all(_alive(pid) for pid in fleet.pids.values())
    metrics = fleet.client.metrics()
    assert sorted(vm["name"] for vm in metrics["vms"]) == sorted(fleet.pids)
    for entry in metrics["vms"]:
        assert entry["state"] == "running" and entry["pid"] == fleet.pids[entry["name"]], entry
        assert entry["rss"] > 10 << 20 and isinstance(entry["stats"], str) and entry["stats"], entry

    # several clients listing at once see the same fleet
    def listing() -> list[dict[str, object]]:
        with Client(fleet.socket, timeout=300) as own:
            return own.list()

    snapshots = _parallel([listing for _ in range(CLIENTS)], CLIENTS)
    for seen in snapshots:
        assert {vm["name"]: vm["state"] for vm in seen} == {vm.name: "running" for vm in fleet.vms}


def test_clones_are_independent(fleet: Fleet) -> None:
    first, *others = fleet.vms
    first.files.write("/tmp/only-in-the-first", b"mine\n")
    first.files.remove(BASE_FILE)

    def look(vm: RemoteVM) -> bytes:
        """In one exec: what the base left, this clone's identity, whether the first's file shows, 16 random
        bytes (each clone's generator was reseeded on restore)."""
        script = (
            f"cat {BASE_FILE} 2>&1; cat {ID_FILE}; test -e /tmp/only-in-the-first && echo PRESENT; "
            "head -c 16 /dev/urandom | od -An -tx1"
        )
        return vm.exec(["sh", "-c", script]).stdout

    seen = _parallel([lambda vm=vm: look(vm) for vm in fleet.vms], CLIENTS)
    lines = [out.decode().splitlines() for out in seen]
    assert lines[0][0].endswith("No such file or directory") and lines[0][1] == _identity(first).strip()
    assert "PRESENT" in lines[0]
    for vm, out in zip(others, lines[1:], strict=True):
        assert out[:2] == ["written before the snapshot", _identity(vm).strip()], (vm.name, out)
        assert "PRESENT" not in out, vm.name
    assert len({out[-1] for out in lines}) == FLEET  # no two clones drew the same random bytes


def test_deleting_the_fleet_at_once_leaves_nothing(fleet: Fleet) -> None:
    lock = threading.Lock()
    deleted: list[str] = []

    def delete(vm: RemoteVM) -> Callable[[], None]:
        def call() -> None:
            with Client(fleet.socket, timeout=300) as own:
                own.get(vm.id).delete()
            with lock:
                deleted.append(vm.name)

        return call

    _parallel([delete(vm) for vm in fleet.vms], CLIENTS)
    assert sorted(deleted) == sorted(fleet.pids)
    assert fleet.client.list() == []
    assert fleet.client.metrics()["vms"] == []
    assert list((fleet.state / "vms").iterdir()) == []
    deadline = time.monotonic() + 30  # a VM process is reaped by the daemon as it ends
    while any(_alive(pid) for pid in fleet.pids.values()):
        assert time.monotonic() < deadline, {n: p for n, p in fleet.pids.items() if _alive(p)}
        time.sleep(0.2)
    assert _processes_naming(fleet.state) == []
    assert [p for p in fleet.state.rglob("*") if p.is_socket()] == []
    with pytest.raises(ApiError) as gone:
        fleet.vms[0].exec(["true"])
    assert gone.value.status == 404
