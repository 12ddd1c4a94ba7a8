"""Supervision (popek/daemon/supervisor.py) with real child processes that are not VMs: a child that dies is
reported crashed with its exit status or signal and the console tail, one that stops in order (its exit file) is
stopped, a restarted supervisor adopts live processes and records dead ones; the daemon's socket (server.py) is
0600, atomic and one per daemon; the VM process's control pieces (vmproc.py) answer 501 for methods popek.VM
lacks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import sys
from pathlib import Path

import pytest

from popek.daemon import vmproc
from popek.daemon.server import SocketLock
from popek.daemon.supervisor import Cgroups, Supervisor, VmRecord
from popek.errors import ConfigError

SLEEPER = (
    "import json, pathlib, signal, sys, time\n"
    "d = pathlib.Path(sys.argv[1])\n"
    "def stop(*_):\n"
    "    (d / 'exit.json').write_text(json.dumps({'cause': 'stopped by SIGTERM'}))\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, stop)\n"
    "(d / 'console.log').write_bytes(b'guest says: about to die\\n')\n"
    "time.sleep(float(sys.argv[2]))\n"
    "sys.exit(int(sys.argv[3]))\n"
)


def sleeper(seconds: float, status: int = 0) -> object:
    """A VM-process stand-in: writes a console line, sleeps, exits with status (SIGTERM: an orderly stop). Its
    directory is its last... second word; adoption checks the last word, so the dir goes last for those tests."""

    def command(workdir: Path) -> list[str]:
        return [sys.executable, "-c", SLEEPER, str(workdir), str(seconds), str(status)]

    return command


def adoptable(workdir: Path) -> list[str]:
    return [sys.executable, "-c", "import time; time.sleep(60)", str(workdir)]


def make(tmp_path: Path, command: object) -> Supervisor:
    return Supervisor(tmp_path / "state", command=command, cgroups=Cgroups(root=tmp_path / "none"))  # type: ignore[arg-type]


async def wait_exit(record: VmRecord, timeout: float = 20) -> None:
    await asyncio.wait_for(record.exited.wait(), timeout)


def test_a_child_that_exits_with_a_status_is_crashed_with_it(tmp_path: Path) -> None:
    async def go() -> VmRecord:
        sup = make(tmp_path, sleeper(0, 3))
        await sup.open()
        record = sup.create({"cpus": 1}, "a")
        sup.start(record)
        assert record.live
        await wait_exit(record)
        await sup.close()
        return record

    record = asyncio.run(go())
    assert record.state == "crashed"
    assert record.cause is not None and "exited with status 3" in record.cause
    assert "about to die" in record.cause  # the console tail
    assert json.loads((record.dir / "record.json").read_text())["state"] == "crashed"


def test_kill_9_is_reported_as_sigkill_and_other_vms_live_on(tmp_path: Path) -> None:
    async def go() -> tuple[VmRecord, VmRecord]:
        sup = make(tmp_path, sleeper(60))
        await sup.open()
        a, b = sup.create({}, "a"), sup.create({}, "b")
        sup.start(a)
        sup.start(b)
        assert a.pid is not None
        os.kill(a.pid, signal.SIGKILL)
        await wait_exit(a)
        assert b.live and not b.exited.is_set()
        while not (b.dir / "console.log").exists():  # its SIGTERM handler is in place
            await asyncio.sleep(0.01)
        await sup.stop(b)
        await sup.close()
        return a, b

    a, b = asyncio.run(go())
    assert a.state == "crashed" and a.cause is not None and "killed by SIGKILL" in a.cause
    assert b.state == "stopped" and b.cause == "stopped by SIGTERM"
    assert not (a.dir / vmproc.CONTROL).exists()


def test_restart_adopts_live_processes_and_records_dead_ones(tmp_path: Path) -> None:
    async def first() -> tuple[int, int]:
        sup = make(tmp_path, adoptable)
        await sup.open()
        live, dead = sup.create({}, "live"), sup.create({}, "dead")
        sup.start(live)
        sup.start(dead)
        assert live.pid is not None and dead.pid is not None
        await sup.close()  # the daemon goes; its VM processes stay
        return live.pid, dead.pid

    live_pid, dead_pid = asyncio.run(first())
    os.kill(dead_pid, signal.SIGKILL)
    os.waitpid(dead_pid, 0)  # (this test process is their parent; a real daemon's children are reparented)

    async def second() -> tuple[VmRecord, VmRecord, str | None]:
        sup = make(tmp_path, adoptable)
        await sup.open()
        live, dead = sup.find("live"), sup.find("dead")
        assert live.live and live.pid == live_pid
        assert not dead.live
        os.kill(live_pid, signal.SIGKILL)
        await wait_exit(live)
        cause = live.cause
        await sup.close()
        return live, dead, cause

    live, dead, cause = asyncio.run(second())
    os.waitpid(live_pid, 0)
    assert dead.state == "crashed" and dead.cause is not None and "no daemon watched" in dead.cause
    assert live.state == "crashed" and cause is not None and "adopted" in cause


def test_a_reused_pid_is_not_adopted(tmp_path: Path) -> None:
    """A record whose pid now belongs to another process (its command line does not name the VM's dir)."""

    async def go() -> VmRecord:
        sup = make(tmp_path, adoptable)
        await sup.open()
        record = sup.create({}, "x")
        record.state, record.pid = "running", os.getpid()  # this test process is certainly no VM process
        record.persist()
        sup2 = make(tmp_path, adoptable)
        await sup2.open()
        return sup2.find("x")

    record = asyncio.run(go())
    assert record.state == "crashed" and not record.live


def test_a_stop_before_the_process_is_set_up_is_a_stop(tmp_path: Path) -> None:
    async def go() -> VmRecord:
        sup = make(tmp_path, adoptable)  # no SIGTERM handler: SIGTERM kills it
        await sup.open()
        record = sup.create({}, "a")
        sup.start(record)
        await sup.stop(record)
        await sup.close()
        return record

    record = asyncio.run(go())
    assert record.state == "stopped" and record.cause is not None and "SIGTERM" in record.cause


BUSY_AFTER_ONE_ANSWER = (
    "import json, pathlib, socket, sys, time\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "s.bind(str(pathlib.Path(sys.argv[1]) / 'control.sock'))\n"
    "s.listen(16)\n"
    "held = []\n"
    "while True:\n"
    "    c, _ = s.accept()\n"
    "    c.recv(4096)\n"
    "    if not held:\n"
    "        c.sendall(json.dumps({'state': 'running'}).encode() + b'\\n')\n"
    "    held.append(c)  # every later request is read and never answered: a VM process too busy to answer\n"
)


def test_a_missed_status_probe_keeps_a_running_vm_running_until_60_s_of_silence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under load (eight VMs on two cores) a VM process may miss one status probe's deadline: the VM stays
    'running' (so exec is not refused with 409), and only 60 s without an answer make it 'unresponsive'."""
    from popek.daemon import supervisor

    monkeypatch.setattr(supervisor, "STATUS_TIMEOUT", 0.3)

    async def go() -> list[str]:
        sup = make(tmp_path, lambda workdir: [sys.executable, "-c", BUSY_AFTER_ONE_ANSWER, str(workdir)])
        await sup.open()
        record = sup.create({}, "a")
        sup.start(record)
        states = [await sup.refresh(record)]  # no control socket yet, or its first answer
        for _ in range(100):
            if record.answered is not None:
                break
            await asyncio.sleep(0.1)
            states = [await sup.refresh(record)]
        states.append(await sup.refresh(record))  # the probe times out: no news
        assert record.answered is not None
        record.answered -= supervisor.UNRESPONSIVE_AFTER  # as if the silence had lasted 60 s
        states.append(await sup.refresh(record))
        await sup.delete(record)
        return states

    assert asyncio.run(go()) == ["running", "running", "unresponsive"]


def test_a_process_that_never_answers_is_starting_then_unresponsive(tmp_path: Path) -> None:
    from popek.daemon import supervisor

    async def go() -> list[str]:
        sup = make(tmp_path, sleeper(60))  # no control socket at all
        await sup.open()
        record = sup.create({}, "a")
        sup.start(record)
        states = [await sup.refresh(record)]
        assert record.started is not None
        record.started -= supervisor.UNRESPONSIVE_AFTER
        states.append(await sup.refresh(record))
        await sup.delete(record)
        return states

    assert asyncio.run(go()) == ["starting", "unresponsive"]


def test_start_twice_and_unknown_are_refused(tmp_path: Path) -> None:
    from popek.daemon.supervisor import SupervisorError

    async def go() -> None:
        sup = make(tmp_path, sleeper(60))
        await sup.open()
        record = sup.create({}, "a")
        sup.start(record)
        with pytest.raises(SupervisorError) as busy:
            sup.start(record)
        assert busy.value.status == 409
        with pytest.raises(SupervisorError) as missing:
            sup.find("b")
        assert missing.value.status == 404
        await sup.delete(record)
        assert not record.dir.exists() and "a" not in [r.name for r in sup.vms.values()]

    asyncio.run(go())


def test_socket_is_0600_and_one_daemon_per_socket(tmp_path: Path) -> None:
    path = tmp_path / "run" / "popek.sock"
    lock = SocketLock(path)
    lock.acquire()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        with pytest.raises(ConfigError, match="another popek daemon"):
            SocketLock(path).acquire()
    finally:
        lock.release()
    assert not path.exists()


def test_a_dead_daemons_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "popek.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on, nobody holds the lock of
    lock = SocketLock(path)
    sock = lock.acquire()
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))  # the new one listens
        client.close()
        assert sock.fileno() >= 0
    finally:
        lock.release()


class _NoPause:
    def stats(self) -> str:
        return "exits: 0"

    def io_counters(self) -> dict[str, int]:
        return {"net_rx_bytes": 7}


class _Pausable(_NoPause):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")


def test_vmproc_answers_pause_resume_and_a_wrong_state() -> None:
    async def go() -> None:
        loop = asyncio.get_running_loop()
        pausable = _Pausable()
        controller = vmproc.Controller(pausable, asyncio.Event(), loop)
        controller.state = "running"
        assert controller.handle({"op": "resume"})["status"] == 409  # not paused
        assert controller.handle({"op": "pause"}) == {"ok": True} and controller.state == "paused"
        assert controller.handle({"op": "resume"}) == {"ok": True} and controller.state == "running"
        assert pausable.calls == ["pause", "resume"]
        assert controller.handle({"op": "nonsense"})["status"] == 400

    asyncio.run(go())


def test_vmproc_control_socket_speaks_json_lines_and_survives_garbage(tmp_path: Path) -> None:
    async def go() -> None:
        controller = vmproc.Controller(_NoPause(), asyncio.Event(), asyncio.get_running_loop())
        path = tmp_path / "control.sock"
        server = await vmproc.serve_control(path, controller.handle)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        reader, writer = await asyncio.open_unix_connection(str(path))
        writer.write(b"not json\n[1]\n" + json.dumps({"op": "stats"}).encode() + b"\n")
        answers = [json.loads(await reader.readline()) for _ in range(3)]
        assert answers[0]["status"] == 400 and answers[1]["status"] == 400
        assert answers[2] == {"stats": "exits: 0", "io": {"net_rx_bytes": 7}}
        writer.close()
        server.close()

    asyncio.run(go())


def test_console_file_is_bounded(tmp_path: Path) -> None:
    sink = vmproc.ConsoleFile(tmp_path / "console.log", limit=100)
    for _ in range(50):
        sink(b"0123456789")
    data = (tmp_path / "console.log").read_bytes()
    assert data.startswith(b"0123456789" * 10) and b"limit reached" in data
    assert len(data) < 200
