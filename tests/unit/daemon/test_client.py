"""popek.Client and the CLI verbs against a real `popek serve` on a temporary socket (no VM boots: VMs are created
with start=false); the daemon's socket is 0600 and gone after SIGTERM; without a daemon the CLI says in one line
how to start one."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

import popek
from popek.cli import main


def test_socket_is_private(served: Path) -> None:
    assert stat.S_IMODE(served.stat().st_mode) == 0o600


def test_a_second_daemon_on_the_socket_is_refused(served: Path, capsys: pytest.CaptureFixture[str]) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "popek", "serve", "--socket", str(served)], capture_output=True, text=True, timeout=60
    )
    assert second.returncode == 1 and "another popek daemon already serves" in second.stderr


def test_client_create_list_get_delete_and_errors(served: Path) -> None:
    with popek.Client(served) as client:
        vm = client.create(name="c1", cpus=2, start=False)
        assert vm.state == "created"
        assert [info["name"] for info in client.list()] == ["c1"]
        assert client.get("c1").id == vm.id
        with pytest.raises(popek.ApiError) as busy:
            vm.exec(["true"])
        assert busy.value.status == 409
        with pytest.raises(popek.ApiError) as bad:
            client.create(cpus="many")
        assert (bad.value.status, bad.value.field) == (422, "cpus")
        with pytest.raises(popek.ApiError) as pause:
            vm.pause()
        assert pause.value.status == 409
        vm.delete()
        with pytest.raises(popek.ApiError) as gone:
            client.get("c1")
        assert gone.value.status == 404
        assert client.metrics()["vms"] == []


def test_cli_verbs(served: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with popek.Client(served) as client:
        client.create(name="idle", start=False)
    assert main(["ps", "--socket", str(served)]) == 0
    out = capsys.readouterr().out
    assert "idle" in out and "created" in out and "STATE" in out
    assert main(["exec", "--socket", str(served), "idle", "--", "true"]) == 1
    assert "not running" in capsys.readouterr().err
    assert main(["logs", "--socket", str(served), "idle"]) == 0
    assert main(["rm", "--socket", str(served), "idle"]) == 0
    assert main(["rm", "--socket", str(served), "idle"]) == 1
    assert "no VM 'idle'" in capsys.readouterr().err


def test_without_a_daemon_the_cli_says_how_to_start_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ps", "--socket", str(tmp_path / "none.sock")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "popek serve" in err and "none.sock" in err
