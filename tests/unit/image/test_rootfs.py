"""The Debian root disk's bookkeeping (popek/image/rootfs.py): image names, apt's candidate versions, the cache key,
the mmdebstrap and mke2fs recipes, a build with mmdebstrap replaced by a tiny tree (real mke2fs, real cache), the
per-run clone, and the init's root-disk section run by busybox with its mount and switch_root stubbed."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from popek import cli
from popek.api import VM
from popek.errors import ConfigError
from popek.image import ImageError, build, rootfs
from popek.image.build import recipe_init
from popek.vm import VIRTIO_IRQS

BUSYBOX = Path("/bin/busybox")
needs_busybox = pytest.mark.skipif(not BUSYBOX.is_file(), reason="busybox-static is not installed")

POLICY = """python3:
  Installed: 3.11.2-1+b1
  Candidate: 3.11.2-1+b1
  Version table:
 *** 3.11.2-1+b1 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
wget:
  Installed: (none)
  Candidate: 1.21.3-1+deb12u1
  Version table:
     1.21.3-1+deb12u1 500
        500 http://deb.debian.org/debian bookworm/main amd64 Packages
ghost:
  Installed: (none)
  Candidate: (none)
  Version table:
"""


def fake_inputs(**changes: Any) -> rootfs.RootfsInputs:
    inputs = rootfs.RootfsInputs(
        recipe=rootfs.ROOTFS_RECIPE,
        suite=rootfs.SUITE,
        variant=rootfs.VARIANT,
        mirrors=rootfs.MIRRORS,
        packages={package: "1.0" for package in rootfs.PACKAGES},
        init=b"#!/bin/busybox sh\n",
        agent_sha256="a" * 64,
        mmdebstrap_version="1.3.5-7",
    )
    return dataclasses.replace(inputs, **changes)


# ---------------------------------------------------------------------------------------------------------------
# names, versions, key, recipe


@pytest.mark.parametrize("name", ["default", "debian"])
def test_known_images_are_accepted(name: str) -> None:
    assert rootfs.check_image_name(name) == name


@pytest.mark.parametrize("name", ["ubuntu", "", "Debian", "debian ", "x" * 500, None, 7, b"debian"])
def test_an_unknown_image_is_one_clear_error(name: object) -> None:
    with pytest.raises(ImageError, match=r"unknown image .* \(known: default, debian\)") as error:
        rootfs.check_image_name(name)
    assert len(str(error.value)) < 120  # a long name is cut, not echoed whole


def test_policy_output_gives_candidates_and_skips_packages_without_one() -> None:
    assert rootfs.parse_policy(POLICY) == {"python3": "3.11.2-1+b1", "wget": "1.21.3-1+deb12u1"}
    assert rootfs.parse_policy("") == {}
    assert rootfs.parse_policy("garbage\n  Candidate: 1\n") == {}  # a candidate line outside a package block


def test_candidate_versions_names_what_apt_does_not_know() -> None:
    def run(argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        assert argv[:2] == ["apt-cache", "policy"]
        return subprocess.CompletedProcess(argv, 0, POLICY, "")

    assert rootfs.candidate_versions(("python3", "wget"), run) == {"python3": "3.11.2-1+b1", "wget": "1.21.3-1+deb12u1"}
    with pytest.raises(ImageError, match=r"knows no version of ghost, nope.*apt-get update"):
        rootfs.candidate_versions(("python3", "ghost", "nope"), run)

    def broken(argv: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        raise FileNotFoundError(2, "No such file or directory", "apt-cache")

    with pytest.raises(ImageError, match="cannot ask apt"):
        rootfs.candidate_versions(("python3",), broken)


@pytest.mark.skipif(shutil.which("apt-cache") is None, reason="not a Debian host")
def test_the_host_apt_knows_every_package_of_the_recipe() -> None:
    versions = rootfs.candidate_versions()
    assert sorted(versions) == sorted(rootfs.PACKAGES) and all(versions.values())


def test_key_is_stable_and_follows_every_input() -> None:
    base = fake_inputs()
    assert base.key == fake_inputs().key and len(base.key) == 16
    changed = [
        fake_inputs(recipe=base.recipe + 1),
        fake_inputs(suite="trixie"),
        fake_inputs(variant="minbase"),
        fake_inputs(mirrors=("deb http://mirror.example/debian bookworm main",)),
        fake_inputs(packages={**base.packages, "python3": "1.1"}),
        fake_inputs(packages={**base.packages, "vim": "9"}),
        fake_inputs(init=base.init + b"echo\n"),
        fake_inputs(agent_sha256="b" * 64),
        fake_inputs(mmdebstrap_version="1.4.0-1"),
    ]
    keys = {inputs.key for inputs in changed}
    assert len(keys) == len(changed) and base.key not in keys


def test_the_root_disk_runs_the_initramfs_init_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """One implementation: the init copied into the disk is the shipped init's bytes, and part of the key."""
    agent = b"\x7fELF agent"
    monkeypatch.setattr(rootfs, "candidate_versions", lambda: {p: "1" for p in rootfs.PACKAGES})
    monkeypatch.setattr(build, "installed_versions", lambda packages: {"mmdebstrap": "1.3.5-7"})
    inputs = rootfs.gather_rootfs_inputs(agent)
    assert inputs.init == recipe_init() and b"POPEK_STAGE=root exec switch_root" in inputs.init
    assert inputs.agent_sha256 == hashlib.sha256(agent).hexdigest()


