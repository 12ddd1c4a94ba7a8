"""The request bodies of the daemon's REST API (docs/daemon.md), as pydantic models: every field typed and bounded,
unknown fields refused, so a hostile or mistaken request is a 422 naming its field before anything is started.

The bounds follow what popek.VM accepts (popek/api.py; VmSpec.validate in popek/vm.py bounds memory and vCPUs
again), and what the guest agent's protocol can carry (docs/agent-protocol.md: paths without NUL, at most 4096
bytes, as Linux's PATH_MAX).
"""

from __future__ import annotations

import base64
import binascii
import posixpath
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
MAX_PATH = 4096  # Linux PATH_MAX, the longest path the agent is sent
MAX_CMDLINE = 4096  # well above the boot protocol's cmdline_size for x86 (2048), which VmSpec checks itself
MAX_ARGS = 4096
MAX_ARG = 128 << 10  # Linux's MAX_ARG_STRLEN
MAX_STDIN = 16 << 20  # stdin given inline in an exec request; more goes through files
MAX_TIMEOUT = 7 * 86400.0
MAX_DISKS = 8

Arg = Annotated[str, Field(max_length=MAX_ARG)]
HostPath = Annotated[str, Field(min_length=1, max_length=MAX_PATH)]


def _no_nul(value: str) -> str:
    if "\0" in value:
        raise ValueError("must not contain a NUL byte")
    return value


def guest_path(value: str) -> str:
    """A path in the guest: absolute, without NUL and without '..' components (a request names the file it
    means, never one reached by climbing out of another), at most PATH_MAX bytes."""
    _no_nul(value)
    if not value.startswith("/"):
        raise ValueError("a guest path must be absolute (start with /)")
    if len(value.encode()) > MAX_PATH:
        raise ValueError(f"a guest path has at most {MAX_PATH} bytes")
    if ".." in value.split("/"):
        raise ValueError("a guest path must not contain '..' components")
    return posixpath.normpath(value) if value != "/" else value


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VmCreate(_Body):
    """POST /vms: a VM spec (the arguments of popek.VM), or {"snapshot": path} to restore one."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    cpus: Annotated[StrictInt, Field(ge=1, le=64)] = 1
    mem: Annotated[StrictInt, Field(ge=1 << 20)] | Annotated[str, Field(min_length=1, max_length=32)] = "512M"
    kernel: HostPath | None = None
    initrd: HostPath | None = None
    cmdline: Annotated[str, Field(max_length=MAX_CMDLINE)] | None = None
    disks: Annotated[list[HostPath], Field(max_length=MAX_DISKS)] = []
    net: Annotated[str, Field(max_length=256)] | None = None
    ports: Annotated[list[Annotated[str, Field(max_length=32)]], Field(max_length=64)] = []
    rng: StrictBool = False
    accel: Literal["kvm", "soft"] = "kvm"
    snapshot: HostPath | None = None
    start: StrictBool = True
    boot_timeout: Annotated[float, Field(gt=0, le=MAX_TIMEOUT)] = 600.0
    jail: StrictBool = False  # confine the VM process (popek.jail; docs/daemon.md "Confinement")

    @field_validator("kernel", "initrd", "snapshot", "cmdline", "net")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        return None if value is None else _no_nul(value)

    @field_validator("disks")
    @classmethod
    def _disks(cls, value: list[str]) -> list[str]:
        return [_no_nul(disk) for disk in value]

    @field_validator("kernel", "initrd", "snapshot")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("a host path given to the daemon must be absolute")
        return value

    @field_validator("jail")
    @classmethod
    def _jail_possible(cls, value: bool) -> bool:
        """A jail this daemon cannot make (not root, no libseccomp) is refused before any process starts."""
        if value:
            from popek.jail import JailError, check_possible

            try:
                check_possible()
            except JailError as exc:
                raise ValueError(str(exc).replace("--jail", "jail")) from exc
        return value

    @model_validator(mode="after")
    def _jail_net(self) -> VmCreate:
        if self.jail and self.net is not None and self.net.partition(",")[0] == "passt":
            from popek.jail import PASST_REFUSED

            raise ValueError("net: " + PASST_REFUSED.replace("--net passt", "net passt").replace("--jail", "a jail"))
        return self


class Action(_Body):
    """POST /vms/{id}/actions."""

    action: Literal["start", "pause", "resume", "stop", "reset"]


class ExecBody(_Body):
    """POST /vms/{id}/exec: exactly one of argv (looked up in the guest's PATH) or shell (/bin/sh -c)."""

    argv: Annotated[list[Arg], Field(min_length=1, max_length=MAX_ARGS)] | None = None
    shell: Annotated[str, Field(min_length=1, max_length=MAX_ARG)] | None = None
    env: Annotated[dict[Annotated[str, Field(min_length=1, max_length=4096)], str | None], Field(max_length=4096)] = {}
    cwd: str | None = None
    stdin: Annotated[str, Field(max_length=(MAX_STDIN * 4) // 3 + 4)] | None = None  # base64
    timeout: Annotated[float, Field(gt=0, le=MAX_TIMEOUT)] | None = None

    @field_validator("argv")
    @classmethod
    def _argv(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [_no_nul(arg) for arg in value]

    @field_validator("shell")
    @classmethod
    def _shell(cls, value: str | None) -> str | None:
        return None if value is None else _no_nul(value)

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str | None]) -> dict[str, str | None]:
        for key, item in value.items():
            if "=" in key:
                raise ValueError(f"an environment variable's name has no '=': {key[:40]!r}")
            _no_nul(key)
            if item is not None:
                _no_nul(item)
        return value

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, value: str | None) -> str | None:
        return None if value is None else guest_path(value)

    @field_validator("stdin")
    @classmethod
    def _stdin(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ValueError("stdin is base64") from exc
        return value

    @model_validator(mode="after")
    def _one_command(self) -> ExecBody:
        if (self.argv is None) == (self.shell is None):
            raise ValueError("give exactly one of argv (a list) or shell (a string)")
        return self

    def stdin_bytes(self) -> bytes | None:
        return None if self.stdin is None else base64.b64decode(self.stdin)


class SnapshotBody(_Body):
    """POST /vms/{id}/snapshots: where the VM process writes the snapshot (a host path)."""

    path: HostPath

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        _no_nul(value)
        if not value.startswith("/"):
            raise ValueError("a host path given to the daemon must be absolute")
        return value


class VmInfo(BaseModel):
    """GET /vms/{id}: what the daemon knows of a VM."""

    id: str
    name: str
    state: str
    pid: int | None
    created: float
    started: float | None
    uptime: float | None
    spec: dict[str, object]
    cause: str | None = None
    console_tail: str | None = None
    cgroup: str | None = None
