"""Running single x86-64 instructions natively on the host CPU, as the oracle for popek's instruction semantics.

Each snippet is assembled with nasm into a function `f(a, b, c, out)` (System V: rdi, rsi, rdx, rcx) whose body
loads rax/rbx/rcx/rdx from a, b, c, runs the instruction, and stores rax, rbx and RFLAGS to out[0..2].
`NativeBuffer` runs a body that gets one pointer in RDI instead, to a buffer it reads its inputs from and writes
its results to (the x87 tests load and save the whole FPU state there).
"""

from __future__ import annotations

import ctypes
import mmap
import shutil
import subprocess
import tempfile
from pathlib import Path

PROLOGUE = """bits 64
push rbx
mov r8, rcx
mov rax, rdi
mov rbx, rsi
mov rcx, rdx
mov rdx, 0
"""
EPILOGUE = """
mov [r8], rax
mov [r8+8], rbx
pushfq
pop rax
mov [r8+16], rax
pop rbx
ret
"""
_FUNC = ctypes.CFUNCTYPE(None, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_void_p)
_keep: list[object] = []


def available() -> bool:
    return shutil.which("nasm") is not None


def assemble(body: str, prologue: str = PROLOGUE, epilogue: str = EPILOGUE) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "s.asm", Path(d) / "s.bin"
        src.write_text(prologue + body + epilogue)
        subprocess.run(["nasm", "-f", "bin", "-o", str(out), str(src)], check=True, capture_output=True)
        return out.read_bytes()


class Native:
    def __init__(self, body: str) -> None:
        code = assemble(body)
        self._map = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._map.write(code)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self._fn = _FUNC(address)
        _keep.append(self)

    def __call__(self, a: int, b: int = 0, c: int = 0) -> tuple[int, int, int]:
        out = (ctypes.c_uint64 * 3)()
        self._fn(a, b, c, ctypes.addressof(out))
        return out[0], out[1], out[2]


_BUFFER_FUNC = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class NativeBuffer:
    """`body` (64-bit code, RDI pointing at the buffer, RBX free to use) run as `f(buffer)`."""

    def __init__(self, body: str) -> None:
        code = assemble(body, "bits 64\npush rbx\n", "\npop rbx\nret\n")
        self._map = mmap.mmap(-1, (len(code) + 4095) & ~4095, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self._map.write(code)
        self._fn = _BUFFER_FUNC(ctypes.addressof(ctypes.c_char.from_buffer(self._map)))
        _keep.append(self)

    def __call__(self, data: bytes) -> bytes:
        buf = ctypes.create_string_buffer(bytes(data), len(data))
        self._fn(ctypes.addressof(buf))
        return buf.raw
