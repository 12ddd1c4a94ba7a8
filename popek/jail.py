"""Confine a VMM process as Firecracker's jailer confines its VMM: defence in depth against a VM escape.

A guest that compromised popek's device model runs Python code with this process's rights. `enter(spec)` leaves
it almost none (docs/daemon.md, "Confinement"):

- mount, PID and IPC namespaces of its own, and a network namespace of its own unless the VM owns a TAP device
  (the TAP interface lives in the host's network namespace, so such a VM keeps it);
- a private root (a tmpfs) holding only what the VM uses, bind-mounted at the same absolute paths so that the
  VM's spec needs no rewriting: its kernel and initrd (read-only), its disks (read-only unless the VM writes them),
  its work directory (sockets, console, snapshots: read-write), and a /dev with null, zero, urandom, kvm, and
  net/tun only with a TAP device; the host's root is unmounted;
- optionally another uid/gid, then no capabilities (effective, permitted, inheritable, ambient and the bounding
  set) and PR_SET_NO_NEW_PRIVS;
- a seccomp filter (libseccomp through pyseccomp) allowing only the system calls a running VMM makes. The
  default action is EPERM, not KILL: a call the allowlist forgot is an OSError in Python that the VM process
  reports (and a bug to fix here), not a process killed without a word. socket() is allowed for AF_UNIX only,
  clone() only with CLONE_THREAD (threads; no fork), and there is no execve, execveat, fork, vfork, ptrace,
  mount, pivot_root, bpf, kexec ... at all.

`enter` forks: the child is PID 1 of the new PID namespace and returns from `enter` to run the VM; the parent
waits for it, forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to it, is confined the same way (caps, no_new_privs, seccomp;
it shares the child's mount namespace, so the pivot moves it into the new root too) and ends as the child
ended: the same exit status, or killed by the same signal. So the process a supervisor started stays the one to
watch. The child gets SIGKILL if the parent dies (PR_SET_PDEATHSIG).

What must happen before: every Python module the VMM will use must be imported first (the interpreter's stdlib
and site-packages are not in the new root); `preload()` imports popek's VM modules, and libseccomp is loaded (and
the filter built) before the pivot. /dev/kvm is not opened early: it is bound into the root, so the VMM opens it
as usual. The caller must be single-threaded (a seccomp filter and namespaces apply to the calling thread).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import importlib
import os
import signal
import stat
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from popek.kvm import consts, ioctl

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_THREAD = 0x00010000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SYS_PIVOT_ROOT = 155  # x86-64
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_SYS_ADMIN = 21

SCRATCH_OPTIONS = "mode=0700,size=64m"  # a `popek run --jail` VM's runtime directory: sockets, no data
NEW_ROOT = "/tmp"  # where the root tmpfs is mounted first (in the private mount namespace only; hides nothing)
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")
KVM = "/dev/kvm"
TUN = "/dev/net/tun"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)

# What a running VMM makes (strace -f -c of `popek serve` VM processes running the default guest with exec and
# files traffic, and of `popek run --jail`): memory, files and fds in its root, threads and their futexes, the
# KVM ioctls, epoll/eventfd/timerfd for the device loop, Unix sockets (vsock, control), signals between its own
# threads (the vCPU kick), time. socket, clone, clone3 and ioctl have rules of their own (build_filter).
ALLOWED = (
    # memory
    "brk",
    "mmap",
    "munmap",
    "mremap",
    "mprotect",
    "madvise",
    "mlock",
    "munlock",
    "msync",
    "membarrier",
    # files and fds (only what the root holds can be reached)
    "read",
    "write",
    "pread64",
    "pwrite64",
    "readv",
    "writev",
    "preadv",
    "pwritev",
    "preadv2",
    "pwritev2",
    "open",
    "openat",
    "close",
    "close_range",
    "lseek",
    "fstat",
    "stat",
    "lstat",
    "newfstatat",
    "statx",
    "fcntl",
    "dup",
    "dup2",
    "dup3",
    "pipe",
    "pipe2",
    "fsync",
    "fdatasync",
    "ftruncate",
    "fallocate",
    "getdents64",
    "getcwd",
    "readlink",
    "readlinkat",
    "access",
    "faccessat",
    "faccessat2",
    "unlink",
    "unlinkat",
    "rename",
    "renameat",
    "renameat2",
    "mkdir",
    "mkdirat",
    "rmdir",
    "fchmod",
    "chmod",
    "fchmodat",
    "flock",
    "utimensat",
    "copy_file_range",
    "sendfile",
    "splice",
    "fadvise64",
    "sync_file_range",
    "statfs",
    "fstatfs",
    "umask",
    # polling and event fds (the device loop, asyncio)
    "poll",
    "ppoll",
    "select",
    "pselect6",
    "epoll_create",
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "eventfd",
    "eventfd2",
    "timerfd_create",
    "timerfd_settime",
    "timerfd_gettime",
    # Unix sockets (socket itself: AF_UNIX only, below)
    "socketpair",
    "bind",
    "listen",
    "accept",
    "accept4",
    "connect",
    "getsockname",
    "getpeername",
    "getsockopt",
    "setsockopt",
    "sendto",
    "recvfrom",
    "sendmsg",
    "recvmsg",
    "sendmmsg",
    "recvmmsg",
    "shutdown",
    # threads, futexes, signals among its own threads
    "futex",
    "futex_waitv",
    "set_robust_list",
    "get_robust_list",
    "set_tid_address",
    "rseq",
    "sched_yield",
    "sched_getaffinity",
    "sched_setaffinity",
    "sched_getparam",
    "sched_getscheduler",
    "getpriority",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "rt_sigpending",
    "rt_sigtimedwait",
    "rt_sigsuspend",
    "rt_sigqueueinfo",
    "rt_tgsigqueueinfo",
    "sigaltstack",
    "tgkill",
    "tkill",
    "kill",
    "restart_syscall",
    "wait4",
    "waitid",
    "exit",
    "exit_group",
    "arch_prctl",
    "prctl",
    "prlimit64",
    "getrlimit",
    "getrusage",
    # identity and time
    "getpid",
    "getppid",
    "gettid",
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "getgroups",
    "getresuid",
    "getresgid",
    "getpgrp",
    "getpgid",
    "getsid",
    "uname",
    "sysinfo",
    "getrandom",
    "clock_gettime",
    "clock_getres",
    "clock_nanosleep",
    "gettimeofday",
    "nanosleep",
    "time",
    "times",
)
IOCTL_TYPES = (consts.KVMIO, ioctl.TERMINAL_IOCTL_TYPE)  # 'T': TCGETS..., TIOCGWINSZ, TUNSETIFF, FIONBIO, FIOCLEX
DENIED_ALWAYS = (
    "execve",
    "execveat",
    "fork",
    "vfork",
    "ptrace",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "bpf",
    "kexec_load",
    "init_module",
    "finit_module",
    "process_vm_readv",
    "process_vm_writev",
    "keyctl",
    "add_key",
    "userfaultfd",
    "perf_event_open",
)


class JailError(Exception):
    """The jail cannot be set up (not root, a path that does not exist, ...): one line for the user."""


@dataclass(frozen=True)
class Bind:
    """A host path bound into the new root at the same path; writable or read-only."""

    path: Path
    writable: bool = False


@dataclass
class JailSpec:
    """What the new root holds and who runs in it. `tap`: the VM owns a TAP device, so it keeps the host's
    network namespace and gets /dev/net/tun. `kvm`: bind /dev/kvm (False for the software backend)."""

    binds: list[Bind] = field(default_factory=list)
    kvm: bool = True
    tap: bool = False
    uid: int | None = None
    gid: int | None = None
    proc: bool = False  # mount the new PID namespace's /proc (popek's VMM does not need it)
    scratch: str | None = None  # a fresh tmpfs at this path in the root (writable; nothing of it on the host)

    @classmethod
    def for_vm(
        cls,
        *,
        workdir: str | os.PathLike[str] | None,
        kernel: str | os.PathLike[str] | None = None,
        initrd: str | os.PathLike[str] | None = None,
        disks: Iterable[tuple[str | os.PathLike[str], bool]] = (),
        readonly: Iterable[str | os.PathLike[str]] = (),
        kvm: bool = True,
        tap: bool = False,
        uid: int | None = None,
        gid: int | None = None,
    ) -> JailSpec:
        """A VM's jail: its kernel and initrd and `readonly` paths read-only, disks (path, writable), and its
        work directory read-write (sockets, console, snapshots)."""
        binds = [] if workdir is None else [Bind(Path(workdir), writable=True)]
        binds += [Bind(Path(p)) for p in (kernel, initrd) if p is not None]
        binds += [Bind(Path(p)) for p in readonly]
        binds += [Bind(Path(p), writable=bool(w)) for p, w in disks]
        return cls(binds=binds, kvm=kvm, tap=tap, uid=uid, gid=gid)

    def validate(self) -> None:
        """JailError for what cannot be jailed: relative or missing paths, '/' itself, half an identity."""
        for bind in self.binds:
            text = str(bind.path)
            if not bind.path.is_absolute():
                raise JailError(f"a jail path must be absolute: {text!r}")
            if "\0" in text:
                raise JailError("a jail path must not contain a NUL byte")
            if os.path.normpath(text) == "/":
                raise JailError("the host's root cannot be bound into the jail")
            if ".." in bind.path.parts:
                raise JailError(f"a jail path must not contain '..': {text!r}")
            if not os.path.lexists(text):
                raise JailError(f"no such file to bind into the jail: {text}")
        if self.scratch is not None and (
            not self.scratch.startswith("/") or os.path.normpath(self.scratch) in ("/", "/dev") or "\0" in self.scratch
        ):
            raise JailError(f"the jail's scratch directory must be absolute, not / or /dev: {self.scratch!r}")
        for name, value in (("uid", self.uid), ("gid", self.gid)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32 - 1
            ):
                raise JailError(f"jail {name} must be a number from 0 to 4294967294, not {value!r}")
        if (self.uid is None) != (self.gid is None):
            raise JailError("give both a jail uid and a jail gid, or neither")
        devices = [*DEVICES, *([KVM] if self.kvm else []), *([TUN] if self.tap else [])]
        for device in devices:
            if not os.path.exists(device):
                raise JailError(f"the jail needs {device}, which this host lacks")

    @property
    def devices(self) -> list[str]:
        return [*DEVICES, *([KVM] if self.kvm else []), *([TUN] if self.tap else [])]

    @property
    def namespaces(self) -> int:
        """The unshare(2) flags: no network namespace of its own with a TAP device (the TAP is the host's)."""
        flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC
        return flags if self.tap else flags | CLONE_NEWNET


_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _check(result: int, what: str) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def enc(text: str | None) -> bytes | None:
        return None if text is None else text.encode()

    _check(_c().mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def _prctl(option: int, arg: int = 0, arg3: int = 0) -> None:
    _check(
        _c().prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(arg3), ctypes.c_ulong(0), ctypes.c_ulong(0)),
        f"prctl({option})",
    )


def has_sys_admin() -> bool:
    """CAP_SYS_ADMIN in this process's effective set: what namespaces and mounts need."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except OSError:
        pass
    return os.geteuid() == 0


def check_possible() -> None:
    """JailError unless this process can set up a jail (root: CAP_SYS_ADMIN), and libseccomp loads."""
    if not sys.platform.startswith("linux"):
        raise JailError("--jail needs Linux")
    if not has_sys_admin():
        raise JailError("--jail needs root (CAP_SYS_ADMIN, to make namespaces and mounts)")
    try:
        import pyseccomp  # noqa: F401
    except (ImportError, OSError) as exc:
        raise JailError(f"--jail needs libseccomp (pip pyseccomp, apt libseccomp2): {exc}") from exc


def build_filter(tap: bool = False) -> Any:
    """The seccomp filter (a pyseccomp.SyscallFilter, not yet loaded): EPERM for every call not allowed."""
    import pyseccomp as sc

    filt = sc.SyscallFilter(sc.ERRNO(errno.EPERM))
    for name in dict.fromkeys(ALLOWED):
        filt.add_rule(sc.ALLOW, name)
    import socket as _socket

    filt.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.EQ, _socket.AF_UNIX))
    # threads only: clone with CLONE_THREAD; fork (clone without it) is EPERM. clone3's flags live in memory a
    # filter cannot read, so it answers ENOSYS, on which glibc's pthread_create falls back to clone.
    filt.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
    filt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    # ioctl by the request's type byte: KVM's (0xAE) and 'T' (terminals, TUNSETIFF, FIONBIO/FIOCLEX); no other
    # driver's (no block-device, socket-config or SCSI ioctls). tap=True needs no more: TUNSETIFF is a 'T' ioctl.
    for kind in IOCTL_TYPES:
        filt.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.MASKED_EQ, ioctl.IOC_TYPE_MASK, ioctl.type_field(kind)))
    filt.set_attr(sc.Attr.CTL_TSYNC, 1)
    return filt


SKIPPED_MODULES = ("popek.__main__", "popek.daemon.app", "popek.daemon.server", "popek.daemon.client")


def preload(extra: Sequence[str] = ()) -> None:
    """Import what the VMM process may need before the pivot: after it the interpreter finds no module files.
    That is every popek module (they import on first use inside functions too) but the daemon's server side,
    and the stdlib modules those import lazily."""
    import pkgutil

    import popek

    names = [info.name for info in pkgutil.walk_packages(popek.__path__, "popek.")]
    names += ["asyncio", "asyncio.unix_events", "json", "concurrent.futures.thread", "encodings.idna", "iced_x86"]
    for name in [*names, *extra]:
        if name not in SKIPPED_MODULES:
            importlib.import_module(name)


def _capset_zero() -> None:
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header = Header(LINUX_CAPABILITY_VERSION_3, 0)
    data = (Data * 2)()
    _check(_c().capset(ctypes.byref(header), data), "capset")


def _drop_privileges(spec: JailSpec, last_cap: int) -> None:
    """uid/gid if given, then no capability in any set, then no_new_privs."""
    for cap in range(last_cap + 1):  # first: dropping from the bounding set needs CAP_SETPCAP, gone after setuid
        if _c().prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) < 0 and ctypes.get_errno() != errno.EINVAL:
            raise JailError(f"cannot drop capability {cap}: {os.strerror(ctypes.get_errno())}")
    if spec.gid is not None and spec.uid is not None:
        os.setgroups([])
        os.setresgid(spec.gid, spec.gid, spec.gid)
        os.setresuid(spec.uid, spec.uid, spec.uid)
    _c().prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0)
    _capset_zero()
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def _make_target(target: str, is_dir: bool) -> None:
    if is_dir:
        os.makedirs(target, exist_ok=True)
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if not os.path.lexists(target):
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY, 0o600))


def _bind(fd: int, target: str, writable: bool, device: bool) -> None:
    """Bind what fd names (an O_PATH fd, through /proc/self/fd: the source may lie under NEW_ROOT) at target."""
    _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NOEXEC | (0 if device else MS_NODEV) | (0 if writable else MS_RDONLY)
    _mount(None, target, None, flags)


def _build_root(spec: JailSpec) -> None:
    """In the new mount namespace: a tmpfs root with exactly the binds and devices, pivoted into; old root gone."""
    sources: list[tuple[int, str, bool, bool, bool]] = []  # fd, path, is_dir, writable, device
    for bind in sorted(spec.binds, key=lambda b: len(b.path.parts)):
        path = os.path.realpath(bind.path)
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        mode = os.fstat(fd).st_mode
        node = stat.S_ISBLK(mode) or stat.S_ISCHR(mode)
        sources.append((fd, str(bind.path), stat.S_ISDIR(mode), bind.writable, node))
    for name in spec.devices:
        fd = os.open(name, os.O_PATH | os.O_CLOEXEC)
        sources.append((fd, name, False, True, True))
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", NEW_ROOT, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=1m")
    try:
        for fd, path, is_dir, writable, device in sources:
            target = NEW_ROOT + path
            _make_target(target, is_dir)
            _bind(fd, target, writable, device)
            os.close(fd)
        if spec.scratch is not None:
            os.makedirs(NEW_ROOT + spec.scratch, exist_ok=True)
            _mount("tmpfs", NEW_ROOT + spec.scratch, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, SCRATCH_OPTIONS)
            if spec.uid is not None and spec.gid is not None:
                os.chown(NEW_ROOT + spec.scratch, spec.uid, spec.gid)
        if spec.proc:
            os.makedirs(NEW_ROOT + "/proc", exist_ok=True)
            _mount("proc", NEW_ROOT + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        os.chdir(NEW_ROOT)
        _check(_c().syscall(SYS_PIVOT_ROOT, b".", b"."), "pivot_root")  # the old root stacks under the new one
        _check(_c().umount2(b".", MNT_DETACH), "umount the host's root")
        os.chdir("/")
        _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except (OSError, JailError) as exc:
        _c().umount2(NEW_ROOT.encode(), MNT_DETACH)  # the parent shares this namespace: give it back its /tmp
        raise JailError(f"cannot build the jail's root: {exc}") from exc


def _unshare(flags: int) -> None:
    unshare = getattr(os, "unshare", None)  # Python 3.12+
    if unshare is not None:
        try:
            unshare(flags)
        except OSError as exc:
            raise JailError(f"cannot make the jail's namespaces: {exc.strerror}") from exc
        return
    _check(_c().unshare(ctypes.c_int(flags)), "cannot make the jail's namespaces (unshare)")


def _wait_and_follow(child: int, filt: Any, spec: JailSpec, last_cap: int) -> NoReturn:
    """The parent: forward signals, confine itself, wait, and end as the child ended. The child, PID 1 of its
    namespace, cannot die by a signal it sent or was forwarded (the kernel spares init), so it exits 128 + N for a
    forwarded signal N (_exit_on_signal), and the parent then ends by signal N itself."""
    forwarded: set[int] = set()

    def forward(signum: int, _frame: object) -> None:
        forwarded.add(signum)
        os.kill(child, signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    try:
        _drop_privileges(JailSpec(uid=spec.uid, gid=spec.gid), last_cap)
        filt.load()
    except (JailError, OSError):
        os.kill(child, signal.SIGKILL)
        os._exit(125)
    while True:
        try:
            _, status = os.waitpid(child, 0)
        except ChildProcessError:
            os._exit(125)
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) - 128 not in forwarded:
            os._exit(os.WEXITSTATUS(status))
        if os.WIFSIGNALED(status) or os.WIFEXITED(status):
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status) - 128
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
            os.kill(os.getpid(), sig)
            os._exit(128 + sig)


def enter(spec: JailSpec) -> None:
    """Confine this process (see the module): returns in the confined child; the parent never returns (it ends
    as the child ends). JailError if the jail cannot be made; the caller is then still unconfined."""
    check_possible()
    spec.validate()
    if threading.active_count() > 1:
        raise JailError("the jail is entered before any thread starts")
    filt = build_filter(spec.tap)
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    _unshare(spec.namespaces)
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir("/")  # the pivot moves a process in this namespace whose cwd is the old root: the parent, too
    read_end, write_end = os.pipe()
    child = os.fork()
    if child:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            answer = pipe.read()  # b"1" once the child is confined; else its error (and it ends)
        if answer != b"1":
            os.waitpid(child, 0)
            raise JailError(answer.decode(errors="replace") or "the jail's process ended while it was set up")
        _wait_and_follow(child, filt, spec, last_cap)
    os.close(read_end)
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        _build_root(spec)
        _drop_privileges(spec, last_cap)
        filt.load()
    except (JailError, OSError) as exc:
        os.write(write_end, str(exc).encode()[:4000] or b"?")
        os._exit(125)
    for signum in FORWARDED:
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, _exit_on_signal)
    os.write(write_end, b"1")
    os.close(write_end)


def _exit_on_signal(signum: int, _frame: object) -> None:
    """PID 1's stand-in for a signal's default action (init ignores what it has no handler for): exit 128 + N,
    unwinding (finally blocks and context managers run, so the VM is closed)."""
    raise SystemExit(128 + signum)


PASST_REFUSED = (
    "--jail cannot use --net passt: passt is a helper program the VMM would have to execute, which the jail "
    "forbids; use --net tap:NAME (set up as root beforehand) or no network"
)


def confine_vm(
    *,
    workdir: str | os.PathLike[str] | None,
    kernel: str | os.PathLike[str] | None,
    initrd: str | os.PathLike[str] | None,
    disks: Iterable[Any] = (),
    net: Any = None,
    accel: str = "kvm",
    uid: int | None = None,
    gid: int | None = None,
    readonly: Iterable[str | os.PathLike[str]] = (),
    scratch: str | None = None,
) -> None:
    """Confine this process to run one VM: `disks` are DiskSpecs (bound read-only where the VM reads them only),
    `net` a NetSpec or None (passt is refused: PASST_REFUSED; a TAP keeps the host's network namespace), and
    `workdir` the VM's own read-write directory, also the process's tempfile directory (the runtime directory
    popek.VM makes goes there, not to the host's /tmp, which the jail lacks); or, without one, `scratch`: a
    fresh tmpfs in the jail, the tempfile directory then, leaving nothing behind on the host. Returns in the
    confined process."""
    import tempfile

    if net is not None and getattr(net, "backend", None) == "passt":
        raise JailError(PASST_REFUSED)
    check_possible()
    spec = JailSpec.for_vm(
        workdir=workdir,
        kernel=kernel,
        initrd=initrd,
        disks=[(disk.path, not disk.read_only) for disk in disks],
        readonly=readonly,
        kvm=accel != "soft",
        tap=net is not None,
        uid=uid,
        gid=gid,
    )
    spec.scratch = scratch
    spec.validate()
    preload()
    enter(spec)
    # only in the confined process: a jail that could not be entered leaves this process's tempfiles as they were
    tempfile.tempdir = scratch if workdir is None else os.fspath(workdir)
