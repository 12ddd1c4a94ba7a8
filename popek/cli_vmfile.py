"""The VM file's verbs on the command line: `popek up [NAME...]`, status, ssh NAME [-- CMD], provision, sync,
halt, suspend, resume, destroy [-f] (popek/daemon/project.py does them, through the daemon).

The file is popek.toml in the current directory or the nearest parent (`-f/--file FILE` names another); every
verb takes machine names (all of the file's machines when none is given, except ssh, which takes one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from popek.errors import ConfigError

COMMANDS = ("up", "status", "ssh", "provision", "sync", "halt", "suspend", "resume", "destroy")
_HELP = {
    "up": "boot (or resume) the file's machines, sync their folders, provision them the first time",
    "status": "the file's machines: not created, running, suspended, halted, crashed",
    "ssh": "a shell in a machine (a pty through its agent), or one command: popek ssh NAME -- CMD...",
    "provision": "run a machine's provisioning steps again",
    "sync": "copy a machine's synced folder into it again",
    "halt": "shut a machine down (its next up boots it)",
    "suspend": "snapshot a machine into .popek/NAME/snapshot and stop it",
    "resume": "restore a suspended machine",
    "destroy": "stop and delete a machine and its .popek/ state",
}


def add_parsers(sub: Any, with_socket: Any) -> None:
    """The verbs' subparsers; `with_socket` adds the daemon's --socket option (popek.cli)."""
    for verb in COMMANDS:
        parser = with_socket(sub.add_parser(verb, help=_HELP[verb]))
        # destroy's -f is Vagrant's --force; the file is then named with --file
        file_flags = ["--file"] if verb == "destroy" else ["-f", "--file"]
        parser.add_argument(
            *file_flags, type=Path, default=None, help="the VM file (default: popek.toml here or above)"
        )
        if verb == "ssh":
            parser.add_argument("machine", help="the machine")
            parser.add_argument("vm_command", nargs=argparse.REMAINDER, help="-- COMMAND...: run it instead of a shell")
        else:
            parser.add_argument("machines", nargs="*", metavar="NAME", help="machines (default: all of the file's)")
        if verb == "up":
            group = parser.add_mutually_exclusive_group()
            group.add_argument("--provision", dest="provision", action="store_true", default=None)
            group.add_argument("--no-provision", dest="provision", action="store_false")
        if verb in ("up", "resume"):
            parser.add_argument(
                "--boot-timeout", type=float, default=600.0, help="how long a guest's agent may take to answer (s)"
            )
        if verb == "destroy":
            parser.add_argument("-f", "--force", action="store_true", help="do not ask")


def run(args: argparse.Namespace) -> int:
    from popek.daemon import vmfile
    from popek.daemon.client import Client
    from popek.daemon.project import Project

    if getattr(args, "boot_timeout", 1.0) <= 0:
        raise ConfigError(f"--boot-timeout {args.boot_timeout:g}: a number of seconds above 0")
    file = args.file if args.file is not None else vmfile.find()
    if not file.is_file():
        raise ConfigError(f"{file}: no such file")
    with Client(args.socket) as client:
        project = Project(file, client, boot_timeout=getattr(args, "boot_timeout", 600.0))
        if args.command == "ssh":
            project.names([args.machine])
            command = list(args.vm_command)
            if command and command[0] == "--":
                command = command[1:]
            return project.ssh(args.machine, command, args.socket)
        names = project.names(args.machines)
        if args.command == "status":
            _print_status(project.rows())
            return 0
        if args.command == "destroy" and not args.force:
            if not sys.stdin.isatty():
                raise ConfigError("popek destroy: give -f to destroy without being asked (stdin is no terminal)")
            answer = input(f"destroy {', '.join(names)} (VM and .popek/ state)? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("not destroyed", file=sys.stderr)
                return 1
        if args.command == "up":
            project.up(names, args.provision)
            return 0
        for name in names:
            if args.command == "provision":
                project.provision(name)
            elif args.command == "sync":
                project.sync(name)
            else:
                getattr(project, args.command)(name)
    return 0


def _print_status(rows: list[dict[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("NAME", "STATE", "PROVISIONED", "VM"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["name"], row["state"], row["provisioned"], row["vm"])
    Console(width=160).print(table)
