"""The VM file's verbs without a guest (popek/daemon/project.py, popek/cli_vmfile.py): daemon names per project,
the .popek/ state, the synced folder's plan, the refusals made before any VM starts, and status/destroy against a
real `popek serve` whose VMs are created but never started."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popek.agent.client import ExecResult
from popek.cli import main
from popek.daemon import models, vmfile
from popek.daemon.client import Client
from popek.daemon.project import MachineState, Project, ProjectError, checked_guest_path, sync_plan, vm_name

TWO = """\
[machine.one]
memory = "256M"
synced_folder = { host = "src", guest = "/work" }
[[machine.one.provision]]
shell = "echo hi"

[machine.two]
memory = "256M"
"""


@pytest.fixture
def project_file(tmp_path: Path) -> Path:
    folder = tmp_path / "proj"
    (folder / "src").mkdir(parents=True)
    (folder / vmfile.FILENAME).write_text(TWO)
    return folder / vmfile.FILENAME


def test_daemon_names_differ_between_projects_and_fit_the_daemons_pattern(tmp_path: Path) -> None:
    a, b = tmp_path / "a" / vmfile.FILENAME, tmp_path / "b" / vmfile.FILENAME
    assert vm_name(a, "web") != vm_name(b, "web")
    assert vm_name(a, "web") == vm_name(a, "web")
    assert vm_name(a, "web").startswith("a-") and vm_name(a, "web").endswith("-web")


@given(st.text(min_size=1, max_size=80).filter(lambda s: "/" not in s and "\0" not in s and s not in (".", "..")))
def test_any_folder_name_gives_a_name_the_daemon_accepts(folder: str) -> None:
    name = vm_name(Path("/x") / folder / vmfile.FILENAME, "a" * 32)
    assert re.match(models.NAME_PATTERN, name), name


def test_state_round_trips_and_a_damaged_state_file_is_one_error(project_file: Path) -> None:
    project = Project(project_file, Client(project_file.parent / "no.sock"))
    assert project.load_state("one").state == "not created"
    project.save_state("one", MachineState(vm_id="x", vm_name="n", state="halted", provisioned=True, provision_runs=1))
    assert project.load_state("one") == MachineState("x", "n", "halted", True, 1)
    path = project_file.parent / ".popek" / "one" / "state.json"
    for damaged in ("{", "[]", json.dumps({"state": "exploded"}), json.dumps({"bogus": 1})):
        path.write_text(damaged)
        with pytest.raises(ProjectError, match="unreadable machine state"):
            project.load_state("one")


def test_a_machine_not_in_the_file_is_refused_with_the_names_it_has(project_file: Path) -> None:
    project = Project(project_file, Client(project_file.parent / "no.sock"))
    assert project.names([]) == ["one", "two"]
    assert project.names(["two", "two"]) == ["two"]
    with pytest.raises(ProjectError, match=r"no machine 'three' .* \(it has: one, two\)"):
        project.names(["three"])


def test_the_sync_plan_makes_dirs_first_keeps_modes_and_skips_links_and_state(tmp_path: Path) -> None:
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub" / "run.sh").write_text("#!/bin/sh\n")
    (tmp_path / "sub" / "run.sh").chmod(0o750)
    (tmp_path / "sub" / "deep" / "b").write_text("b")
    (tmp_path / "link").symlink_to("/etc/passwd")
    (tmp_path / ".popek" / "one").mkdir(parents=True)
    (tmp_path / ".popek" / "one" / "state.json").write_text("{}")
    plan = list(sync_plan(tmp_path, "/work", skip=[tmp_path / ".popek"]))
    targets = [(kind, path) for kind, path, _, _ in plan]
    assert targets == [
        ("dir", "/work"),
        ("dir", "/work/sub"),
        ("file", "/work/a.txt"),
        ("dir", "/work/sub/deep"),
        ("file", "/work/sub/run.sh"),
        ("file", "/work/sub/deep/b"),
    ]
    modes = {path: mode for _, path, _, mode in plan}
    assert modes["/work/sub/run.sh"] == 0o750
    for kind, path, _, _ in plan:  # every file's folder comes before it
        if kind == "file":
            assert ("dir", path.rsplit("/", 1)[0]) in targets[: targets.index((kind, path))]


@given(st.lists(st.sampled_from(["a", "..", ".", "b", ""]), min_size=1, max_size=6))
def test_a_guest_path_climbing_with_dotdot_is_refused(parts: list[str]) -> None:
    path = "/" + "/".join(parts)
    if ".." in parts:
        with pytest.raises(ProjectError, match=r"'\.\.'"):
            checked_guest_path(path, "where")
    else:
        assert ".." not in checked_guest_path(path, "where")


def test_preflight_refuses_missing_folders_scripts_and_escaping_targets(project_file: Path) -> None:
    folder = project_file.parent
    text = TWO + '[[machine.two.provision]]\nscript = "setup.sh"\n'
    project_file.write_text(text)
    project = Project(project_file, Client(folder / "no.sock"))
    project.preflight("one", provision=True)
    with pytest.raises(ProjectError, match=r"machine.two.provision.0.script: no such file: .*setup.sh"):
        project.preflight("two", provision=True)
    project.preflight("two", provision=False)  # provisioning done: its script is not needed
    project_file.write_text(
        TWO + '[[machine.two.provision]]\nfile = { source = "popek.toml", destination = "/a/../b" }\n'
    )
    with pytest.raises(ProjectError, match=r"machine.two.provision.0.file.destination: '/a/../b'"):
        Project(project_file, Client(folder / "no.sock")).preflight("two", provision=True)
    (folder / "src").rmdir()
    with pytest.raises(ProjectError, match=r"synced_folder\.host: no such folder"):
        project.preflight("one", provision=False)


def test_status_without_a_daemon_shows_what_was_recorded(
    project_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(project_file.parent / "src")  # found from a subfolder, as Vagrant finds its Vagrantfile
    assert main(["status", "--socket", str(project_file.parent / "no.sock")]) == 0
    out = capsys.readouterr().out
    assert "one" in out and "two" in out and "not created (recorded; no daemon answers)" in out
    assert not (project_file.parent / ".popek").exists()  # status writes nothing


def test_cli_refusals_are_one_line(
    project_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = str(project_file.parent / "no.sock")
    monkeypatch.chdir(project_file.parent)
    for argv, text in (
        (["up", "nope"], "no machine 'nope'"),
        (["ssh", "nope"], "no machine 'nope'"),
        (["destroy", "one"], "give -f"),  # stdin is no terminal under pytest
        (["up", "-f", "missing.toml"], "missing.toml: no such file"),
        (["up"], "no popek daemon answers"),
    ):
        assert main([*argv, "--socket", sock]) == 1, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("popek: error:") and text in err, (argv, err)
    project_file.write_text(TWO.replace('memory = "256M"', "memory = 256", 1))
    assert main(["status", "--socket", sock]) == 1
    assert f"{vmfile.FILENAME}:2: machine.one.memory" in capsys.readouterr().err


def test_status_and_destroy_through_the_daemon(project_file: Path, served: Path) -> None:
    with Client(served) as client:
        project = Project(project_file, client, out=lambda line: None)
        # a machine recorded running that the daemon does not have was lost: crashed
        project.save_state("two", MachineState(vm_name=vm_name(project_file, "two"), state="running"))
        vm = client.create(name=vm_name(project_file, "one"), mem="256M", start=False)
        project.save_state("one", MachineState(vm_id=vm.id, vm_name=vm.name, state="halted", provisioned=True))
        assert {row["name"]: row["state"] for row in project.rows()} == {"one": "halted", "two": "crashed"}
        with pytest.raises(ProjectError, match="machine one is halted, not running"):
            project.ssh("one", ["true"], served)
        project.destroy("one")
        assert client.list() == []
        assert not (project_file.parent / ".popek" / "one").exists()
        assert (project_file.parent / ".popek").exists()  # two's state is still there
        project.destroy("two")
        assert not (project_file.parent / ".popek").exists()


class ShellVM:
    """A RemoteVM's exec as the line shell uses it: each command recorded, its output given to the callback, and
    an exit status, a signal or a timeout chosen by the command's text."""

    def __init__(self) -> None:
        self.commands: list[list[str]] = []

    def exec(self, command: list[str], on_stdout: Callable[[bytes], object], **_: object) -> ExecResult:
        self.commands.append(command)
        text = command[-1]
        on_stdout(f"ran {text}\n".encode())
        code, sig, timed_out = {"fail": (4, None, False), "killed": (None, 9, False), "slow": (None, 9, True)}.get(
            text, (0, None, False)
        )
        return ExecResult(b"", b"", code, sig, 0.0, timed_out)


