"""Kconfig ``.config`` files and fragments (the format of scripts/kconfig: ``CONFIG_X=value`` lines, with
``# CONFIG_X is not set`` for a bool or tristate that is off), and the check that a fragment survived a merge.

Kconfig drops an option it cannot honour without a word (a dependency is off, a choice forbids it), and
``merge_config.sh`` only warns in a sea of output; popek's guest relies on every option of its fragment, so the
build fails by name on any option that did not come out as asked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_NOT_SET = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set$")

OFF = "n"


def parse(text: str) -> dict[str, str]:
    """Option -> value as written (strings keep their quotes); an option that is "not set" maps to "n"."""
    options: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if match := _SET.match(line):
            options[match[1]] = match[2]
        elif match := _NOT_SET.match(line):
            options[match[1]] = OFF
    return options


@dataclass(frozen=True)
class Mismatch:
    option: str
    wanted: str
    got: str | None  # None: the option is absent from the .config

    def __str__(self) -> str:
        if self.got is None:
            got = "absent"
        elif self.got == OFF:
            got = "not set"
        else:
            got = f"={self.got}"
        return f"{self.option} (asked ={self.wanted}, got {got})"


def verify(fragment: str, config: str) -> list[Mismatch]:
    """The options of fragment that config does not have with the asked value, in fragment order.

    ``=n`` is satisfied both by ``# CONFIG_X is not set`` and by the option's absence (an option whose
    dependencies are off is not written at all, and is off all the same).
    """
    have = parse(config)
    mismatches = []
    for option, wanted in parse(fragment).items():
        got = have.get(option)
        if wanted == OFF:
            if got not in (None, OFF):
                mismatches.append(Mismatch(option, wanted, got))
        elif got != wanted:
            mismatches.append(Mismatch(option, wanted, got))
    return mismatches
