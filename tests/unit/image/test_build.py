"""The recipe's bookkeeping: cache key, cache publication, missing tools, the kconfig check, and (where the Debian
package is installed) the real fragment applied to the real tinyconfig."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from popek.boot import elf
from popek.image import ImageError, build, cache_dir, cached_default_guest, ensure_default_guest, image_info, kconfig
from popek.image.progress import Progress
from popek.image.protocol import BASE_CMDLINE

from .test_cpio import read_newc

BUSYBOX = Path("/bin/busybox")


def fake_inputs(**changes: Any) -> build.Inputs:
    inputs = build.Inputs(
        recipe=build.RECIPE_VERSION,
        fragment=b"CONFIG_64BIT=y\n",
        init=b"#!/bin/busybox sh\n",
        agent="0" * 64,
        linux_source_version="6.1.192-2",
        linux_source_size=138009412,
        linux_source_mtime=1700000000,
        busybox_version="1:1.35.0-4+deb12u1+b1",
    )
    return dataclasses.replace(inputs, **changes)


# ---------------------------------------------------------------------------------------------------------------
# where and what


def test_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "popek"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert cache_dir() == tmp_path / ".cache" / "popek"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / ".cache" / "popek"


def test_key_is_stable_and_follows_every_input() -> None:
    base = fake_inputs()
    assert base.key == fake_inputs().key
    assert len(base.key) == 16 and int(base.key, 16) >= 0
    changes: list[dict[str, Any]] = [
        {"recipe": build.RECIPE_VERSION + 1},
        {"fragment": b"CONFIG_64BIT=y\nCONFIG_SMP=y\n"},
        {"init": b"#!/bin/busybox sh\necho\n"},
        {"agent": "1" * 64},
        {"linux_source_version": "6.1.193-1"},
        {"linux_source_size": 138009413},
        {"linux_source_mtime": 1700000001},
        {"busybox_version": "1:1.36.1-1"},
    ]
    keys = {fake_inputs(**change).key for change in changes}
    assert len(keys) == len(changes) and base.key not in keys


def test_kernel_key_ignores_what_only_the_initramfs_uses() -> None:
    base = fake_inputs()
    assert fake_inputs(init=b"other").kernel_key == base.kernel_key
    assert fake_inputs(agent="f" * 64).kernel_key == base.kernel_key
    assert fake_inputs(busybox_version="2").kernel_key == base.kernel_key
    assert fake_inputs(fragment=b"CONFIG_SMP=y\n").kernel_key != base.kernel_key
    assert fake_inputs(linux_source_mtime=1).kernel_key != base.kernel_key


def test_shipped_recipe_files_are_found() -> None:
    assert b"CONFIG_PVH=y" in build.recipe_fragment()
    init = build.recipe_init()
    assert init.startswith(b"#!/bin/busybox sh\n")
    assert b"popek-guest-ready" in init and b"popek-exit-status" in init and b"reboot -f" in init


# ---------------------------------------------------------------------------------------------------------------
# what the host lacks


def test_missing_tools_name_their_packages() -> None:
    absent_commands = {"bison", "xz"}
    absent_files = {"/usr/include/libelf.h", str(build.LINUX_SOURCE_TARBALL)}
    missing = build.missing_requirements(
        which=lambda name: None if name in absent_commands else f"/usr/bin/{name}",
        exists=lambda path: path not in absent_files,
    )
    assert {requirement.package for requirement in missing} == {"bison", "xz-utils", "libelf-dev", "linux-source-6.1"}
    message = str(build.missing_error(missing))
    assert "apt-get install bison libelf-dev xz-utils linux-source-6.1" in message
    assert "libelf.h (package libelf-dev)" in message


def test_nothing_missing_means_no_requirement() -> None:
    assert build.missing_requirements(which=lambda name: "/bin/" + name, exists=lambda path: True) == []


def test_uninstalled_source_packages_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "installed_versions", lambda packages: {"busybox-static": "1"})
    with pytest.raises(ImageError, match=r"apt-get install linux-source-6\.1$"):
        build.gather_inputs()
    assert cached_default_guest() is None


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not a Debian host")
def test_installed_versions_asks_dpkg() -> None:
    versions = build.installed_versions(["dpkg", "no-such-package-popek"])
    assert set(versions) == {"dpkg"} and versions["dpkg"][0].isdigit()


@pytest.mark.skipif(not BUSYBOX.is_file(), reason="busybox-static is not installed")
def test_a_dynamic_busybox_is_refused() -> None:
    build._check_busybox_static(BUSYBOX.read_bytes())
    dynamic = Path(shutil.which("ls") or "/bin/ls").read_bytes()
    with pytest.raises(ImageError, match=r"dynamically linked.*busybox-static"):
        build._check_busybox_static(dynamic)


# ---------------------------------------------------------------------------------------------------------------
# the kconfig check


FRAGMENT = """\
# a comment
CONFIG_PVH=y
CONFIG_NR_CPUS=16
CONFIG_CMDLINE="console=ttyS0"
CONFIG_ACPI=n
# CONFIG_PCI is not set
CONFIG_MODULES=n
CONFIG_VIRTIO_MMIO=y
"""

DOT_CONFIG = """\
#
# Automatically generated file; DO NOT EDIT.
#
CONFIG_PVH=y
CONFIG_NR_CPUS=8
CONFIG_CMDLINE="console=ttyS0"
# CONFIG_ACPI is not set
CONFIG_PCI=y
"""


def test_verifier_names_dropped_and_changed_options() -> None:
    mismatches = kconfig.verify(FRAGMENT, DOT_CONFIG)
    assert [str(m) for m in mismatches] == [
        "CONFIG_NR_CPUS (asked =16, got =8)",
        "CONFIG_PCI (asked =n, got =y)",
        "CONFIG_VIRTIO_MMIO (asked =y, got absent)",
    ]


def test_verifier_accepts_a_faithful_config() -> None:
    faithful = """\