def test_without_mmdebstrap_the_error_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "installed_versions", lambda packages: {})
    with pytest.raises(ImageError, match=r"mmdebstrap \(package mmdebstrap\).*apt-get install mmdebstrap"):
        rootfs.gather_rootfs_inputs(b"")


def test_mmdebstrap_command_carries_the_recipe(tmp_path: Path) -> None:
    inputs = fake_inputs()
    argv = rootfs.mmdebstrap_command(inputs, tmp_path / "tree")
    assert argv[0] == "mmdebstrap" and "--variant=apt" in argv and "--mode=root" in argv
    include = next(arg for arg in argv if arg.startswith("--include="))
    assert sorted(include.removeprefix("--include=").split(",")) == sorted(rootfs.PACKAGES)
    position = argv.index(rootfs.SUITE)
    assert argv[position + 1] == str(tmp_path / "tree") and tuple(argv[position + 2 :]) == rootfs.MIRRORS


def test_image_size_covers_the_tree_with_room_in_whole_mib() -> None:
    previous = 0
    for content in (0, 1, 4096, 200 << 20, 3 << 30):
        size = rootfs.image_size(content)
        assert size % (1 << 20) == 0 and size >= content + content // 4 + rootfs.MARGIN_BYTES
        assert size < content + content // 4 + rootfs.MARGIN_BYTES + (1 << 20)
        assert size >= previous
        previous = size
    with pytest.raises(ImageError):
        rootfs.image_size(-1)


def test_mke2fs_uuid_follows_the_key(tmp_path: Path) -> None:
    one = rootfs.mke2fs_command(tmp_path, tmp_path / "a.ext4", 8 << 20, "k1")
    assert one == rootfs.mke2fs_command(tmp_path, tmp_path / "a.ext4", 8 << 20, "k1")
    assert one != rootfs.mke2fs_command(tmp_path, tmp_path / "a.ext4", 8 << 20, "k2")
    assert one[-3:] == [str(tmp_path), str(tmp_path / "a.ext4"), "8192k"] and "ext4" in one


# ---------------------------------------------------------------------------------------------------------------
# a build, with mmdebstrap replaced by a tiny tree


@dataclasses.dataclass
class FakeDebian:
    guest: build.GuestImage
    inputs: rootfs.RootfsInputs = dataclasses.field(default_factory=fake_inputs)
    runs: int = 0
    fail: bool = False


@pytest.fixture
def fake_debian(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeDebian]:
    if os.geteuid() != 0:
        pytest.skip("the root disk build runs as root")
    if shutil.which("mke2fs") is None or shutil.which("debugfs") is None:
        pytest.skip("e2fsprogs is not installed")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    entry = tmp_path / "guest"
    entry.mkdir()
    (entry / "popek-agent").write_bytes(b"\x7fELF agent stand-in")
    guest = build.GuestImage(entry / "vmlinux", entry / "initramfs.cpio", entry / "bzImage", "console=ttyS0", "g")
    fake = FakeDebian(guest)
    monkeypatch.setattr(build, "ensure_default_guest", lambda progress=True, force=False: fake.guest)
    monkeypatch.setattr(rootfs, "gather_rootfs_inputs", lambda agent: fake.inputs)
    monkeypatch.setattr(rootfs, "MARGIN_BYTES", 4 << 20)

    def command(inputs: rootfs.RootfsInputs, tree: Path) -> list[str]:
        fake.runs += 1
        script = f"mkdir -p {tree}/usr/sbin {tree}/etc {tree}/proc && echo debian > {tree}/etc/os-release"
        return ["sh", "-c", script + (" && echo E: unable to fetch >&2 && exit 1" if fake.fail else "")]

    monkeypatch.setattr(rootfs, "mmdebstrap_command", command)
    yield fake


