"""The guest agent's errors, each named for its cause; all are PopekErrors, so the CLI reports them in one line."""

from __future__ import annotations

from typing import TYPE_CHECKING

from popek.errors import PopekError

if TYPE_CHECKING:
    from popek.agent.client import ExecResult


class AgentError(PopekError):
    """Base of everything popek.agent raises."""


class AgentUnavailable(AgentError):
    """The agent cannot be reached: no connection, no answer within the client's timeout, or it is busy."""


class AgentDisconnected(AgentError):
    """The connection ended in the middle of an operation."""


class ProtocolError(AgentError):
    """A frame that breaks docs/agent-protocol.md (malformed, oversized, unexpected), or another major version."""


class InvalidRequest(AgentError):
    """A request the protocol cannot carry (a NUL byte in a string, a count or length over a limit)."""


class RemoteError(AgentError):
    """The agent answered ERROR: ``kind`` (protocol.ErrorKind), ``errno`` (Linux's, 0 if none), its message."""

    def __init__(self, message: str, *, kind: int, errno: int) -> None:
        super().__init__(message)
        self.kind = kind
        self.errno = errno


class RemoteFileError(RemoteError):
    """A file operation failed in the guest; ``path`` is the path asked for, ``errno`` says why."""

    def __init__(self, message: str, *, kind: int, errno: int, path: bytes) -> None:
        super().__init__(message, kind=kind, errno=errno)
        self.path = path


class CommandStartError(RemoteError):
    """The command could not be started (its working directory or program is missing, not executable...)."""


class CommandTimeout(AgentError):
    """The command's timeout fired (exec with check=True), or Process.wait's own timeout expired (the command
    then keeps running). ``result`` is what is known: the ExecResult, or None while the command runs."""

    def __init__(self, message: str, result: ExecResult | None = None) -> None:
        super().__init__(message)
        self.result = result


class CommandFailed(AgentError):
    """The command exited with a non-zero status or was killed (exec with check=True); ``result`` has it all."""

    def __init__(self, message: str, result: ExecResult) -> None:
        super().__init__(message)
        self.result = result


class UnreadOutput(AgentError):
    """Process.write would wait forever: the agent waits for the host to read output before it takes more stdin,
    and the output buffered on the host side is at its limit. Read the process's output first."""