CONFIG_PVH=y
CONFIG_NR_CPUS=16
CONFIG_CMDLINE="console=ttyS0"
# CONFIG_ACPI is not set
CONFIG_VIRTIO_MMIO=y
CONFIG_OTHER=y
"""  # PCI and MODULES are off by being absent
    assert kconfig.verify(FRAGMENT, faithful) == []
    assert str(kconfig.Mismatch("CONFIG_X", "y", "n")) == "CONFIG_X (asked =y, got not set)"


# ---------------------------------------------------------------------------------------------------------------
# the cache, with the kernel build replaced by a fake that makes a tiny ELF with a PVH note


def fake_vmlinux(entry: int = 0x1000000) -> bytes:
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", entry)
    ehdr = (
        b"\x7fELF\x02\x01\x01"
        + b"\0" * 9
        + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    )
    phdr = struct.pack("<IIQQQQQQ", 4, 4, 120, 0, 0, len(note), len(note), 4)
    return ehdr + phdr + note


FAKE_AGENT = b"\x7fELF popek-agent stand-in"


@dataclasses.dataclass
class FakeKernelBuilds:
    inputs: build.Inputs = dataclasses.field(default_factory=fake_inputs)
    count: int = 0
    fail: BaseException | None = None


@pytest.fixture
def fake_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeKernelBuilds]:
    if not BUSYBOX.is_file():
        pytest.skip("busybox-static is not installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    builds = FakeKernelBuilds()
    monkeypatch.setattr(build, "gather_inputs", lambda: builds.inputs)
    monkeypatch.setattr(build, "check_build_requirements", lambda: None)

    def build_kernel(
        inputs: build.Inputs, staging: Path, out: Path, log: Any, progress: Progress, expected: int
    ) -> dict[str, Any]:
        builds.count += 1
        progress.phase("compile")
        (staging / "linux-source-6.1").mkdir()
        if builds.fail is not None:
            raise builds.fail
        (out / "vmlinux").write_bytes(fake_vmlinux())
        (out / "bzImage").write_bytes(b"MZ" + b"\0" * 510)
        (out / "kernel.config").write_text("CONFIG_64BIT=y\n")
        return {"key": inputs.kernel_key, "release": "6.1.0-fake", "compile_steps": 3}

    monkeypatch.setattr(build, "_build_kernel", build_kernel)
    # the real compiler is the subject of test_the_agent_is_compiled_static_into_the_initramfs
    monkeypatch.setattr(build, "_build_agent", lambda staging, out, log, env: FAKE_AGENT)
    yield builds


def test_build_publishes_a_complete_entry_once(fake_host: FakeKernelBuilds) -> None:
    assert cached_default_guest() is None
    image = ensure_default_guest(progress=False)
    assert fake_host.count == 1
    entry = cache_dir() / f"guest-{image.key}"
    assert image.kernel == entry / "vmlinux" and image.initrd == entry / "initramfs.cpio"
    assert image.bzimage == entry / "bzImage" and image.cmdline == BASE_CMDLINE
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["key"] == image.key
    assert manifest["kernel"]["pvh_entry"] == "0x1000000"
    assert manifest["inputs"]["busybox-static"]["version"] == "1:1.35.0-4+deb12u1+b1"
    initrd = manifest["artefacts"]["initrd"]
    assert initrd["size"] == image.initrd.stat().st_size
    assert initrd["sha256"] == build._artefact(image.initrd)["sha256"]
    assert (entry / "build.log").read_text().count("writing the initramfs") == 1
    members = {member.name: member for member in read_newc(image.initrd.read_bytes())}
    assert members["sbin/popek-agent"].data == FAKE_AGENT
    assert members["sbin/popek-agent"].mode == stat.S_IFREG | 0o755
    assert [p.name for p in cache_dir().iterdir() if p.name.startswith(".staging")] == []
    # a second call is a cache hit, with or without the lock
    assert ensure_default_guest(progress=False) == image == cached_default_guest()
    assert fake_host.count == 1
    assert image.key in image_info() and "initramfs.cpio" in image_info() and "(current)" in image_info()


def test_a_new_init_reuses_the_kernel_and_force_rebuilds_it(fake_host: FakeKernelBuilds) -> None:
    first = ensure_default_guest(progress=False)
    fake_host.inputs = fake_inputs(init=b"#!/bin/busybox sh\necho changed\n")
    second = ensure_default_guest(progress=False)
    assert second.key != first.key and fake_host.count == 1
    manifest = json.loads((second.kernel.parent / "manifest.json").read_text())
    assert manifest["kernel"]["reused_from"] == f"guest-{first.key}"
    assert second.kernel.read_bytes() == first.kernel.read_bytes()
    assert "stale" in image_info()
    third = ensure_default_guest(progress=False, force=True)
    assert third == second and fake_host.count == 2


def test_a_failed_build_publishes_nothing_and_names_its_log(fake_host: FakeKernelBuilds) -> None:
    fake_host.fail = build._BuildFailed("compiling the guest kernel failed (exit status 2)")
    with pytest.raises(ImageError) as error:
        ensure_default_guest(progress=False)
    key = build.gather_inputs().key
    log = cache_dir() / f"guest-{key}.failed.log"
    assert str(log) in str(error.value) and "exit status 2" in str(error.value)
    assert "FAILED" in log.read_text()
    assert sorted(p.name for p in cache_dir().iterdir()) == [f".guest-{key}.lock", log.name]
    assert cached_default_guest() is None and "failed build log" in image_info()
    # the next successful build clears the failure
    fake_host.fail = None
    ensure_default_guest(progress=False)
    assert not log.exists()


def test_an_interrupted_build_is_never_taken_as_done(fake_host: FakeKernelBuilds) -> None:
    fake_host.fail = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        ensure_default_guest(progress=False)
    assert cached_default_guest() is None
    assert [p for p in cache_dir().iterdir() if not p.name.endswith(".lock")] == []


def test_leftovers_of_a_killed_build_are_cleared_and_a_gutted_entry_rebuilt(fake_host: FakeKernelBuilds) -> None:
    key = build.gather_inputs().key
    stale = cache_dir() / f".staging-{key}-999999/out"
    stale.mkdir(parents=True)
    (stale / "vmlinux").write_bytes(b"half")
    assert cached_default_guest() is None
    image = ensure_default_guest(progress=False)
    assert not stale.parent.exists()
    image.initrd.unlink()
    assert cached_default_guest() is None
    assert ensure_default_guest(progress=False, force=False) == image and image.initrd.is_file()


def test_image_info_without_inputs_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def no_inputs() -> build.Inputs:
        raise ImageError("cannot find popek's default guest: apt-get install linux-source-6.1")

    monkeypatch.setattr(build, "gather_inputs", no_inputs)
    info = image_info()
    assert str(tmp_path / "popek") in info and "apt-get install linux-source-6.1" in info


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc (and libc6-dev) to compile the guest agent")
def test_the_agent_is_compiled_static_into_the_initramfs(tmp_path: Path) -> None:
    staging, out = tmp_path / "staging", tmp_path / "out"
    staging.mkdir()
    out.mkdir()
    log = build._Log(tmp_path / "build.log")
    try:
        agent = build._build_agent(staging, out, log, build._build_env(fake_inputs()))
    finally:
        log.close()
    assert agent == (out / "popek-agent").read_bytes()
    assert not any(header.type == 3 for header in elf.program_headers(agent))  # no PT_INTERP: static
    assert "$ gcc -static -O2" in (tmp_path / "build.log").read_text()  # the command is logged
    usage = subprocess.run([str(out / "popek-agent"), "--bogus"], capture_output=True, timeout=10, check=False)
    assert usage.returncode == 2 and b"usage: popek-agent" in usage.stderr


def test_agent_sources_are_part_of_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    digest = build.agent_binary.source_digest()
    assert len(digest) == 64 and digest == build.agent_binary.source_digest()
    sources = build.agent_binary.sources()
    assert {"popek-agent.c", "protocol.h"} <= set(sources)
    changed = {**sources, "exec.c": sources["exec.c"] + b"\n/* changed */\n"}
    monkeypatch.setattr(build.agent_binary, "sources", lambda: changed)
    assert build.agent_binary.source_digest() != digest
    monkeypatch.setattr(build.agent_binary, "CFLAGS", (*build.agent_binary.CFLAGS, "-DX"))
    monkeypatch.setattr(build.agent_binary, "sources", lambda: sources)
    assert build.agent_binary.source_digest() != digest


# ---------------------------------------------------------------------------------------------------------------
# progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_a_bar_on_a_terminal_and_lines_elsewhere() -> None:
    terminal = Terminal()
    progress = Progress(True, terminal, phases=2)
    progress.phase("compile")
    progress.update(50, 100, "steps", estimated=True, force=True)
    progress.update(150, 100, "steps", estimated=True, force=True)
    progress.done("built")
    text = terminal.getvalue()
    assert "\r\x1b[K" in text and " 50% 50/~100 steps" in text
    assert " 99% 150/~100 steps" in text  # a count past its estimate never claims 100%
    assert text.endswith("s\n") and "popek: built in" in text
    plain = io.StringIO()
    progress = Progress(True, plain, phases=2)
    progress.phase("extract")
    progress.update(1, 2, "MiB", force=True)
    assert plain.getvalue() == "popek: building the default guest [1/2]: extract\n"
    quiet = io.StringIO()
    progress = Progress(False, quiet)
    progress.phase("extract")
    progress.done("built")
    assert quiet.getvalue() == ""


# ---------------------------------------------------------------------------------------------------------------
# the real fragment on the real tinyconfig


@pytest.fixture(scope="session")
def linux_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The linux-source tarball unpacked once per session (~20 s), by the build's own extraction step."""
    if not build.LINUX_SOURCE_TARBALL.is_file():
        pytest.skip(f"{build.LINUX_SOURCE_TARBALL} is missing (apt-get install linux-source-6.1)")
    missing = [r for r in build.missing_requirements() if r.package not in ("busybox-static",)]
    if missing:
        pytest.skip(f"kernel build tools missing: {', '.join(r.package for r in missing)}")
    staging = tmp_path_factory.mktemp("linux")
    log = build._Log(staging / "build.log")
    try:
        return build._extract(staging, log, Progress(False))
    finally:
        log.close()


