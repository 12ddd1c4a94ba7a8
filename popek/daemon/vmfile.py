"""The VM file, `popek.toml`: named machines described declaratively, as a Vagrantfile describes them, read with
`tomllib` and checked with pydantic models, so that every mistake is reported as one line naming the file, the
line and the key (`popek.toml:12: machine.web.cpus: Input should be greater than or equal to 1`).

    [machine.web]                      # one table per machine; the name is how the CLI calls it
    cpus = 1
    memory = "512M"
    disks = ["data.img"]               # paths relative to the file; "path,ro" for read-only
    net = "passt"
    ports = ["8080:80"]                # host:guest TCP
    synced_folder = { host = ".", guest = "/work" }

    [[machine.web.provision]]          # run once, at the first `popek up`, in order
    shell = "echo hello > /etc/motd"
    [[machine.web.provision]]
    script = "scripts/setup.sh"        # copied in and run
    [[machine.web.provision]]
    file = { source = "app.conf", destination = "/etc/app.conf" }

Paths in the file are relative to the file's directory, as Vagrant's are to the Vagrantfile's: `load` resolves
them, so a machine means the same thing whatever the current directory. The state of the machines `popek up`
made lives in `.popek/` beside the file (Vagrant's `.vagrant/`). `TEMPLATE` is what `popek init` writes.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from popek.errors import ConfigError, PopekError

FILENAME = "popek.toml"
STATE_DIR = ".popek"
MAX_FILE_BYTES = 1 << 20  # a VM file is a few hundred lines
MAX_MACHINES = 64
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_SIZE = re.compile(r"^\s*\d{1,12}\s*[KMGT]?(i?B)?\s*$", re.IGNORECASE)
_PORT = re.compile(r"^(\d{1,5}):(\d{1,5})$")


class VmFileError(PopekError):
    """A VM file that cannot be read or does not describe machines popek can make; the message names the file,
    the line (where one is known) and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class FileCopy(_Strict):
    source: str = Field(min_length=1)
    destination: str = Field(min_length=1, pattern=r"^/")


