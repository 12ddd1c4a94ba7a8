"""kvm-unit-tests, the x86 conformance suite KVM and QEMU developers run, on popek's two backends and QEMU TCG in
one run, entry by entry, as upstream's `run_tests.sh` runs them.

    python3 benchmarks/conformance.py [--suite DIR] [--backends kvm,soft,tcg] [--entries NAME,...] [--jobs N]
                                      [--logs DIR] [--markdown FILE] [--json FILE]

For every entry of `x86/unittests.cfg` (its `file`, `smp`, `test_args`/`extra_params`, `qemu_params`, `groups`,
`arch`, `accel`, `check` and `timeout` keys; upstream's scripts/common.bash and scripts/runtime.bash say what each
means) and every backend:
- the entry is skipped, with upstream's reason, where upstream would skip it: another `arch` (the images here are
  x86_64), the `nodefault` group, an `accel` that is not the backend's (popek `--accel kvm` counts as kvm, popek
  `--accel soft` and QEMU TCG as tcg), a `check` file on this host that does not hold the value;
- otherwise the guest boots from the image with the command line `test_args` (the Multiboot loader puts the
  image's file name first, as QEMU's does: the suite takes it as argv[0]), the environment file as the first
  Multiboot module (`-initrd`), `smp` vCPUs, the memory `qemu_params` asks for (QEMU's default, 128 MiB,
  otherwise) and the entry's timeout (90 s by default). QEMU gets upstream's exact command line (x86/run);
- the verdict comes from the exit status, as upstream's scripts read it: the suite writes its status s to the
  debug-exit port, so the VMM exits with (s << 1) | 1: 1 is a pass, 77 a skip (s = 38, "every test skipped"),
  anything else a failure; a timeout is a failure. The `SUMMARY:` line of the serial log is shown beside it.

A Python traceback in popek's stderr is reported on its own (it is a popek bug whatever the verdict). The logs of
every run go to `--logs` (default: a temporary directory, printed). `--markdown` writes the table and totals as
docs/conformance.md records them; `--json` the raw results, for tests/integration/test_conformance.py's subset.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import configparser
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
# the project's shared/ folder beside the checkout (as on the project's machines and in CI), else /work/shared
DEFAULT_SUITE = next(
    (
        p / "kvm-unit-tests"
        for p in (CHECKOUT.parent / "shared", Path("/work/shared"))
        if (p / "kvm-unit-tests").is_dir()
    ),
    CHECKOUT.parent / "shared" / "kvm-unit-tests",
)
DEFAULT_TIMEOUT = 90.0
QEMU_DEFAULT_MEM_MIB = 128  # what QEMU's pc machine gives a guest without -m (upstream passes none)
BACKENDS = ("kvm", "soft", "tcg")
BACKEND_TITLES = {"kvm": "popek --accel kvm", "soft": "popek --accel soft", "tcg": "QEMU 7.2 TCG"}
BACKEND_ACCEL = {"kvm": "kvm", "soft": "tcg", "tcg": "tcg"}  # what an entry's `accel` key is compared with
EXIT_PASS, EXIT_SKIP, EXIT_TIMEOUT = 1, 77, 124
GRACE = 30.0  # seconds past the entry's own timeout before the runner kills a VMM that ignored it

# What an entry needs that popek does not offer its guests, for the table's reason column. An entry listed here is
# still run: the reason explains its verdict, it does not replace it.
NOT_OFFERED = {
    "svm": "nested SVM (popek offers no virtualization extensions to its guests)",
    "vmx": "nested VMX (popek offers no virtualization extensions to its guests)",
    "hyperv": "Hyper-V enlightenments and the hyperv-testdev device",
    "intel_iommu": "the q35 machine, an Intel IOMMU and the PCI edu device",
    "pmu": "a virtual PMU",
    "vmware_backdoors": "the VMware backdoor port",
    "cet": "CET (shadow stacks, IBT)",
    "lam": "linear address masking (an Intel feature)",
    "pks": "protection keys for supervisor pages (an Intel feature)",
    "tsx-ctrl": "TSX and its control MSR",
}


@dataclass
class Entry:
    """One `[section]` of unittests.cfg, with upstream's defaults applied."""

    name: str
    file: str
    smp: int = 1
    test_args_text: str = ""  # as the cfg writes it: upstream's run_tests.sh evaluates it when the entry runs
    qemu_params: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    arch: str = ""
    accel: str = ""
    check: list[str] = field(default_factory=list)
    timeout: float = DEFAULT_TIMEOUT

    @property
    def mem_mib(self) -> int:
        """The guest memory `qemu_params` asks for (-m N, in MiB, or with a K/M/G suffix), else QEMU's default."""
        params = self.qemu_params
        for i, p in enumerate(params[:-1]):
            if p == "-m":
                m = re.fullmatch(r"(\d+)([KMG]?)", params[i + 1], re.IGNORECASE)
                if m:
                    n, unit = int(m.group(1)), m.group(2).upper()
                    return {"": n, "M": n, "K": n // 1024, "G": n * 1024}[unit]
        return QEMU_DEFAULT_MEM_MIB

    @property
    def test_args(self) -> list[str]:
        """The command-line words, evaluated now, as upstream's `eval` does just before it starts QEMU: a backtick
        `date +%s` (kvmclock_test's wall-clock reference) must be the time the entry starts, not the time the
        cfg was read, or a long run's later entries see a clock that drifted by the whole run."""
        return shell_words(self.test_args_text)

    def not_offered(self) -> str:
        for key, reason in NOT_OFFERED.items():
            if self.name.startswith(key) or key in self.groups or self.file.startswith(key):
                return reason
        return ""


def shell_words(text: str) -> list[str]:
    """Split a cfg value as upstream's `eval` does: quotes removed, backticks (`date +%s`) run by the shell."""
    if not text.strip():
        return []
    if "`" in text or "$" in text:
        out = subprocess.run(["sh", "-c", f"for w in {text}; do printf '%s\\n' \"$w\"; done"],
                             capture_output=True, text=True, check=True)  # fmt: skip
        return out.stdout.splitlines()
    return shlex.split(text)


def parse_config(path: Path) -> list[Entry]:
    cfg = configparser.ConfigParser(interpolation=None, strict=False, comment_prefixes=("#",))
    cfg.read(path)
    entries = []
    for name in cfg.sections():
        sec = cfg[name]
        timeout = sec.get("timeout", "").strip().rstrip("s")
        entries.append(
            Entry(
                name=name,
                file=sec["file"].strip(),
                smp=int(sec.get("smp", "1").strip()),
                test_args_text=sec.get("test_args", sec.get("extra_params", "")),
                qemu_params=shell_words(sec.get("qemu_params", "")),
                groups=sec.get("groups", "").split(),
                arch=sec.get("arch", "").strip(),
                accel=sec.get("accel", "").strip(),
                check=sec.get("check", "").split(),
                timeout=float(timeout) if timeout else DEFAULT_TIMEOUT,
            )
        )
    return entries


def skip_reason(entry: Entry, backend: str) -> str:
    """Why upstream's run_tests.sh would not run `entry` under `backend` (empty if it would)."""
    if entry.arch and entry.arch != "x86_64":
        return f"{entry.arch} only"
    if "nodefault" in entry.groups:
        return "test marked as manual run only"
    accel = BACKEND_ACCEL[backend]
    if entry.accel and entry.accel != accel:
        return f"{entry.accel} only, but ACCEL={accel}"
    for param in entry.check:
        path, _, value = param.partition("=")
        try:
            actual = Path(path).read_text().strip()
        except OSError:
            actual = None
        if actual != value:
            return f"{path} not equal to {value}"
    return ""


@dataclass
class Result:
    entry: str
    backend: str
    verdict: str  # PASS, FAIL, SKIP
    status: int | None = None
    seconds: float = 0.0
    summary: str = ""
    reason: str = ""  # why it was skipped without running, or what the failure looked like
    traceback: bool = False
    log: str = ""


def environment_file(backend: str) -> str:
    """What upstream's initrd_create writes (scripts/arch-run.bash env_params, env_errata), for this host."""
    release = platform.release()
    version, patchlevel, *_ = ([*re.findall(r"\d+", release), "0", "0"])[:2]
    lines = [f"TARGET={'qemu' if backend == 'tcg' else 'popek'}"]
    if backend == "tcg":
        lines += ["QEMU_ACCEL=tcg"]
    lines += [f"KERNEL_VERSION_STRING={release}", f"KERNEL_VERSION={version}", f"KERNEL_PATCHLEVEL={patchlevel}"]
    if BACKEND_ACCEL[backend] == "tcg":
        lines.append("ERRATA_FORCE=y")  # upstream: under TCG, every erratum counts as fixed
    return "\n".join(lines) + "\n"


def command(entry: Entry, backend: str, env_file: Path, popek: list[str]) -> list[str]:
    kernel = f"x86/{entry.file}"  # relative to the suite directory, the runner's cwd, as upstream runs it
    if backend == "tcg":
        return ["qemu-system-x86_64", "--no-reboot", "-nodefaults", "-global", "kvm-pit.lost_tick_policy=discard",
                "-device", "pc-testdev", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x4", "-display", "none",
                "-serial", "stdio", "-device", "pci-testdev", "-machine", "accel=tcg", "-kernel", kernel,
                "-smp", str(entry.smp), *entry.qemu_params, "-append", " ".join(entry.test_args),
                "-initrd", str(env_file)]  # fmt: skip
    return [*popek, "run", "--kernel", kernel, "--accel", backend, "--cpus", str(entry.smp),
            "--mem", f"{entry.mem_mib}M", "--timeout", f"{entry.timeout:g}", "--append", " ".join(entry.test_args),
            "--initrd", str(env_file), "--pc-testdev"]  # fmt: skip


def checkout_environment() -> dict[str, str]:
    """The environment popek runs in: from the suite's directory, it must still import this checkout's popek."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(CHECKOUT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_one(entry: Entry, backend: str, suite: Path, logs: Path, popek: list[str] | None = None) -> Result:
    """Run `entry` on `backend` (kvm, soft or tcg) as upstream would; its serial log goes to `logs`."""
    popek = popek or [sys.executable, "-m", "popek"]
    reason = skip_reason(entry, backend)
    if reason:
        return Result(entry.name, backend, "SKIP", reason=reason)
    if not (suite / "x86" / entry.file).is_file():
        return Result(entry.name, backend, "SKIP", reason=f"Test file 'x86/{entry.file}' not found")
    log = logs / f"{entry.name}.{backend}.log"
    with tempfile.NamedTemporaryFile("w", prefix="kut-env-", suffix=".txt", delete=False) as f:
        f.write(environment_file(backend))
        env_file = Path(f.name)
    argv = command(entry, backend, env_file, popek)
    start = time.monotonic()
    timed_out = False
    try:
        with log.open("wb") as out:
            out.write(("$ " + shlex.join(argv) + "\n").encode())
            out.flush()
            proc = subprocess.Popen(
                argv,
                cwd=suite,
                env=checkout_environment(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            try:
                # QEMU has no timeout of its own: upstream wraps it in `timeout`; popek's --timeout ends it itself
                _, err = proc.communicate(timeout=entry.timeout + (GRACE if backend != "tcg" else 0))
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, 9)
                _, err = proc.communicate()
            out.write(b"\n--- stderr ---\n" + err)
    finally:
        env_file.unlink(missing_ok=True)
    seconds = time.monotonic() - start
    status = EXIT_TIMEOUT if timed_out else proc.returncode
    text = log.read_bytes().decode(errors="replace")
    summaries = re.findall(r"^SUMMARY: (.*?)\r?$", text, re.MULTILINE)
    summary = summaries[-1] if summaries else ""
    errtext = err.decode(errors="replace")
    traceback = backend != "tcg" and "Traceback (most recent call last)" in errtext
    qemu_errors = [ln for ln in errtext.splitlines() if backend == "tcg" and ln and "warning" not in ln.lower()]
    if qemu_errors and not re.search(r"^(PASS|FAIL|SKIP|SUMMARY):", text, re.MULTILINE):
        # QEMU refused the entry's options before the guest ran: upstream's premature_failure, a SKIP that does
        # not count as run
        why = qemu_errors[-1][:160]
        return Result(entry.name, backend, "SKIP", None, round(seconds, 1), "", why, False, str(log))
    if status == EXIT_PASS and not qemu_errors:
        verdict, why = "PASS", ""
    elif status == EXIT_SKIP:
        verdict, why = "SKIP", "the suite skipped every test"
    else:
        verdict = "FAIL"
        why = f"timeout ({entry.timeout:g} s)" if status == EXIT_TIMEOUT else f"exit status {status}"
        stopped = re.findall(r"^popek: (?:VM stopped|error): (.*)$", err.decode(errors="replace"), re.MULTILINE)
        if stopped and status != EXIT_TIMEOUT:
            why += f": {stopped[-1][:160]}"
    return Result(entry.name, backend, verdict, status, round(seconds, 1), summary, why, traceback, str(log))


def cell(r: Result | None) -> str:
    if r is None:
        return ""
    text = r.verdict
    if r.summary:
        text += f" ({r.summary})"
    elif r.reason:
        text += f" ({r.reason})"
    if r.traceback:
        text += " TRACEBACK"
    return text.replace("|", "/")


def table(entries: list[Entry], backends: list[str], results: dict[tuple[str, str], Result]) -> str:
    head = ["entry", *(BACKEND_TITLES[b] for b in backends), "popek lacks"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        cells = [cell(results.get((e.name, b))) for b in backends]
        rows.append("| " + " | ".join([e.name, *cells, e.not_offered()]) + " |")
    return "\n".join(rows)


def totals(entries: list[Entry], backends: list[str], results: dict[tuple[str, str], Result]) -> str:
    lines = []
    for b in backends:
        rs = [results[(e.name, b)] for e in entries if (e.name, b) in results]
        ran = [r for r in rs if r.status is not None]
        count = {v: sum(r.verdict == v for r in ran) for v in ("PASS", "FAIL", "SKIP")}
        timeouts = sum(r.status == EXIT_TIMEOUT for r in ran)
        tracebacks = sum(r.traceback for r in ran)
        lines.append(
            f"{BACKEND_TITLES[b]}: {count['PASS']} pass, {count['FAIL']} fail ({timeouts} timeouts), "
            f"{count['SKIP']} skip of {len(ran)} entries run; {len(rs) - len(ran)} not run (upstream skips them)"
            + (f"; {tracebacks} Python tracebacks" if tracebacks else "")
            + f"; {sum(r.seconds for r in ran):.0f} s"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--suite", type=Path, default=DEFAULT_SUITE, help="the built kvm-unit-tests (with x86/*.flat)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: kvm, soft, tcg")
    p.add_argument("--entries", default="", help="comma-separated entry names (default: all)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="entries run at once (default: CPUs)")
    p.add_argument("--logs", type=Path, default=None, help="directory for the serial logs")
    p.add_argument("--markdown", type=Path, default=None, help="write the table and totals to this file")
    p.add_argument("--json", type=Path, default=None, help="write the raw results to this file")
    p.add_argument("--popek", default=f"{shlex.quote(sys.executable)} -m popek", help="how to start popek")
    args = p.parse_args(argv)

    suite = args.suite.resolve()
    entries = parse_config(suite / "x86" / "unittests.cfg")
    if args.entries:
        wanted = args.entries.split(",")
        unknown = sorted(set(wanted) - {e.name for e in entries})
        if unknown:
            p.error(f"no such entries: {', '.join(unknown)}")
        entries = [e for e in entries if e.name in wanted]
    backends = [b for b in args.backends.split(",") if b]
    if set(backends) - set(BACKENDS):
        p.error(f"backends are {', '.join(BACKENDS)}")
    if "tcg" in backends and shutil.which("qemu-system-x86_64") is None:
        p.error("qemu-system-x86_64 is not installed (Debian: qemu-system-x86)")
    logs = args.logs or Path(tempfile.mkdtemp(prefix="kut-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    popek = shlex.split(args.popek)
    print(f"kvm-unit-tests in {suite}; logs in {logs}; {len(entries)} entries x {len(backends)} backends", flush=True)

    results: dict[tuple[str, str], Result] = {}
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(run_one, e, b, suite, logs, popek): (e, b) for e in entries for b in backends}
        for fut in concurrent.futures.as_completed(futures):
            e, b = futures[fut]
            r = fut.result()
            results[(e.name, b)] = r
            if r.status is not None:
                print(f"{r.verdict:4} {e.name:<28} {BACKEND_TITLES[b]:<20} {r.seconds:6.1f} s  {cell(r)}", flush=True)
    elapsed = time.monotonic() - started

    out = table(entries, backends, results) + "\n\n" + totals(entries, backends, results)
    print("\n" + out + f"\n\nwall time {elapsed:.0f} s", flush=True)
    if args.markdown:
        args.markdown.write_text(out + "\n")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results.values()], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