def test_the_fragment_survives_tinyconfig(linux_tree: Path, tmp_path: Path) -> None:
    fragment = tmp_path / "guest.config"
    fragment.write_bytes(build.recipe_fragment())
    log = build._Log(tmp_path / "build.log")
    env = build._build_env(fake_inputs())
    try:
        build._configure(linux_tree, fragment, log, env, Progress(False))  # raises, naming options, on a drop
    finally:
        log.close()
    config = (linux_tree / ".config").read_text()
    assert kconfig.verify(fragment.read_text(), config) == []
    assert "CONFIG_PVH=y" in config and "CONFIG_BLK_DEV_INITRD=y" in config


def test_an_impossible_fragment_fails_by_name(linux_tree: Path, tmp_path: Path) -> None:
    fragment = tmp_path / "guest.config"
    # VIRTIO_PCI depends on PCI, which the fragment turns off: kconfig drops it without an error of its own
    fragment.write_bytes(build.recipe_fragment() + b"CONFIG_VIRTIO_PCI=y\n")
    log = build._Log(tmp_path / "build.log")
    try:
        with pytest.raises(build._BuildFailed, match=r"CONFIG_VIRTIO_PCI \(asked =y, got absent\)"):
            build._configure(linux_tree, fragment, log, build._build_env(fake_inputs()), Progress(False))
    finally:
        log.close()
    assert "CONFIG_VIRTIO_PCI" in (tmp_path / "build.log").read_text()


def test_build_environment_is_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARCH", "arm64")
    monkeypatch.setenv("CROSS_COMPILE", "aarch64-linux-gnu-")
    monkeypatch.setenv("MAKEFLAGS", "-j99")
    env = build._build_env(fake_inputs())
    assert "ARCH" not in env and "CROSS_COMPILE" not in env and "MAKEFLAGS" not in env
    assert env["KBUILD_BUILD_HOST"] == "popek" and env["LC_ALL"] == "C"
    assert env["PATH"] == os.environ["PATH"]
