"""The VM file's verbs end to end, through the CLI and ONE daemon (a module fixture): `popek init`, the template
edited to two small machines (256M, an inline provisioning step appending to a guest file, a synced folder), then
up -> status -> ssh (exec) in both -> provision/sync refusals and reruns -> halt -> up (booted anew, provisioning
not repeated) -> suspend -> resume (a file written before the suspend is still there) -> destroy -> nothing left.

Boots: each machine boots cold twice (the first up, and the up after halt: a halted machine boots anew), the two
at once on 2 shared cores (~4-6 min a round on this nested KVM); the resume is a snapshot restore (seconds). The
tests run in file order and share the project; a failing step makes the later ones fail as well.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from popek import image
from popek.daemon import vmfile
from popek.daemon.client import Client

from . import daemons
from .guests import KVM_MARKS

BOOT_TIMEOUT = 1200  # two guests booting at once on 2 shared cores (as test_daemon)

pytestmark = [pytest.mark.timeout(BOOT_TIMEOUT + 600), *KVM_MARKS, pytest.mark.linux, pytest.mark.slow]

PROVISION_LOG = "/var/popek-provision.log"
MACHINES = ("one", "two")


@dataclass
class Project:
    root: Path
    socket: Path
    state: Path  # the daemon's state dir
    client: Client


def _popek(project: Project, verb: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """A verb run in the project's folder, as a user runs it (the file is found there)."""
    socket = [] if verb == "init" else ["--socket", str(project.socket)]
    return subprocess.run(
        [sys.executable, "-m", "popek", verb, *socket, *args],
        cwd=project.root,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result.stdout


def _refused(result: subprocess.CompletedProcess[str], text: str) -> None:
    """A refusal: non-zero, one line on stderr naming the problem, no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("popek: error:")]
    assert len(lines) == 1 and text in lines[0], result.stderr


def _status(project: Project) -> dict[str, str]:
    out = _ok(_popek(project, "status"))
    rows = [line.split() for line in out.splitlines()[1:] if line.strip()]
    return {row[0]: row[1] for row in rows}


def _state(project: Project, name: str) -> dict[str, object]:
    data: dict[str, object] = json.loads((project.root / ".popek" / name / "state.json").read_text())
    return data


def _vmprocs(state: Path) -> list[int]:
    """Live VM processes of this daemon (their command line ends with a directory under its state dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"popek.daemon.vmproc" in cmdline and any(str(state).encode() in part for part in cmdline):
            pids.append(int(entry.name))
    return pids


def _edited_template() -> str:
    """The template `popek init` writes, edited as a user would: two machines of 256M with a synced folder and
    an inline provisioning step."""
    text = vmfile.TEMPLATE
    edits = [
        ('memory = "512M"', 'memory = "256M"'),
        ('# synced_folder = { host = ".", guest = "/work" }', 'synced_folder = { host = "src", guest = "/work" }'),
        ("# [[machine.default.provision]]\n# shell", "[[machine.default.provision]]\nshell"),
        ('"echo provisioned > /etc/motd"', f'"echo provisioned >> {PROVISION_LOG}"'),
    ]
    for old, new in edits:
        assert old in text, f"the template no longer has {old!r}"
        text = text.replace(old, new, 1)
    one = text.replace("machine.default", "machine.one")
    two = "\n".join(line for line in one.splitlines() if not line.startswith("# popek.toml")).replace(
        "machine.one", "machine.two"
    )
    return one + "\n" + two + "\n"


@pytest.fixture(scope="module")
def project(guest: image.GuestImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    root = tmp_path_factory.mktemp("vmfile-project")
    with daemons.running(tmp_path_factory.mktemp("vmfile-daemon")) as server:
        yield Project(root, server.socket, server.state, server.client)


def test_init_writes_the_template_and_an_edited_two_machine_file_loads(project: Project) -> None:
    _ok(_popek(project, "init"))
    assert (project.root / "popek.toml").read_text() == vmfile.TEMPLATE
    (project.root / "popek.toml").write_text(_edited_template())
    src = project.root / "src"
    (src / "bin").mkdir(parents=True)
    (src / "hello.txt").write_text("hello from the host\n")
    (src / "bin" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (src / "bin" / "run.sh").chmod(0o755)
    loaded = vmfile.load(project.root / "popek.toml")
    assert sorted(loaded.machine) == list(MACHINES)
    assert _status(project) == {"one": "not", "two": "not"}  # "not created"


def test_up_boots_both_syncs_and_provisions_each_once(project: Project) -> None:
    out = _ok(_popek(project, "up", "--boot-timeout", str(BOOT_TIMEOUT), timeout=BOOT_TIMEOUT + 300))
    for name in MACHINES:
        assert f"==> {name}: provisioned" in out, out
        assert f"==> {name}: synced" in out, out
        state = _state(project, name)
        assert state["provisioned"] is True and state["provision_runs"] == 1 and state["state"] == "running"
    assert _status(project) == {"one": "running", "two": "running"}


def test_ssh_runs_a_command_in_each_machine_with_its_exit_status(project: Project) -> None:
    for name in MACHINES:
        assert _ok(_popek(project, "ssh", name, "--", "cat", PROVISION_LOG)) == "provisioned\n"
        assert _ok(_popek(project, "ssh", name, "--", "cat", "/work/hello.txt")) == "hello from the host\n"
        assert _ok(_popek(project, "ssh", name, "--", "/work/bin/run.sh")) == "ran\n"  # the mode was kept
        assert _popek(project, "ssh", name, "--", "sh", "-c", "exit 7").returncode == 7
    # a line-mode shell (stdin is no terminal): each line runs, `exit N` ends it with N
    shell = subprocess.run(
        [sys.executable, "-m", "popek", "ssh", "--socket", str(project.socket), "two"],
        cwd=project.root,
        input="echo $((6 * 7))\nexit 3\n",
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert shell.returncode == 3 and "42" in shell.stdout, shell


def test_ssh_on_a_terminal_is_a_shell_on_a_pty_in_the_guest(project: Project) -> None:
    """`popek ssh NAME` with a terminal on stdin and stdout: a shell on a guest pty through the agent (its tty is a
    /dev/pts), the keys typed reaching it raw, and popek's exit status the shell's."""
    master, slave = os.openpty()
    shell = subprocess.Popen(
        [sys.executable, "-m", "popek", "ssh", "--socket", str(project.socket), "two"],
        cwd=project.root, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )  # fmt: skip
    os.close(slave)
    seen = b""
    typed = False
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: every holder of the terminal's other side has closed it
                    break
                if not chunk:
                    break
                seen += chunk
                if not typed:  # the guest shell's prompt: type a line
                    os.write(master, b"echo $((6 * 7)); tty; exit 3\r")
                    typed = True
            elif shell.poll() is not None:
                break
        status = shell.wait(30)
    finally:
        if shell.poll() is None:
            shell.kill()
        os.close(master)
    assert status == 3, seen
    assert b"42" in seen and b"/dev/pts/" in seen, seen


def test_hostile_requests_are_one_line_each(project: Project) -> None:
    _refused(_popek(project, "up", "nope"), "no machine 'nope'")
    _refused(_popek(project, "ssh", "nope", "--", "true"), "no machine 'nope'")
    good = (project.root / "popek.toml").read_text()
    try:
        (project.root / "popek.toml").write_text(good + '[[machine.one.provision]]\nshell = "exit 3"\n')
        _refused(_popek(project, "provision", "one"), "provision step 2 (shell) failed with exit status 3")
        escape = '[[machine.one.provision]]\nfile = { source = "src/hello.txt", destination = "/etc/../x" }\n'
        (project.root / "popek.toml").write_text(good + escape)
        _refused(_popek(project, "provision", "one"), "'..'")
        (project.root / "popek.toml").write_text(good.replace('host = "src"', 'host = "missing"', 1))
        _refused(_popek(project, "sync", "one"), "no such folder")
        (project.root / "popek.toml").write_text(good.replace('memory = "256M"', "memory = 256", 1))
        _refused(_popek(project, "status"), "popek.toml:")  # the file's line and key
    finally:
        (project.root / "popek.toml").write_text(good)
    # the failed rerun appended once more, and left the machine recorded as provisioned once
    assert _ok(_popek(project, "ssh", "one", "--", "cat", PROVISION_LOG)) == "provisioned\nprovisioned\n"
    assert _state(project, "one")["provision_runs"] == 1


def test_sync_copies_the_folder_again(project: Project) -> None:
    (project.root / "src" / "new.txt").write_text("new\n")
    assert "synced" in _ok(_popek(project, "sync", "two"))
    assert _ok(_popek(project, "ssh", "two", "--", "cat", "/work/new.txt")) == "new\n"


def test_halt_then_up_boots_anew_without_provisioning_again(project: Project) -> None:
    out = _ok(_popek(project, "halt", timeout=300))
    assert out.count("halted") >= 2, out
    assert _status(project) == {"one": "halted", "two": "halted"}
    assert project.client.list() == []
    out = _ok(_popek(project, "up", "--boot-timeout", str(BOOT_TIMEOUT), timeout=BOOT_TIMEOUT + 300))
    assert out.count("already provisioned") == 2 and "==> one: provisioned" not in out, out
    for name in MACHINES:
        # a fresh boot of the initramfs guest: the provisioning log is gone, and nothing wrote it again
        assert _popek(project, "ssh", name, "--", "test", "-e", PROVISION_LOG).returncode == 1
        assert _ok(_popek(project, "ssh", name, "--", "cat", "/work/hello.txt")) == "hello from the host\n"
        assert _state(project, name)["provision_runs"] == 1


def test_suspend_and_resume_keep_the_guests_state(project: Project) -> None:
    _ok(_popek(project, "ssh", "one", "--", "sh", "-c", "echo kept > /tmp/before-suspend"))
    _ok(_popek(project, "suspend", "one", timeout=600))
    assert (project.root / ".popek" / "one" / "snapshot").is_dir()
    assert _status(project) == {"one": "suspended", "two": "running"}
    _ok(_popek(project, "resume", "one", "--boot-timeout", str(BOOT_TIMEOUT), timeout=BOOT_TIMEOUT))
    assert _status(project) == {"one": "running", "two": "running"}
    assert _ok(_popek(project, "ssh", "one", "--", "cat", "/tmp/before-suspend")) == "kept\n"
    assert _state(project, "one")["provision_runs"] == 1


def test_destroy_leaves_nothing_behind(project: Project) -> None:
    assert _vmprocs(project.state), "the machines' VM processes should be running before destroy"
    _ok(_popek(project, "destroy", "-f", timeout=300))
    assert project.client.list() == []
    assert not (project.root / ".popek").exists()
    assert list((project.state / "vms").iterdir()) == []
    deadline = time.monotonic() + 30
    while _vmprocs(project.state) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _vmprocs(project.state) == []
    assert _status(project) == {"one": "not", "two": "not"}
    assert not (project.root / ".popek").exists()  # status only reads
