"""Building and caching popek's default guest from Debian packages, the way Firecracker publishes a guest kernel
config and a rootfs recipe instead of binaries.

Recipe (RECIPE_VERSION): Debian's ``linux-source-6.1`` tarball, ``make tinyconfig``, the fragment ``guest.config``
merged with ``scripts/kconfig/merge_config.sh -m`` and settled with ``make olddefconfig``, every fragment option
checked in the result (kconfig.py), then ``make vmlinux bzImage``; popek boots ``vmlinux`` through its PVH entry
(no decompressor to emulate) and keeps ``bzImage`` as a second artefact. The initramfs (initramfs.py) is Debian's
``busybox-static`` with popek's ``init`` and its guest agent, compiled statically from popek/agent/guest/ as
popek/agent/binary.py says.

Cache: ``$XDG_CACHE_HOME/popek`` (default ``~/.cache/popek``), one ``guest-<key>`` folder per set of inputs, the key a
hash of everything that changes the artefacts (the fragment, the init script, the agent's sources and compiler
flags, the package versions, the tarball's size and mtime, the recipe version). A build runs in a ``.staging-*``
folder of the same file system and is published by one rename, so an interrupted build is never taken for a finished
one; a lock per key makes a second popek wait for the first instead of building the same thing twice.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any

from popek.agent import binary as agent_binary
from popek.boot import elf
from popek.errors import PopekError
from popek.image import kconfig
from popek.image.errors import ImageError
from popek.image.initramfs import busybox_applets, write_initramfs
from popek.image.progress import Progress
from popek.image.protocol import BASE_CMDLINE

# Bump when the recipe changes in a way the inputs below do not show (build steps, initramfs layout, make flags).
RECIPE_VERSION = 3  # 2: the initramfs has the guest agent; 3: init configures eth0, CONFIG_PACKET

LINUX_SOURCE_PACKAGE = "linux-source-6.1"
LINUX_SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
BUSYBOX_PACKAGE = "busybox-static"
BUSYBOX_BINARY = Path("/bin/busybox")

KERNEL = "vmlinux"
BZIMAGE = "bzImage"
INITRD = "initramfs.cpio"
MANIFEST = "manifest.json"
BUILD_LOG = "build.log"
KERNEL_CONFIG = "kernel.config"
ENTRY_PREFIX = "guest-"
STAGING_PREFIX = ".staging-"

# kbuild steps ("  CC      init/main.o" lines) of `make vmlinux bzImage` for this recipe, measured on Debian 12's
# 6.1.192; used only to size the progress bar (shown as an estimate, and the last build's count wins).
EXPECTED_COMPILE_STEPS = 1000

# Free space a build needs in the cache's file system: the extracted tree (~1.4 GB) plus objects.
NEEDED_FREE_BYTES = 2 << 30

# Variables of a user's environment that would point make at another tree, arch, compiler or config.
_SCRUBBED_ENV = (
    "ARCH", "SUBARCH", "CROSS_COMPILE", "CC", "HOSTCC", "LD", "LLVM", "LLVM_IAS", "O", "KBUILD_OUTPUT",
    "KBUILD_EXTMOD", "KCONFIG_CONFIG", "KCONFIG_ALLCONFIG", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEFILES",
    "GNUMAKEFLAGS", "KCFLAGS", "KCPPFLAGS", "KAFLAGS", "C_INCLUDE_PATH", "CPATH",
)  # fmt: skip

_KBUILD_STEP = re.compile(rb"^  [A-Z][A-Z0-9_]* ")


@dataclass(frozen=True)
class GuestImage:
    """A built default guest: boot ``kernel`` (an ELF vmlinux, PVH entry) with ``initrd`` and ``cmdline``."""

    kernel: Path
    initrd: Path
    bzimage: Path
    cmdline: str
    key: str


# ---------------------------------------------------------------------------------------------------------------
# where


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/popek``, or ``~/.cache/popek``: the XDG base directory spec ignores a relative value."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "popek"


# ---------------------------------------------------------------------------------------------------------------
# what the host has


@dataclass(frozen=True)
class Requirement:
    what: str  # as the user will recognise it: a command or a file
    package: str  # the Debian package that provides it
    command: str | None = None  # present if on PATH
    path: str | None = None  # present if the file exists


REQUIREMENTS = (
    Requirement("make", "make", command="make"),
    Requirement("gcc", "gcc", command="gcc"),
    Requirement("the C library headers (stdio.h)", "libc6-dev", path="/usr/include/stdio.h"),
    Requirement("bc", "bc", command="bc"),
    Requirement("lz4", "lz4", command="lz4"),
    Requirement("bison", "bison", command="bison"),
    Requirement("flex", "flex", command="flex"),
    Requirement("libelf.h", "libelf-dev", path="/usr/include/libelf.h"),
    Requirement("tar", "tar", command="tar"),
    Requirement("xz", "xz-utils", command="xz"),
    Requirement(str(BUSYBOX_BINARY), BUSYBOX_PACKAGE, path=str(BUSYBOX_BINARY)),
    Requirement(str(LINUX_SOURCE_TARBALL), LINUX_SOURCE_PACKAGE, path=str(LINUX_SOURCE_TARBALL)),
)


def missing_requirements(
    which: Callable[[str], str | None] = shutil.which, exists: Callable[[str], bool] = os.path.exists
) -> list[Requirement]:
    """What building the default guest needs and this host lacks (the lookups are parameters for the tests)."""

    def present(requirement: Requirement) -> bool:
        if requirement.command is not None:
            return which(requirement.command) is not None
        return requirement.path is None or exists(requirement.path)

    return [requirement for requirement in REQUIREMENTS if not present(requirement)]


def missing_error(missing: list[Requirement], doing: str = "build popek's default guest") -> ImageError:
    packages = list(dict.fromkeys(requirement.package for requirement in missing))
    what = ", ".join(f"{r.what} (package {r.package})" for r in missing)
    return ImageError(f"cannot {doing}: this host lacks {what}; install with: apt-get install {' '.join(packages)}")


def check_build_requirements() -> None:
    missing = missing_requirements()
    if missing:
        raise missing_error(missing)


def installed_versions(packages: list[str]) -> dict[str, str]:
    """Package -> version of those packages that dpkg reports as installed (a removed one may linger in
    dpkg's database with only its config files, which is not installed)."""
    if shutil.which("dpkg-query") is None:
        raise ImageError(
            "popek builds its default guest from Debian packages, and this host has no dpkg-query (package dpkg)"
        )
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Package}\t${db:Status-Abbrev}\t${Version}\n", *packages],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "LC_ALL": "C"},
    )
    versions = {}
    for line in result.stdout.splitlines():
        name, _, rest = line.partition("\t")
        status, _, version = rest.partition("\t")
        if status.startswith("ii") and version:
            versions[name.partition(":")[0]] = version
    return versions