def debugfs_cat(image: Path, path: str) -> bytes:
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, check=True).stdout


def test_a_build_publishes_an_ext4_disk_with_agent_and_init_and_is_reused(fake_debian: FakeDebian) -> None:
    image = rootfs.ensure_rootfs(progress=False)
    entry = build.cache_dir() / f"rootfs-debian-{fake_debian.inputs.key}"
    assert image.disk == entry / "rootfs.ext4" and fake_debian.runs == 1
    assert image.cmdline == "console=ttyS0 popek.root=/dev/vda"
    assert debugfs_cat(image.disk, "/usr/sbin/popek-init") == fake_debian.inputs.init
    assert debugfs_cat(image.disk, "/usr/sbin/popek-agent") == b"\x7fELF agent stand-in"
    assert debugfs_cat(image.disk, "/etc/os-release") == b"debian\n"
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["key"] == image.key and manifest["artefacts"]["disk"]["size"] == image.disk.stat().st_size
    assert [p.name for p in build.cache_dir().iterdir() if p.name.startswith(".staging")] == []
    assert rootfs.ensure_rootfs(progress=False) == image and fake_debian.runs == 1  # a cache hit
    assert rootfs.ensure_rootfs(progress=False, force=True) == image and fake_debian.runs == 2
    assert str(entry) in "\n".join(rootfs.rootfs_info())
    # a new init is a new key, so a new disk
    fake_debian.inputs = fake_inputs(init=b"#!/bin/busybox sh\necho 2\n")
    assert rootfs.ensure_rootfs(progress=False).key != image.key and fake_debian.runs == 3


def test_a_failed_build_publishes_nothing_and_names_its_log(fake_debian: FakeDebian) -> None:
    fake_debian.fail = True
    with pytest.raises(ImageError, match="building the Debian root disk failed: mmdebstrap failed") as error:
        rootfs.ensure_rootfs(progress=False)
    log = build.cache_dir() / f"rootfs-debian-{fake_debian.inputs.key}.failed.log"
    assert str(log) in str(error.value) and "unable to fetch" in str(error.value)
    assert not list(build.cache_dir().glob("rootfs-debian-*/"))
    assert any("failed build log" in line for line in rootfs.rootfs_info())


def test_a_run_writes_its_own_clone_never_the_cached_disk(fake_debian: FakeDebian, tmp_path: Path) -> None:
    image = rootfs.ensure_rootfs(progress=False)
    before = image.disk.read_bytes()
    run = tmp_path / "run"
    run.mkdir()
    clone = rootfs.clone_disk(image, run)
    assert clone.parent == run and clone.read_bytes() == before
    with open(clone, "r+b") as handle:
        handle.write(b"guest scribbles")
    assert image.disk.read_bytes() == before
    with pytest.raises(ImageError, match="cannot copy the root disk"):
        rootfs.clone_disk(image, tmp_path / "no-such-dir")


def test_image_names_are_checked_before_anything_is_built() -> None:
    with pytest.raises(ImageError, match="unknown image 'alpine'"):
        rootfs.ensure_rootfs("alpine", progress=False)
    with pytest.raises(ImageError, match="has no root disk"):
        rootfs.ensure_rootfs("default", progress=False)


# ---------------------------------------------------------------------------------------------------------------
# the API and the CLI


def test_vm_refuses_unknown_images_and_a_kernel_with_an_image() -> None:
    with pytest.raises(ImageError, match="unknown image 'nope'"):
        VM(image="nope")
    with pytest.raises(ConfigError, match="boots the default kernel"):
        VM(image="debian", kernel="/boot/vmlinuz")
    with pytest.raises(ConfigError, match="boots the default kernel"):
        VM(image="debian", initrd="/boot/initrd")


def test_the_root_disk_is_the_first_disk_and_counts_against_the_devices(tmp_path: Path) -> None:
    data = tmp_path / "data.img"
    data.write_bytes(b"\0" * 4096)
    vm = VM(image="debian", disks=[data])
    spec = vm._spec(Path("vmlinux"), None, "", None, tmp_path / "root.ext4")
    assert [d.path for d in spec.disks] == [tmp_path / "root.ext4", data]
    assert spec.disks[0].serial == rootfs.ROOT_SERIAL and not spec.disks[0].read_only
    assert [d.path for d in vm._spec(Path("vmlinux"), None, "", None).disks] == [data]
    most = [data] * (len(VIRTIO_IRQS) - 1)  # all the IRQs but the agent's vsock device's
    VM(disks=most)  # fits without a root disk ...
    with pytest.raises(ConfigError, match="virtio devices"):
        VM(image="debian", disks=most)  # ... and not with one


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--image", "nope", "--", "true"], "unknown image 'nope'"),
        (["run", "--image", "debian", "--kernel", "/boot/x", "--", "true"], "drop --kernel"),
        (["image", "build", "--rootfs", "nope"], "unknown image 'nope'"),
        (["image", "build", "--rootfs", "default"], "the root disk popek builds is debian"),
    ],
)
def test_cli_bad_images_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------------
# the init's root-disk section, under busybox


