"""popek's guest agent: the protocol (docs/agent-protocol.md), the host's client, and the agent's C source.

``AgentClient`` runs commands and moves files in a guest whose agent it reaches through a connector
(``vsock_unix_connector`` for a VM's vsock device; ``unix_connector`` / ``tcp_connector`` for an agent run on the
host, as the tests do). ``binary.compile_command`` is how the agent is built, for the default guest and the tests.
"""

from popek.agent.client import (
    AgentClient,
    Connector,
    ExecResult,
    FileInfo,
    Files,
    Process,
    tcp_connector,
    unix_connector,
    vsock_connector,
    vsock_unix_connector,
)
from popek.agent.errors import (
    AgentDisconnected,
    AgentError,
    AgentUnavailable,
    CommandFailed,
    CommandStartError,
    CommandTimeout,
    InvalidRequest,
    ProtocolError,
    RemoteError,
    RemoteFileError,
    UnreadOutput,
)

__all__ = [
    "AgentClient",
    "AgentDisconnected",
    "AgentError",
    "AgentUnavailable",
    "CommandFailed",
    "CommandStartError",
    "CommandTimeout",
    "Connector",
    "ExecResult",
    "FileInfo",
    "Files",
    "InvalidRequest",
    "Process",
    "ProtocolError",
    "RemoteError",
    "RemoteFileError",
    "UnreadOutput",
    "tcp_connector",
    "unix_connector",
    "vsock_connector",
    "vsock_unix_connector",
]