# ---------------------------------------------------------------------------------------------------------------
# the inputs and their key


def recipe_fragment() -> bytes:
    return resources.files("popek.image").joinpath("guest.config").read_bytes()


def recipe_init() -> bytes:
    return resources.files("popek.image").joinpath("init").read_bytes()


@dataclass(frozen=True)
class Inputs:
    """Everything the artefacts are made from, as far as popek can tell without reading the whole tarball."""

    recipe: int
    fragment: bytes
    init: bytes
    agent: str  # agent_binary.source_digest(): its sources and compiler flags
    linux_source_version: str
    linux_source_size: int
    linux_source_mtime: int  # seconds; the tarball's size and mtime stand in for its 140 MB of content
    busybox_version: str

    def describe(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "guest.config sha256": hashlib.sha256(self.fragment).hexdigest(),
            "init sha256": hashlib.sha256(self.init).hexdigest(),
            "agent sources sha256": self.agent,
            LINUX_SOURCE_PACKAGE: {
                "version": self.linux_source_version,
                "tarball": str(LINUX_SOURCE_TARBALL),
                "size": self.linux_source_size,
                "mtime": self.linux_source_mtime,
            },
            BUSYBOX_PACKAGE: {"version": self.busybox_version},
        }

    @property
    def key(self) -> str:
        """Names the cache entry: changes whenever any input does."""
        return _digest(self.describe())

    @property
    def kernel_key(self) -> str:
        """The part of the key the kernel depends on, so an entry built for another init can lend its kernel."""
        described = self.describe()
        return _digest({name: described[name] for name in ("recipe", "guest.config sha256", LINUX_SOURCE_PACKAGE)})


