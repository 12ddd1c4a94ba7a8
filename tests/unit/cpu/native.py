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
        self.last_address = ctypes.addressof(buf)  # where the buffer was (x87 data pointers hold addresses in it)
        self._fn(self.last_address)
        return buf.raw


# --- 32-bit code in compatibility mode: a far return to Linux's 32-bit user code segment and back ---

USER32_CS, USER64_CS, USER_DS = 0x23, 0x33, 0x2B  # the x86-64 Linux user selectors (arch/x86/include/asm/segment.h)
_MAP_32BIT = 0x40
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)


class NativeCompat32:
    """`body32` (32-bit code, its data at `base + 0x1000` onward, see `data`) run in compatibility mode by a 64-bit
    trampoline: code, stack and data live in one mapping below 4 GiB (MAP_32BIT), since 32-bit code sees only
    ESP/EIP and 32-bit addresses. DS and ES are loaded with the 32-bit data selector (64-bit Linux processes run
    with null ones) and reset on return."""

    SIZE = 1 << 20
    DATA = 0x1000

    def __init__(self, body32: str) -> None:
        prot = mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC
        addr = _libc.mmap(None, self.SIZE, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_32BIT, -1, 0)
        if addr in (None, ctypes.c_void_p(-1).value) or addr >= 1 << 32:
            raise OSError(ctypes.get_errno(), "mmap(MAP_32BIT) failed")
        self.base = addr
        source = f"""bits 64
org {addr:#x}
push rbx
push rbp
mov [rel saved_rsp], rsp
mov rsp, {addr + self.SIZE - 16:#x}
push {USER32_CS}
lea rax, [rel compat]
push rax
retfq
bits 32
compat:
mov ax, {USER_DS}
mov ds, ax
mov es, ax
DATA equ {addr + self.DATA:#x}
{body32}
push {USER64_CS}
push back
retf
bits 64
back:
xor eax, eax
mov ds, ax
mov es, ax
mov rsp, [rel saved_rsp]
pop rbp
pop rbx
ret
saved_rsp: dq 0
"""
        with tempfile.TemporaryDirectory() as d:
            src, out = Path(d) / "s.asm", Path(d) / "s.bin"
            src.write_text(source)
            subprocess.run(["nasm", "-f", "bin", "-o", str(out), str(src)], check=True, capture_output=True)
            code = out.read_bytes()
        if len(code) > self.DATA:
            raise ValueError("the compatibility-mode snippet is too long")
        ctypes.memmove(addr, code, len(code))
        self._fn = _BUFFER_FUNC(addr)
        _keep.append(self)

    def __call__(self, data: bytes) -> bytes:
        """Copy `data` to the data area, run, and return the data area as the code left it."""
        ctypes.memmove(self.base + self.DATA, data, len(data))
        self._fn(0)
        return ctypes.string_at(self.base + self.DATA, len(data))
