"""The VM file (popek/daemon/vmfile.py): what `popek init` writes reads back, paths resolve against the file, and
every mistake is one VmFileError naming the line and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from popek.cli import main
from popek.daemon import vmfile
from popek.daemon.vmfile import VmFileError
from popek.errors import ConfigError

GOOD = """\
[machine.web]
cpus = 2
memory = "1G"
disks = ["data.img", "/abs/ro.img,ro"]
ports = ["8080:80"]
synced_folder = { host = "src", guest = "/work" }

[[machine.web.provision]]
shell = "echo hi"

[[machine.web.provision]]
script = "setup.sh"

[machine.db]
accel = "soft"
"""


def test_the_template_popek_init_writes_is_a_valid_vm_file(tmp_path: Path) -> None:
    assert main(["init", str(tmp_path)]) == 0
    parsed = vmfile.load(tmp_path / vmfile.FILENAME)
    assert list(parsed.machine) == ["default"]
    assert parsed.machine["default"].memory == "512M"


def test_popek_init_keeps_an_existing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / vmfile.FILENAME).write_text("mine")
    assert main(["init", str(tmp_path)]) == 1
    assert "exists" in capsys.readouterr().err
    assert (tmp_path / vmfile.FILENAME).read_text() == "mine"


def test_paths_in_the_file_are_relative_to_its_folder(tmp_path: Path) -> None:
    (tmp_path / vmfile.FILENAME).write_text(GOOD)
    web = vmfile.load(tmp_path / vmfile.FILENAME).machine["web"]
    assert web.disks == [str(tmp_path / "data.img"), "/abs/ro.img,ro"]
    assert web.provision[1].script == str(tmp_path / "setup.sh")
    assert web.synced_folder is not None and web.synced_folder.host == str(tmp_path / "src")
    assert web.cpus == 2 and web.ports == ["8080:80"]


@pytest.mark.parametrize(
    "change,line,key",
    [
        (("cpus = 2", "cpus = 0"), 2, "machine.web.cpus"),
        (("cpus = 2", 'cpus = "two"'), 2, "machine.web.cpus"),
        (('memory = "1G"', 'memory = "lots"'), 3, "machine.web.memory"),
        (('ports = ["8080:80"]', 'ports = ["80"]'), 5, "machine.web.ports"),
        (('shell = "echo hi"', 'shel = "echo hi"'), 9, "machine.web.provision.0.shel"),
        (('script = "setup.sh"', 'script = "setup.sh"\nshell = "x"'), 11, "machine.web.provision.1"),
        (('accel = "soft"', 'accel = "fast"'), 15, "machine.db.accel"),
        (("[machine.db]", "[machine.DB]"), None, "machine"),
    ],
)
def test_a_mistake_is_reported_with_its_line_and_key(
    tmp_path: Path, change: tuple[str, str], line: int | None, key: str
) -> None:
    path = tmp_path / vmfile.FILENAME
    path.write_text(GOOD.replace(*change))
    with pytest.raises(VmFileError) as e:
        vmfile.load(path)
    where = f"{path}:{line}: " if line is not None else f"{path}"
    assert str(e.value).startswith(where), str(e.value)
    assert f" {key}: " in str(e.value), str(e.value)


def test_a_toml_syntax_error_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / vmfile.FILENAME
    path.write_text("[machine.a]\ncpus = = 1\n")
    with pytest.raises(VmFileError, match=r"line 2"):
        vmfile.load(path)


def test_a_file_that_is_not_a_vm_file_is_one_error(tmp_path: Path) -> None:
    path = tmp_path / vmfile.FILENAME
    path.write_bytes(b"\xff\xfe" * 10)
    with pytest.raises(VmFileError, match="UTF-8"):
        vmfile.load(path)
    path.write_bytes(b"#" * (vmfile.MAX_FILE_BYTES + 10))
    with pytest.raises(VmFileError, match="larger"):
        vmfile.load(path)


def test_the_nearest_vm_file_is_found_from_a_subfolder(tmp_path: Path) -> None:
    (tmp_path / vmfile.FILENAME).write_text(GOOD)
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert vmfile.find(tmp_path / "a" / "b") == tmp_path / vmfile.FILENAME
    with pytest.raises(ConfigError, match="popek init"):
        vmfile.find(Path("/proc/self"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list('[]=."#\n 0123abcmachinecpusprovsh{},:-')), max_size=200))
def test_any_text_is_a_vm_file_or_one_vm_file_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / vmfile.FILENAME
    path.write_text(text)
    try:
        vmfile.load(path)
    except VmFileError as e:
        assert str(e).startswith(str(path))