def _digest(value: dict[str, Any]) -> str:
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]


def gather_inputs() -> Inputs:
    """The current inputs; ImageError (naming the packages) if the two source packages are not installed."""
    versions = installed_versions([LINUX_SOURCE_PACKAGE, BUSYBOX_PACKAGE])
    missing = [
        Requirement(package, package) for package in (LINUX_SOURCE_PACKAGE, BUSYBOX_PACKAGE) if package not in versions
    ]
    if missing:
        raise missing_error(missing, "find popek's default guest")
    try:
        tarball = LINUX_SOURCE_TARBALL.stat()
    except OSError as exc:
        raise missing_error(
            [Requirement(str(LINUX_SOURCE_TARBALL), LINUX_SOURCE_PACKAGE)], "find popek's default guest"
        ) from exc
    return Inputs(
        recipe=RECIPE_VERSION,
        fragment=recipe_fragment(),
        init=recipe_init(),
        agent=agent_binary.source_digest(),
        linux_source_version=versions[LINUX_SOURCE_PACKAGE],
        linux_source_size=tarball.st_size,
        linux_source_mtime=int(tarball.st_mtime),
        busybox_version=versions[BUSYBOX_PACKAGE],
    )


# ---------------------------------------------------------------------------------------------------------------
# the cache


def _entry_image(entry: Path, key: str) -> GuestImage | None:
    """The image in a published entry, or None if any part is missing (someone deleted files by hand)."""
    image = GuestImage(
        kernel=entry / KERNEL, initrd=entry / INITRD, bzimage=entry / BZIMAGE, cmdline=BASE_CMDLINE, key=key
    )
    parts = (image.kernel, image.initrd, image.bzimage, entry / MANIFEST)
    return image if all(part.is_file() for part in parts) else None


def cached_default_guest() -> GuestImage | None:
    """The built guest for the current inputs, without building; None if there is none (or no inputs to key it)."""
    try:
        inputs = gather_inputs()
    except ImageError:
        return None
    return _entry_image(cache_dir() / f"{ENTRY_PREFIX}{inputs.key}", inputs.key)


def ensure_default_guest(progress: bool = True, force: bool = False) -> GuestImage:
    """The default guest for the current inputs, built first if the cache has none (or if force)."""
    inputs = gather_inputs()
    root = cache_dir()
    entry = root / f"{ENTRY_PREFIX}{inputs.key}"
    if not force and (image := _entry_image(entry, inputs.key)) is not None:
        return image
    check_build_requirements()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageError(f"cannot create the cache directory {root}: {exc}") from exc
    with _key_lock(root, inputs.key, progress):
        # another popek may have built it while this one waited for the lock
        if not force and (image := _entry_image(entry, inputs.key)) is not None:
            return image
        _build(inputs, root, entry, progress, reuse_kernel=not force)
    image = _entry_image(entry, inputs.key)
    if image is None:  # pragma: no cover - _build publishes all parts or raises
        raise ImageError(f"the guest build finished but {entry} is incomplete")
    return image


