"""How the guest agent is built: its C sources (popek/agent/guest/) and the one compiler command line, used by
the default guest's build (popek/image/build.py) and by the tests that run the agent on the host.

The agent is linked statically against Debian's glibc (libc6-dev), which the kernel build needs anyway: it calls
nothing that goes through NSS (no name lookups; numeric addresses only), so glibc's static-linking caveat does
not apply and the link is warning-free; musl would give a smaller binary (~100 KB instead of ~700 KB) for one
more package, which the initramfs does not need.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

CC = "gcc"
CFLAGS = ("-static", "-O2", "-std=c11", "-Wall", "-Wextra", "-Werror", "-s")
BINARY = "popek-agent"


def sources() -> dict[str, bytes]:
    """File name -> contents of every C source and header of the agent, in name order."""
    folder = resources.files("popek.agent").joinpath("guest")
    found = {
        entry.name: entry.read_bytes()
        for entry in folder.iterdir()
        if entry.is_file() and entry.name.endswith((".c", ".h"))
    }
    return dict(sorted(found.items()))


def source_digest() -> str:
    """Changes whenever a source, a header or the compiler flags change (part of the default guest's key)."""
    digest = hashlib.sha256(repr((CC, CFLAGS)).encode())
    for name, data in sources().items():
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def write_sources(directory: Path) -> list[Path]:
    """The sources written into directory (so a build never depends on how popek is installed)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in sources().items():
        path = directory / name
        path.write_bytes(data)
        written.append(path)
    return written


def compile_command(directory: Path, output: Path, cc: str = CC) -> list[str]:
    """The command that compiles the sources in directory (see write_sources) into the static binary output."""
    files = sorted(str(path) for path in directory.glob("*.c"))
    return [cc, *CFLAGS, "-o", str(output), *files]
