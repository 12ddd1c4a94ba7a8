"""popek's Debian 12 root disk (``popek image build --rootfs debian``, ``popek run --image debian``): an ext4 image
of a bookworm tree that ``mmdebstrap`` makes from the distribution's packages, booted by the default guest's kernel
and initramfs, whose init switch_roots into it (popek/image/init, ``popek.root=/dev/vda``).

Recipe (ROOTFS_RECIPE): ``mmdebstrap --variant=apt`` (Essential packages and apt; mmdebstrap(1) VARIANTS) of
SUITE from the Debian mirror and its security and updates suites, with PACKAGES included; the agent binary of
the default guest (popek/agent/, built by build.py) at /sbin/popek-agent and the very same init script as the
initramfs's at /sbin/popek-init (one implementation, told apart by POPEK_STAGE); then ``mke2fs -t ext4 -d TREE``
(e2fsprogs) writes the file system without mounting anything, sized to the tree plus room for apt (image_size).

Cache: ``rootfs-debian-<key>/`` beside the default guest's entries, the key a hash of the package list with the
candidate versions the host's apt reports for it (``apt-cache policy``: same suite, so the same versions the
mirror serves when the host's lists are fresh), the init script, the agent binary's digest, mmdebstrap's version,
the suite, variant, mirrors and recipe. The versions actually installed (the whole closure) are in the manifest.
The build, its lock, its log and its publication by one rename are build.py's.

A VM never writes the cached image: each run boots a copy-on-write clone of it (``cp --reflink=auto
--sparse=always`` into the run's temporary directory, a reflink where the file system has them, else a sparse
copy of the ~300 MB the tree uses), removed with the run, so every run starts from the same disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popek.agent import binary as agent_binary
from popek.image import build
from popek.image.errors import ImageError
from popek.image.progress import Progress

# Bump when the recipe changes in a way the inputs below do not show.
ROOTFS_RECIPE = 1

IMAGES = ("default", "debian")  # what `popek run --image` and popek.VM(image=) accept
DEFAULT_IMAGE = "default"

SUITE = "bookworm"
VARIANT = "apt"
MIRRORS = (
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
)
# python3 and what init and users need: iproute2 (ip), busybox-static (/bin/busybox runs init, udhcpc is the DHCP
# client), ca-certificates and wget so `wget https://...` works, as apt (in the variant) does.
PACKAGES = ("python3", "ca-certificates", "iproute2", "busybox-static", "wget")

ROOTFS_PREFIX = "rootfs-debian-"
DISK = "rootfs.ext4"
MANIFEST = "manifest.json"
AGENT_PATH = "usr/sbin/popek-agent"  # /sbin is a symlink to usr/sbin in bookworm's merged /usr
INIT_PATH = "usr/sbin/popek-init"
ROOT_DEVICE = "/dev/vda"  # the root disk is the first virtio-blk disk
ROOT_PARAMETER = f"popek.root={ROOT_DEVICE}"
ROOT_SERIAL = "popek-root"
FS_LABEL = "popek-root"

# Room on top of the tree: apt's lists (~70 MB for bookworm main) and some packages; free space costs nothing on
# the host, as the image is sparse.
MARGIN_BYTES = 768 << 20
NEEDED_FREE_BYTES = 1 << 30  # the tree (~250 MB) and the image's used blocks (~300 MB)

REQUIREMENTS = (
    build.Requirement("mmdebstrap", "mmdebstrap", command="mmdebstrap"),
    build.Requirement("mke2fs", "e2fsprogs", command="mke2fs"),
    build.Requirement("apt-cache", "apt", command="apt-cache"),
    build.Requirement("cp", "coreutils", command="cp"),
)


def check_image_name(name: object) -> str:
    """The image name, or one ImageError naming the known ones."""
    if not isinstance(name, str) or name not in IMAGES:
        shown = repr(name) if not isinstance(name, str) or len(name) <= 40 else repr(name[:40] + "...")
        raise ImageError(f"unknown image {shown} (known: {', '.join(IMAGES)})")
    return name


@dataclass(frozen=True)
class RootfsImage:
    """A built root disk, booted by ``guest`` (the default kernel and initramfs) with ``cmdline``."""

    disk: Path
    key: str
    guest: build.GuestImage

    @property
    def cmdline(self) -> str:
        return f"{self.guest.cmdline} {ROOT_PARAMETER}"


# ---------------------------------------------------------------------------------------------------------------
# the inputs and their key


@dataclass(frozen=True)
class RootfsInputs:
    recipe: int
    suite: str
    variant: str
    mirrors: tuple[str, ...]
    packages: dict[str, str]  # requested package -> apt's candidate version
    init: bytes
    agent_sha256: str
    mmdebstrap_version: str

    def describe(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "suite": self.suite,
            "variant": self.variant,
            "mirrors": list(self.mirrors),
            "packages": dict(sorted(self.packages.items())),
            "init sha256": hashlib.sha256(self.init).hexdigest(),
            "agent sha256": self.agent_sha256,
            "mmdebstrap": self.mmdebstrap_version,
        }

    @property
    def key(self) -> str:
        return build._digest(self.describe())


def parse_policy(text: str) -> dict[str, str]:
    """Package -> candidate version from ``apt-cache policy PKG...`` output (apt-cache(8)); a package apt does not
    know has no entry, one without a candidate (``(none)``) neither."""
    versions: dict[str, str] = {}
    package = None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            package = line[:-1].partition(":")[0]
        elif package is not None and line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version and version != "(none)":
                versions[package] = version
            package = None
    return versions


def candidate_versions(
    packages: tuple[str, ...] = PACKAGES, run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run
) -> dict[str, str]:
    """apt's candidate version of each package; ImageError naming those apt has none for."""
    try:
        result = run(
            ["apt-cache", "policy", *packages],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
            env={**os.environ, "LC_ALL": "C"},
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageError(f"cannot ask apt for the root disk's package versions: {exc}") from exc
    versions = parse_policy(result.stdout)
    missing = [package for package in packages if package not in versions]
    if missing:
        raise ImageError(
            f"apt on this host knows no version of {', '.join(missing)} (the Debian root disk is keyed by them): "
            "run apt-get update"
        )
    return {package: versions[package] for package in packages}


def gather_rootfs_inputs(agent: bytes) -> RootfsInputs:
    versions = build.installed_versions(["mmdebstrap"])
    if "mmdebstrap" not in versions:
        raise build.missing_error([REQUIREMENTS[0]], "build popek's Debian root disk")
    return RootfsInputs(
        recipe=ROOTFS_RECIPE,
        suite=SUITE,
        variant=VARIANT,
        mirrors=MIRRORS,
        packages=candidate_versions(),
        init=build.recipe_init(),
        agent_sha256=hashlib.sha256(agent).hexdigest(),
        mmdebstrap_version=versions["mmdebstrap"],
    )


def guest_agent(guest: build.GuestImage) -> bytes:
    """The agent binary the default guest's build compiled (kept in its cache entry)."""
    path = guest.kernel.parent / agent_binary.BINARY
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(
            f"the default guest's entry has no agent binary ({path}: {exc.strerror}); rebuild it: "
            "popek image build --force"
        ) from exc


# ---------------------------------------------------------------------------------------------------------------
# the recipe


def mmdebstrap_command(inputs: RootfsInputs, tree: Path) -> list[str]:
    return [
        "mmdebstrap",
        f"--variant={inputs.variant}",
        "--mode=root",
        "--format=directory",
        f"--include={','.join(sorted(inputs.packages))}",
        # the guest needs no documentation and no translations; apt's cache of .debs would only take room
        # (mmdebstrap removes apt's downloaded .debs and lists itself: its cleanup/apt step)
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        inputs.suite,
        str(tree),
        *inputs.mirrors,
    ]


def tree_bytes(tree: Path) -> int:
    """The space the tree's files take (allocated blocks, symlinks not followed; hard links counted once)."""
    total, seen = 0, set()
    for directory, dirs, files in os.walk(tree):
        for name in (*dirs, *files):
            st = os.lstat(os.path.join(directory, name))
            if st.st_nlink > 1 and not os.path.isdir(os.path.join(directory, name)):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total += max(st.st_blocks * 512, 4096)  # ext4 gives every inode at least a block's worth here
    return total


def image_size(content: int) -> int:
    """The ext4 image's size for a tree of content bytes: a quarter more (metadata, the journal) plus
    MARGIN_BYTES, in whole MiB."""
    if content < 0:
        raise ImageError(f"a tree cannot take {content} bytes")
    size = content + content // 4 + MARGIN_BYTES
    return (size + (1 << 20) - 1) // (1 << 20) << 20


def mke2fs_command(tree: Path, image: Path, size: int, key: str) -> list[str]:
    """mke2fs(8) -d copies the tree in without a mount; the UUID comes from the key, so it is the same each build."""
    fs_uuid = uuid.UUID(hashlib.sha256(key.encode()).hexdigest()[:32])
    return [
        "mke2fs", "-q", "-F", "-t", "ext4", "-L", FS_LABEL, "-U", str(fs_uuid), "-E", "root_owner=0:0",
        "-d", str(tree), str(image), f"{size >> 10}k",
    ]  # fmt: skip


def _installed(tree: Path) -> dict[str, str]:
    result = subprocess.run(
        ["dpkg-query", f"--admindir={tree / 'var/lib/dpkg'}", "-W", "-f=${Package}\t${Version}\n"],
        capture_output=True,
        text=True,
        check=False,
    )
    return dict(line.split("\t", 1) for line in result.stdout.splitlines() if "\t" in line)


# ---------------------------------------------------------------------------------------------------------------
# the cache


def _entry_image(entry: Path, key: str, guest: build.GuestImage) -> RootfsImage | None:
    if (entry / DISK).is_file() and (entry / MANIFEST).is_file():
        return RootfsImage(disk=entry / DISK, key=key, guest=guest)
    return None


def ensure_rootfs(name: str = "debian", progress: bool = True, force: bool = False) -> RootfsImage:
    """The root disk for the current inputs (and the default guest that boots it), built first if need be."""
    if check_image_name(name) != "debian":
        raise ImageError(f"image {name!r} has no root disk: it is the initramfs of the default guest")
    guest = build.ensure_default_guest(progress=progress)
    agent = guest_agent(guest)
    missing = [r for r in REQUIREMENTS if shutil.which(r.command or "") is None]
    if missing:
        raise build.missing_error(missing, "build popek's Debian root disk")
    inputs = gather_rootfs_inputs(agent)
    root = build.cache_dir()
    entry = root / f"{ROOTFS_PREFIX}{inputs.key}"
    if not force and (image := _entry_image(entry, inputs.key, guest)) is not None:
        return image
    if os.geteuid() != 0:
        raise ImageError(
            "building the Debian root disk needs root here (mmdebstrap --mode=root, then mke2fs -d copies the "
            "tree's owners); run `popek image build --rootfs debian` as root once, the image is then cached"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageError(f"cannot create the cache directory {root}: {exc}") from exc
    with build._key_lock(root, inputs.key, progress, prefix=ROOTFS_PREFIX):
        if not force and (image := _entry_image(entry, inputs.key, guest)) is not None:
            return image
        free = shutil.disk_usage(root).free
        if free < NEEDED_FREE_BYTES:
            raise ImageError(
                f"building the Debian root disk needs about {NEEDED_FREE_BYTES >> 30} GiB free in {root}; "
                f"{free / (1 << 30):.1f} GiB are free"
            )
        _build(inputs, agent, root, entry, progress)
    image = _entry_image(entry, inputs.key, guest)
    if image is None:  # pragma: no cover - _build publishes all parts or raises
        raise ImageError(f"the root disk build finished but {entry} is incomplete")
    return image


def _build(inputs: RootfsInputs, agent: bytes, root: Path, entry: Path, show_progress: bool) -> None:
    progress = Progress(show_progress, phases=3, label="the Debian root disk")
    started = time.monotonic()
    env = {**os.environ, "LC_ALL": "C"}
    with build._staging(root, ROOTFS_PREFIX, inputs.key, "the Debian root disk", progress) as (staging, out, log):
        log.note(f"popek Debian root disk, recipe {ROOTFS_RECIPE}, key {inputs.key}")
        log.write(json.dumps(inputs.describe(), indent=2) + "\n")
        tree = staging / "tree"

        progress.phase("mmdebstrap")
        build._run(mmdebstrap_command(inputs, tree), staging, log, env, "mmdebstrap", lambda _line: progress.update())
        installed = _installed(tree)
        drift = {p: installed.get(p) for p, v in inputs.packages.items() if installed.get(p) != v}
        if drift:  # the host's apt lists are older or newer than the mirror: the manifest says what is inside
            log.note(f"installed versions differ from the host's apt candidates: {drift}")

        progress.phase("popek")
        log.note("adding the guest agent and init")
        for path, data in ((AGENT_PATH, agent), (INIT_PATH, inputs.init)):
            target = tree / path
            target.write_bytes(data)
            target.chmod(0o755)
        (tree / "etc/hostname").write_text("popek\n")
        (tree / "etc/resolv.conf").unlink(missing_ok=True)  # the host's, copied by mmdebstrap; DHCP writes one
        (tree / "etc/resolv.conf").write_text("")

        progress.phase("ext4")
        content = tree_bytes(tree)
        size = image_size(content)
        build._run(mke2fs_command(tree, out / DISK, size, inputs.key), staging, log, env, "mke2fs")
        seconds = round(time.monotonic() - started, 1)
        manifest = {
            **build.manifest_head(inputs.key, inputs.describe(), seconds),
            "tree_bytes": content,
            "installed": installed,
            "artefacts": {"disk": build._artefact(out / DISK)},
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        log.note(f"done in {seconds} s")
        log.close()
        build._publish(out, entry, staging)
        progress.done(f"built the Debian root disk ({entry})")


def clone_disk(image: RootfsImage, directory: Path) -> Path:
    """A copy-on-write clone of the cached disk in directory, for one run to write (the cache stays pristine)."""
    target = directory / DISK
    try:
        subprocess.run(
            ["cp", "--reflink=auto", "--sparse=always", str(image.disk), str(target)],
            check=True,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else str(exc)
        raise ImageError(f"cannot copy the root disk {image.disk} for this run: {detail}") from exc
    return target


# ---------------------------------------------------------------------------------------------------------------
# what is there


def rootfs_info() -> list[str]:
    """Lines for `popek image info` about the Debian root disks in the cache."""
    root = build.cache_dir()
    manifests = sorted(root.glob(f"{ROOTFS_PREFIX}*/{MANIFEST}")) if root.is_dir() else []
    lines = ["", f"Debian root disks (`popek image build --rootfs debian`, recipe {ROOTFS_RECIPE}):"]
    if not manifests:
        lines.append("  none built yet")
    for path in manifests:
        try:
            manifest = json.loads(path.read_text())
            disk = manifest["artefacts"]["disk"]
            packages = ", ".join(f"{p} {v}" for p, v in manifest["inputs"]["packages"].items())
            lines.append(f"{path.parent}")
            lines.append(f"  built {manifest['built']} in {manifest['build_seconds']} s: {SUITE}, {packages}")
            lines.append(
                f"  disk     {path.parent / disk['file']}  {build._size(disk['size'])} (sparse)  "
                f"sha256 {disk['sha256'][:16]}"
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            lines.append(f"{path.parent}: unreadable manifest ({type(exc).__name__}: {exc})")
    for log in sorted(root.glob(f"{ROOTFS_PREFIX}*.failed.log")) if root.is_dir() else []:
        lines.append(f"failed build log: {log}")
    return lines