class Provision(_Strict):
    """One provisioning step: exactly one of an inline shell command, a script to copy in and run, a file."""

    shell: str | None = Field(default=None, min_length=1)
    script: str | None = Field(default=None, min_length=1)
    file: FileCopy | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Provision:
        given = [k for k in ("shell", "script", "file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a provisioning step has exactly one of shell, script, file (not {given or 'none'})")
        return self


class SyncedFolder(_Strict):
    host: str = "."
    guest: str = Field(pattern=r"^/")


class Machine(_Strict):
    """A machine's shape, as `popek run`'s options describe a VM (the names follow VmSpec)."""

    image: Literal["default"] | None = None
    kernel: str | None = None
    initrd: str | None = None
    append: str | None = None
    cpus: Annotated[int, Field(ge=1, le=64)] = 1
    memory: str = "512M"
    accel: Literal["kvm", "soft"] | None = None
    disks: list[str] = Field(default_factory=list, max_length=16)
    net: str | None = None
    ports: list[str] = Field(default_factory=list, max_length=64)
    provision: list[Provision] = Field(default_factory=list, max_length=256)
    synced_folder: SyncedFolder | None = None

    @field_validator("memory")
    @classmethod
    def _size(cls, value: str) -> str:
        if not _SIZE.match(value):
            raise ValueError(f"{value!r} is not a size (examples: 512M, 2G)")
        return value

    @field_validator("ports")
    @classmethod
    def _ports(cls, values: list[str]) -> list[str]:
        for value in values:
            m = _PORT.match(value)
            if not m or not all(1 <= int(p) <= 65535 for p in m.groups()):
                raise ValueError(f"{value!r} is not HOST:GUEST with ports 1 to 65535")
        return values

    @model_validator(mode="after")
    def _one_guest(self) -> Machine:
        if self.image is not None and self.kernel is not None:
            raise ValueError("a machine has an image or a kernel, not both")
        if self.initrd is not None and self.kernel is None:
            raise ValueError("initrd needs kernel")
        return self


class VmFile(_Strict):
    machine: dict[str, Machine] = Field(min_length=1, max_length=MAX_MACHINES)

    @field_validator("machine")
    @classmethod
    def _names(cls, machines: dict[str, Machine]) -> dict[str, Machine]:
        for name in machines:
            if not _NAME.match(name):
                raise ValueError(f"machine name {name!r}: a lower-case letter, then letters, digits and '-' (<= 32)")
        return machines


_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_ASSIGN = re.compile(r"^\s*([A-Za-z0-9_\-\"'.]+)\s*=")


def _locate(text: str, loc: Sequence[str | int]) -> int | None:
    """The line of `loc` (a pydantic error location: keys and list indices) in the TOML text, found by following
    the table headers and key assignments; None where the text does not show it (an inline table's field)."""
    table: list[str | int] = []
    counts: dict[tuple[str | int, ...], int] = {}
    best: int | None = None
    best_len = -1
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            path: list[str | int] = [part.strip().strip("\"'") for part in header.group(2).split(".")]
            if header.group(1) == "[[":
                key = tuple(path)
                index = counts.get(key, -1) + 1
                counts[key] = index
                path.append(index)
            table = path
            candidate = table
        else:
            assign = _ASSIGN.match(line)
            if not assign:
                continue
            candidate = [*table, *(p.strip("\"'") for p in assign.group(1).split("."))]
        n = len(candidate)
        if n > best_len and list(loc[:n]) == candidate:
            best, best_len = number, n
    return best


def _where(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def parse(text: str, path: Path) -> VmFile:
    """Parse and check a VM file's text (paths in it are left as written)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise VmFileError(f"{path}: {e}") from None  # tomllib's message names the line and column
    try:
        return VmFile.model_validate(data)
    except ValidationError as e:
        error = e.errors()[0]
        loc = [part for part in error["loc"] if not (isinstance(part, str) and part.startswith("function-"))]
        key = ".".join(str(part) for part in loc) or "(file)"
        raise VmFileError(f"{_where(path, _locate(text, loc))}: {key}: {error['msg']}") from None


def _resolve(base: Path, value: str) -> str:
    return str((base / value).resolve()) if not Path(value).is_absolute() else value


def load(path: str | Path) -> VmFile:
    """Read `path` (a popek.toml), check it, and make every host path in it absolute, relative to its folder."""
    file = Path(path)
    try:
        with open(file, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise VmFileError(f"{file}: {e.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise VmFileError(f"{file}: larger than {MAX_FILE_BYTES} bytes; not a VM file")
    try:
        text = raw.decode()
    except UnicodeDecodeError as e:
        raise VmFileError(f"{file}: not UTF-8 (byte {e.start})") from None
    parsed = parse(text, file)
    base = file.resolve().parent
    machines = {}
    for name, m in parsed.machine.items():
        disks = []
        for disk in m.disks:
            image, _, options = disk.partition(",")
            disks.append(_resolve(base, image) + (f",{options}" if options else ""))
        provision = []
        for step in m.provision:
            if step.script is not None:
                step = step.model_copy(update={"script": _resolve(base, step.script)})
            elif step.file is not None:
                step = step.model_copy(
                    update={"file": step.file.model_copy(update={"source": _resolve(base, step.file.source)})}
                )
            provision.append(step)
        folder = m.synced_folder
        if folder is not None:
            folder = folder.model_copy(update={"host": _resolve(base, folder.host)})
        machines[name] = m.model_copy(
            update={
                "kernel": None if m.kernel is None else _resolve(base, m.kernel),
                "initrd": None if m.initrd is None else _resolve(base, m.initrd),
                "disks": disks,
                "provision": provision,
                "synced_folder": folder,
            }
        )
    return VmFile(machine=machines)


def find(start: Path | None = None) -> Path:
    """The popek.toml of the current directory or the nearest parent (as Vagrant looks for its Vagrantfile)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / FILENAME).is_file():
            return folder / FILENAME
    raise ConfigError(f"no {FILENAME} here or in a parent directory (`popek init` writes one)")


TEMPLATE = """\
# popek.toml: the machines of this project (`popek up` makes them; state lives in .popek/ beside this file).
# Paths are relative to this file. Every key is optional except the table name.

[machine.default]
# image = "default"            # popek's default guest (the default), or a kernel of your own:
# kernel = "bzImage"
# initrd = "initramfs.cpio"
# append = "console=ttyS0"     # added to the kernel command line
cpus = 1
memory = "512M"
# accel = "kvm"                # or "soft" (popek's software CPU); default: kvm where /dev/kvm works
# disks = ["data.img"]         # raw images; "data.img,ro" for read-only
# net = "passt"                # user-mode networking; or "tap:NAME" (root)
# ports = ["8080:80"]          # forward host port 8080 to guest port 80 (TCP)
# synced_folder = { host = ".", guest = "/work" }   # copied in at `popek up` and by `popek sync`

# Provisioning runs once, at the first `popek up` (again with `popek provision`), in order:
# [[machine.default.provision]]
# shell = "echo provisioned > /etc/motd"
# [[machine.default.provision]]
# script = "scripts/setup.sh"
# [[machine.default.provision]]
# file = { source = "app.conf", destination = "/etc/app.conf" }
"""


def init(folder: Path, force: bool = False) -> Path:
    """Write the commented template (`popek init`); an existing file is kept unless `force`."""
    target = folder / FILENAME
    if target.exists() and not force:
        raise ConfigError(f"{target} exists (use --force to overwrite it)")
    try:
        target.write_text(TEMPLATE)
    except OSError as e:
        raise ConfigError(f"{target}: {e.strerror}") from None
    return target