def init_lines() -> list[str]:
    return recipe_init().decode().splitlines()


def root_choice_section() -> str:
    lines = init_lines()
    start = lines.index("popek_root=")
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("rootdev="))
    return "\n".join(lines[start : end + 1]) + "\n"


def root_switch_section() -> str:
    lines = init_lines()
    start = next(i for i, line in enumerate(lines) if line.startswith('if [ "$POPEK_STAGE" != root ] && '))
    end = next(i for i in range(start, len(lines)) if lines[i] == "fi")
    return "\n".join(lines[start : end + 1]) + "\n"


@needs_busybox
@pytest.mark.parametrize(
    ("cmdline", "device"),
    [
        ("console=ttyS0 popek.root=/dev/vda", "/dev/vda"),
        ("root=/dev/vdb", "/dev/vdb"),
        ("root=/dev/vdb popek.root=/dev/vda quiet", "/dev/vda"),  # popek's own wins
        ("popek.root=/dev/vda root=/dev/vdb", "/dev/vda"),
        ("console=ttyS0 xroot=/dev/vdc popek.rootfs=1", ""),  # neither parameter
        ("", ""),
    ],
)
def test_init_picks_the_root_device_from_the_command_line(tmp_path: Path, cmdline: str, device: str) -> None:
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    script = root_choice_section().replace("/proc/cmdline", str(tmp_path / "cmdline")) + 'echo "[$rootdev]"\n'
    result = subprocess.run([str(BUSYBOX), "sh", "-c", script], capture_output=True, text=True, timeout=30)
    assert result.stdout == f"[{device}]\n", result.stderr


@needs_busybox
@pytest.mark.parametrize("case", ["switch", "no-init", "in-the-root-already"])
def test_init_switches_into_the_root_disk_only_from_the_initramfs(tmp_path: Path, case: str) -> None:
    """The section with mount, switch_root and reboot as scripts that record their arguments, the disk a file."""
    stubs = {}
    for name in ("mount", "switch_root", "reboot", "mkdir"):
        stub = tmp_path / f"stub-{name}"
        stub.write_text(f'#!{BUSYBOX} sh\necho "{name} stage=$POPEK_STAGE $*"\n')
        stub.chmod(0o755)
        stubs[name] = str(stub)
    new_init = tmp_path / "newroot-init"
    if case != "no-init":
        new_init.write_text("#!/bin/sh\n")
        new_init.chmod(0o755)
    disk = tmp_path / "vda"
    disk.write_bytes(b"")
    script = (
        root_switch_section()
        .replace('[ ! -b "$rootdev" ]', '[ ! -e "$rootdev" ]')  # a file stands in for the block device
        .replace("mkdir -p /newroot", f"{stubs['mkdir']} -p /newroot")
        .replace("mount ", f"{stubs['mount']} ")
        .replace("exec switch_root", f"exec {stubs['switch_root']}")
        .replace("reboot -f", f"{stubs['reboot']} -f")
        .replace("[ -x /newroot/sbin/popek-init ]", f"[ -x {new_init} ]")
    )
    env = {"PATH": "/bin:/usr/bin", "rootdev": str(disk)}
    if case == "in-the-root-already":
        env["POPEK_STAGE"] = "root"
    result = subprocess.run(
        [str(BUSYBOX), "sh", "-c", f'rootdev="{disk}"\n' + script + "echo fell-through\n"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    lines = result.stdout.splitlines()
    if case == "switch":
        assert lines == [
            "mkdir stage= -p /newroot",
            f"mount stage= -t ext4 {disk} /newroot",
            "mount stage= --move /proc /newroot/proc",
            "mount stage= --move /sys /newroot/sys",
            "mount stage= --move /dev /newroot/dev",
            "switch_root stage=root /newroot /sbin/popek-init",
        ], result.stderr
    elif case == "no-init":
        assert lines[:2] == ["mkdir stage= -p /newroot", f"mount stage= -t ext4 {disk} /newroot"]
        assert "popek-exit-status: 125" in lines and "reboot stage= -f" in lines
        assert f"cannot boot from the root disk {disk}" in result.stderr
    else:
        assert lines == ["fell-through"]