@pytest.mark.parametrize(
    ("lines", "status", "ran"),
    [
        ("echo a\n\n  \nfail\n", 4, ["echo a", "fail"]),  # the end of input: the last command's status
        ("fail\nexit\n", 4, ["fail"]),
        ("fail\nexit 3\nnot run\n", 3, ["fail"]),
        ("exit 300\n", 300 & 0xFF, []),
        ("killed\n", 128 + 9, ["killed"]),
        ("slow\n", 124, ["slow"]),
        ("exit now please\n", 0, ["exit now please"]),  # not the exit builtin's form: a command like any other
    ],
)
def test_the_line_shell_runs_each_line_by_sh_and_ends_with_a_shells_status(
    project_file: Path, lines: str, status: int, ran: list[str], capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """`popek ssh NAME` where the VM's vsock socket is out of reach (another user's daemon): each line runs through
    the daemon by /bin/sh -c, its output streamed; exit N, or the end of input, ends it."""
    project = Project(project_file, cast(Any, None), out=lambda line: None)
    vm = ShellVM()
    assert project.line_shell("one", cast(Any, vm), io.StringIO(lines)) == status
    assert vm.commands == [["/bin/sh", "-c", text] for text in ran]
    assert capsysbinary.readouterr().out == b"".join(f"ran {text}\n".encode() for text in ran)