@contextlib.contextmanager
def _key_lock(root: Path, key: str, progress: bool, prefix: str = ENTRY_PREFIX) -> Iterator[None]:
    """The lock of one cache entry (prefix: which kind of entry, the default guest's or a root disk's)."""
    path = root / f".{prefix}{key}.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print("popek: waiting for another popek that is building the same image", file=sys.stderr)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            # holding the lock means any staging folder of this key belongs to a popek that died mid-build
            for stale in root.glob(f"{STAGING_PREFIX}{key}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------------------
# the build


class _BuildFailed(Exception):
    """A step failed; _build turns it into an ImageError once the log is where it will stay."""


class _Log:
    """build.log: every command, its output, and the time each phase took."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: IO[bytes] = open(path, "wb")  # noqa: SIM115 - closed by close(), it outlives one block

    def write(self, text: str) -> None:
        if not self.handle.closed:
            self.handle.write(text.encode())
            self.handle.flush()

    def note(self, text: str) -> None:
        self.write(f"\n### {time.strftime('%H:%M:%S')} {text}\n")

    def close(self) -> None:
        self.handle.close()

    def tail(self, lines: int = 12) -> str:
        with contextlib.suppress(OSError):
            text = self.path.read_bytes().decode(errors="replace")
            return "\n".join("  " + line for line in text.rstrip().splitlines()[-lines:])
        return ""


def _build_env(inputs: Inputs) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in _SCRUBBED_ENV}
    stamp = email.utils.formatdate(inputs.linux_source_mtime, usegmt=True)
    env.update(
        LC_ALL="C",
        # uname -v and the banner then depend on the inputs only, not on who built the guest or when
        KBUILD_BUILD_USER="popek",
        KBUILD_BUILD_HOST="popek",
        KBUILD_BUILD_TIMESTAMP=stamp,
        KBUILD_BUILD_VERSION="1",
    )
    return env


def _jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _run(
    argv: list[str],
    cwd: Path,
    log: _Log,
    env: dict[str, str],
    what: str,
    on_line: Callable[[bytes], None] | None = None,
) -> None:
    log.note("$ " + " ".join(argv))
    try:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as exc:
        raise _BuildFailed(f"{what} failed: cannot run {argv[0]}: {exc}") from exc
    try:
        assert process.stdout is not None
        for line in process.stdout:
            log.handle.write(line)
            if on_line is not None:
                on_line(line)
        status = process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log.handle.flush()
    if status != 0:
        raise _BuildFailed(f"{what} failed (exit status {status})")


def _extract(staging: Path, log: _Log, progress: Progress) -> Path:
    """Untar linux-source into staging and return the tree; bytes fed to tar are the progress measure."""
    log.note(f"$ tar -xJf - -C {staging} < {LINUX_SOURCE_TARBALL}")
    total = LINUX_SOURCE_TARBALL.stat().st_size
    with open(LINUX_SOURCE_TARBALL, "rb") as source:
        process = subprocess.Popen(
            ["tar", "-xJf", "-", "-C", str(staging)], stdin=subprocess.PIPE, stdout=log.handle, stderr=log.handle
        )
        try:
            assert process.stdin is not None
            done = 0
            with contextlib.suppress(BrokenPipeError):  # tar gave up: its status and log say why
                while chunk := source.read(1 << 20):
                    process.stdin.write(chunk)
                    done += len(chunk)
                    progress.update(done >> 20, total >> 20, "MiB")
            with contextlib.suppress(BrokenPipeError):
                process.stdin.close()
            status = process.wait()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    if status != 0:
        raise _BuildFailed(f"extracting {LINUX_SOURCE_TARBALL} failed (tar exit status {status})")
    trees = [path for path in staging.iterdir() if path.is_dir() and (path / "Makefile").is_file()]
    if len(trees) != 1:
        raise _BuildFailed(f"{LINUX_SOURCE_TARBALL} did not unpack into one kernel tree")
    return trees[0]


def _configure(tree: Path, fragment: Path, log: _Log, env: dict[str, str], progress: Progress) -> None:
    _run(["make", "tinyconfig"], tree, log, env, "make tinyconfig", lambda _line: progress.update())
    _run(
        ["scripts/kconfig/merge_config.sh", "-m", ".config", str(fragment)],
        tree,
        log,
        env,
        "merging guest.config",
        lambda _line: progress.update(),
    )
    _run(["make", "olddefconfig"], tree, log, env, "make olddefconfig", lambda _line: progress.update())
    mismatches = kconfig.verify(fragment.read_text(), (tree / ".config").read_text())
    if mismatches:
        listed = "; ".join(str(mismatch) for mismatch in mismatches)
        log.note(f"guest.config options kconfig dropped or changed: {listed}")
        raise _BuildFailed(
            f"the kernel config does not honour {len(mismatches)} option(s) of guest.config "
            f"(a dependency is missing or a choice excludes them): {listed}"
        )


def _compile(tree: Path, log: _Log, env: dict[str, str], progress: Progress, expected: int) -> int:
    steps = 0

    def on_line(line: bytes) -> None:
        nonlocal steps
        if _KBUILD_STEP.match(line):
            steps += 1
            progress.update(steps, expected, "steps", estimated=True)

    _run(["make", f"-j{_jobs()}", KERNEL, BZIMAGE], tree, log, env, "compiling the guest kernel", on_line)
    return steps


def _expected_steps(root: Path) -> int:
    """The kbuild step count of the newest finished build of this recipe, else the measured constant."""
    best: tuple[float, int] | None = None
    for manifest in root.glob(f"{ENTRY_PREFIX}*/{MANIFEST}"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(manifest.read_text())
            if data["inputs"]["recipe"] == RECIPE_VERSION:
                candidate = (manifest.stat().st_mtime, int(data["kernel"]["compile_steps"]))
                if best is None or candidate > best:
                    best = candidate
    return best[1] if best else EXPECTED_COMPILE_STEPS


def manifest_head(key: str, inputs: dict[str, Any], seconds: float) -> dict[str, Any]:
    """What every cache entry's manifest.json starts with: its format, key, inputs, and when and how fast it was
    built (the default guest's, and the root disks' in rootfs.py)."""
    return {
        "format": 1,
        "key": key,
        "inputs": inputs,
        "built": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "build_seconds": seconds,
    }


def _artefact(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return {"file": path.name, "size": path.stat().st_size, "sha256": digest.hexdigest()}


def _first_line(argv: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        output = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False).stdout
        return output.splitlines()[0] if output else ""
    return ""


def _check_busybox_static(data: bytes) -> None:
    """A dynamically linked busybox (Debian's "busybox" package also installs /bin/busybox) cannot run in an
    initramfs without a libc: catch it here instead of as a guest that panics with "No working init found"."""
    try:
        dynamic = any(header.type == 3 for header in elf.program_headers(data))  # PT_INTERP
    except PopekError as exc:
        raise ImageError(f"{BUSYBOX_BINARY} is not a usable ELF executable ({exc})") from exc
    if dynamic:
        raise ImageError(
            f"{BUSYBOX_BINARY} is dynamically linked; the guest needs the static one: apt-get install {BUSYBOX_PACKAGE}"
        )


def _kernel_donor(root: Path, kernel_key: str) -> Path | None:
    """A published entry whose kernel was built from the same kernel inputs, if any: a change of the init script
    or of busybox then costs a second of cpio writing instead of minutes of compiling."""
    for manifest_path in sorted(root.glob(f"{ENTRY_PREFIX}*/{MANIFEST}")):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            manifest = json.loads(manifest_path.read_text())
            if manifest["kernel"]["key"] != kernel_key:
                continue
            entry = manifest_path.parent
            artefacts = manifest["artefacts"]
            if (
                all(
                    (entry / artefacts[role]["file"]).stat().st_size == artefacts[role]["size"]
                    for role in ("kernel", "bzimage")
                )
                and (entry / KERNEL_CONFIG).is_file()
            ):
                return entry
    return None


def _build_kernel(
    inputs: Inputs, staging: Path, out: Path, log: _Log, progress: Progress, expected: int
) -> dict[str, Any]:
    """extract, configure, verify, compile; leaves vmlinux, bzImage and kernel.config in out."""
    env = _build_env(inputs)
    progress.phase("extract")
    tree = _extract(staging, log, progress)

    progress.phase("configure")
    fragment = out / "guest.config"
    _configure(tree, fragment, log, env, progress)
    shutil.copyfile(tree / ".config", out / KERNEL_CONFIG)

    progress.phase("compile")
    steps = _compile(tree, log, env, progress, expected)
    shutil.copyfile(tree / KERNEL, out / KERNEL)
    shutil.copyfile(tree / "arch/x86/boot" / BZIMAGE, out / BZIMAGE)
    release = (tree / "include/config/kernel.release").read_text().strip()
    return {"key": inputs.kernel_key, "release": release, "compile_steps": steps}


def _build_agent(staging: Path, out: Path, log: _Log, env: dict[str, str]) -> bytes:
    """The guest agent, compiled from the sources written into staging (the binary is also kept in out)."""
    sources = staging / "agent"
    agent_binary.write_sources(sources)
    target = out / agent_binary.BINARY
    _run(agent_binary.compile_command(sources, target), sources, log, env, "compiling the guest agent")
    data = target.read_bytes()
    if any(header.type == 3 for header in elf.program_headers(data)):  # PT_INTERP
        raise _BuildFailed(f"the guest agent was linked dynamically ({' '.join(agent_binary.CFLAGS)} lost -static?)")
    return data


def _reuse_kernel(donor: Path, out: Path, log: _Log, progress: Progress) -> dict[str, Any]:
    progress.phase("kernel")
    log.note(f"the kernel inputs are those of {donor}: its vmlinux, bzImage and kernel.config are reused")
    for name in (KERNEL, BZIMAGE, KERNEL_CONFIG):
        shutil.copyfile(donor / name, out / name)
    kernel: dict[str, Any] = json.loads((donor / MANIFEST).read_text())["kernel"]
    kernel["reused_from"] = donor.name
    return kernel


def _build(inputs: Inputs, root: Path, entry: Path, show_progress: bool, reuse_kernel: bool) -> None:
    busybox = BUSYBOX_BINARY.read_bytes()
    _check_busybox_static(busybox)
    donor = _kernel_donor(root, inputs.kernel_key) if reuse_kernel else None
    if donor is None:
        free = shutil.disk_usage(root).free
        if free < NEEDED_FREE_BYTES:
            raise ImageError(
                f"building the default guest needs about {NEEDED_FREE_BYTES >> 30} GiB free in {root} "
                f"(the kernel source is unpacked there); {free / (1 << 30):.1f} GiB are free"
            )
    progress = Progress(show_progress, phases=4 if donor is None else 2)
    started = time.monotonic()
    with _staging(root, ENTRY_PREFIX, inputs.key, "the default guest", progress) as (staging, out, log):
        log.note(f"popek default guest, recipe {RECIPE_VERSION}, key {inputs.key}")
        log.write(json.dumps(inputs.describe(), indent=2) + "\n")
        (out / "guest.config").write_bytes(inputs.fragment)
        (out / "init").write_bytes(inputs.init)
        if donor is None:
            kernel = _build_kernel(inputs, staging, out, log, progress, _expected_steps(root))
        else:
            kernel = _reuse_kernel(donor, out, log, progress)
        entry_point = elf.pvh_entry((out / KERNEL).read_bytes())
        if entry_point is None:
            raise _BuildFailed(f"{KERNEL} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): is CONFIG_PVH lost?")
        kernel["pvh_entry"] = f"{entry_point:#x}"

        progress.phase("initramfs")
        log.note("compiling the guest agent and writing the initramfs")
        agent = _build_agent(staging, out, log, _build_env(inputs))
        applets = busybox_applets(BUSYBOX_BINARY)
        with open(out / INITRD, "wb") as cpio:
            write_initramfs(cpio, busybox=busybox, applets=applets, init=inputs.init, agent=agent)

        seconds = round(time.monotonic() - started, 1)
        manifest = {
            **manifest_head(inputs.key, inputs.describe(), seconds),
            "toolchain": {"gcc": _first_line(["gcc", "--version"]), "make": _first_line(["make", "--version"])},
            "kernel": kernel,
            "initramfs": {"busybox_applets": len(applets), "agent_size": len(agent)},
            "cmdline": BASE_CMDLINE,
            "artefacts": {
                "kernel": _artefact(out / KERNEL),
                "bzimage": _artefact(out / BZIMAGE),
                "initrd": _artefact(out / INITRD),
            },
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        log.note(f"done in {seconds} s")
        log.close()
        _publish(out, entry, staging)
        progress.done(f"built the default guest ({entry})")


@contextlib.contextmanager
def _staging(root: Path, prefix: str, key: str, what: str, progress: Progress) -> Iterator[tuple[Path, Path, _Log]]:
    """A build's staging folder, its ``out`` folder (what _publish makes the entry) and its log. A failure becomes
    one ImageError that names the kept log (``<prefix><key>.failed.log``) and quotes its end; the staging folder
    (an unpacked kernel tree, a Debian tree) is removed in every case."""
    staging = root / f"{STAGING_PREFIX}{key}-{os.getpid()}"
    failed_log = root / f"{prefix}{key}.failed.log"
    shutil.rmtree(staging, ignore_errors=True)
    out = staging / "out"
    out.mkdir(parents=True)
    log = _Log(out / BUILD_LOG)
    try:
        yield staging, out, log
        failed_log.unlink(missing_ok=True)
    except (_BuildFailed, ImageError, OSError) as exc:
        progress.abort()
        log.note(f"FAILED: {exc}")
        log.close()
        tail = log.tail()
        with contextlib.suppress(OSError):
            shutil.move(str(out / BUILD_LOG), failed_log)
        detail = exc if isinstance(exc, _BuildFailed | ImageError) else f"{type(exc).__name__}: {exc}"
        raise ImageError(
            f"building {what} failed: {detail}\nthe full build log is {failed_log}; its end:\n{tail}"
        ) from exc
    except BaseException:
        progress.abort()
        log.close()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(out: Path, entry: Path, staging: Path) -> None:
    """Make out the entry with one rename; a previous entry (a forced rebuild) is moved aside first."""
    if entry.exists():
        entry.rename(staging / "replaced")
    out.rename(entry)


# ---------------------------------------------------------------------------------------------------------------
# what is there


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB"


def image_info() -> str:
    """What the cache holds for the default guest, for `popek image` style commands: a few lines for people."""
    root = cache_dir()
    lines = [f"popek default guest (recipe {RECIPE_VERSION}); cache: {root}"]
    try:
        inputs: Inputs | None = gather_inputs()
    except ImageError as exc:
        inputs = None
        lines.append(f"current inputs: unknown ({exc})")
    current = f"{ENTRY_PREFIX}{inputs.key}" if inputs else None
    if inputs is not None:
        lines.append(
            f"current inputs: {LINUX_SOURCE_PACKAGE} {inputs.linux_source_version}, "
            f"{BUSYBOX_PACKAGE} {inputs.busybox_version} -> key {inputs.key}"
        )
    entries = sorted(root.glob(f"{ENTRY_PREFIX}*/{MANIFEST}")) if root.is_dir() else []
    if current and not any(manifest.parent.name == current for manifest in entries):
        lines.append("status: not built yet (the first `popek run` builds it, about 5 minutes on 2 cores)")
    for manifest_path in entries:
        entry = manifest_path.parent
        tag = "current" if entry.name == current else "stale: built from other inputs"
        lines.append("")
        lines.append(f"{entry} ({tag})")
        try:
            manifest = json.loads(manifest_path.read_text())
            described = manifest["inputs"]
            lines.append(
                f"  built {manifest['built']} in {manifest['build_seconds']} s from "
                f"{LINUX_SOURCE_PACKAGE} {described[LINUX_SOURCE_PACKAGE]['version']} "
                f"(kernel {manifest['kernel']['release']}), {BUSYBOX_PACKAGE} {described[BUSYBOX_PACKAGE]['version']}"
            )
            for role, artefact in manifest["artefacts"].items():
                lines.append(
                    f"  {role:<8} {entry / artefact['file']}  {_size(artefact['size'])}  "
                    f"sha256 {artefact['sha256'][:16]}"
                )
            lines.append(f"  cmdline  {BASE_CMDLINE}")
            lines.append(f"  log      {entry / BUILD_LOG}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            lines.append(f"  unreadable manifest ({type(exc).__name__}: {exc})")
    failed = sorted(root.glob(f"{ENTRY_PREFIX}*.failed.log")) if root.is_dir() else []
    for log in failed:
        lines.append(f"failed build log: {log}")
    from popek.image import rootfs  # it imports this module

    lines.extend(rootfs.rootfs_info())
    return "\n".join(lines)
