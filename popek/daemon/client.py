"""``popek.Client``: the daemon's REST API from Python (docs/daemon.md), with popek.VM's interface where it fits.

::

    client = popek.Client()                      # the default socket (popek.daemon.server.default_socket)
    vm = client.create(name="web", cpus=1, mem="512M")
    vm.wait_ready()
    r = vm.exec(["uname", "-a"])                 # a popek.agent.ExecResult, as popek.VM.exec returns
    vm.files.write("/tmp/x", b"hi"); vm.files.read("/tmp/x")
    vm.delete()

httpx over the daemon's Unix socket (``httpx.HTTPTransport(uds=...)``). Every failure is a PopekError:
``DaemonUnavailable`` (no daemon listens: the message says how to start one), ``ApiError`` (the daemon's answer,
its HTTP status and the field it names); exec(check=True) raises popek.agent's CommandFailed / CommandTimeout.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from popek.agent import ExecResult, FileInfo
from popek.errors import PopekError

DEFAULT_TIMEOUT = 120.0
BASE_URL = "http://popek"  # the host part means nothing on a Unix socket


class DaemonUnavailable(PopekError):
    """No popek daemon answers on the socket."""


class ApiError(PopekError):
    """The daemon refused a request: ``status`` (HTTP), ``field`` (the request's field it names, if any)."""

    def __init__(self, message: str, status: int, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = json.loads(response.read())
        message, field = str(body.get("error", body)), body.get("field")
    except (ValueError, AttributeError):
        message, field = response.text[:200] or response.reason_phrase, None
    raise ApiError(f"{message} (HTTP {response.status_code})", response.status_code, field)


class Client:
    """A connection to a popek daemon on a Unix socket."""

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        from popek.daemon.server import default_socket

        self.socket_path = Path(socket_path) if socket_path is not None else default_socket()
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket_path)), base_url=BASE_URL, timeout=timeout
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from exc
        _raise_for(response)
        return response

    def _unavailable(self, exc: Exception) -> DaemonUnavailable:
        from popek.daemon.server import default_socket

        option = "" if self.socket_path == default_socket() else f" --socket {self.socket_path}"
        return DaemonUnavailable(
            f"no popek daemon answers on {self.socket_path} ({exc}); start one: popek serve{option} &"
        )

    @contextlib.contextmanager
    def stream(self, method: str, url: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A streamed response (exec, console follow), checked for an error status first."""
        try:
            with self._http.stream(method, url, **kwargs) as response:
                _raise_for(response)
                yield response
        except httpx.TransportError as exc:
            raise self._unavailable(exc) from exc

    def create(self, **spec: Any) -> RemoteVM:
        """Create a VM (POST /vms: name, cpus, mem, kernel, initrd, cmdline, disks, net, ports, rng, accel,
        snapshot, start) and return it; its guest boots on (wait_ready() waits for its agent)."""
        answer = self.request("POST", "/vms", json=spec).json()
        return RemoteVM(self, answer["id"], answer["name"])

    def list(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/vms").json()
        return result

    def get(self, ref: str) -> RemoteVM:
        """A VM by id or name (ApiError 404 if there is none)."""
        info = self.request("GET", f"/vms/{_quote(ref)}").json()
        return RemoteVM(self, info["id"], info["name"])

    def metrics(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/metrics").json()
        return result


def _quote(ref: str) -> str:
    from urllib.parse import quote

    return quote(ref, safe="")


class RemoteFiles:
    """RemoteVM.files: popek.agent.Files' operations through the daemon."""

    def __init__(self, vm: RemoteVM) -> None:
        self._vm = vm

    def _url(self) -> str:
        return f"/vms/{self._vm.id}/files"

    def read(self, path: str) -> bytes:
        return self._vm.client.request("GET", self._url(), params={"path": path}).content

    def write(self, path: str, data: bytes, mode: int = 0o644) -> int:
        answer = self._vm.client.request("PUT", self._url(), params={"path": path, "mode": mode}, content=data)
        return int(answer.json()["size"])

    def list(self, path: str) -> list[FileInfo]:
        entries = self._vm.client.request("GET", self._url(), params={"path": path, "op": "list"}).json()
        return [_file_info(entry) for entry in entries]

    def stat(self, path: str) -> FileInfo:
        return _file_info(self._vm.client.request("GET", self._url(), params={"path": path, "op": "stat"}).json())

    def remove(self, path: str, recursive: bool = False) -> None:
        self._vm.client.request("DELETE", self._url(), params={"path": path, "recursive": recursive})

    def mkdir(self, path: str, parents: bool = False, mode: int = 0o755) -> None:
        params: dict[str, Any] = {"path": path, "kind": "dir", "parents": parents, "mode": mode}
        self._vm.client.request("PUT", self._url(), params=params)


def _file_info(entry: dict[str, Any]) -> FileInfo:
    return FileInfo(
        name=entry["name"],
        mode=entry["mode"],
        uid=entry["uid"],
        gid=entry["gid"],
        size=entry["size"],
        mtime_ns=entry["mtime_ns"],
    )


class RemoteVM:
    """A VM the daemon runs; methods mirror popek.VM (exec, files, stop) and add the daemon's (pause, resume,
    snapshot, console, delete)."""

    def __init__(self, client: Client, vm_id: str, name: str) -> None:
        self.client = client
        self.id = vm_id
        self.name = name
        self.files = RemoteFiles(self)

    def __repr__(self) -> str:
        return f"RemoteVM(id={self.id!r}, name={self.name!r})"

    def info(self) -> dict[str, Any]:
        result: dict[str, Any] = self.client.request("GET", f"/vms/{self.id}").json()
        return result

    @property
    def state(self) -> str:
        return str(self.info()["state"])

    def wait_ready(self, timeout: float = 600.0, interval: float = 1.0) -> float:
        """Wait until the VM's agent answers (state 'running'); ApiError 409 if it stops or fails first."""
        started = time.monotonic()
        while True:
            info = self.info()
            if info["state"] == "running":
                return time.monotonic() - started
            if info["state"] not in ("starting", "booting"):
                raise ApiError(f"VM {self.name} is {info['state']}: {info.get('cause') or ''}".rstrip(": "), 409)
            if time.monotonic() - started > timeout:
                raise ApiError(f"VM {self.name} did not become ready within {timeout:g} s", 504)
            time.sleep(interval)

    def _action(self, action: str) -> dict[str, Any]:
        result: dict[str, Any] = self.client.request("POST", f"/vms/{self.id}/actions", json={"action": action}).json()
        return result

    def start(self) -> None:
        self._action("start")

    def stop(self) -> None:
        self._action("stop")

    def reset(self) -> None:
        self._action("reset")

    def pause(self) -> None:
        self._action("pause")

    def resume(self) -> None:
        self._action("resume")

    def snapshot(self, path: str | os.PathLike[str]) -> None:
        self.client.request("POST", f"/vms/{self.id}/snapshots", json={"path": os.fspath(path)})

    def console(self) -> bytes:
        """The console log so far."""
        return self.client.request("GET", f"/vms/{self.id}/console").content

    def follow_console(self) -> Iterator[bytes]:
        """The console log, then its output as it comes, until the VM's process ends."""
        with self.client.stream("GET", f"/vms/{self.id}/console", params={"follow": 1}, timeout=None) as response:
            yield from response.iter_bytes()

    def delete(self) -> None:
        """Stop the VM (if it runs) and forget it."""
        self.client.request("DELETE", f"/vms/{self.id}")

    def exec(
        self,
        command: str | Sequence[str],
        *,
        env: Mapping[str, str | None] | None = None,
        cwd: str | None = None,
        stdin: bytes | None = None,
        timeout: float | None = None,
        on_stdout: Callable[[bytes], object] | None = None,
        on_stderr: Callable[[bytes], object] | None = None,
        check: bool = False,
    ) -> ExecResult:
        """Run a command to its end (as popek.VM.exec): a shell string or an argv list."""
        body: dict[str, Any] = {"env": dict(env or {})}
        if isinstance(command, str):
            body["shell"] = command
        else:
            body["argv"] = list(command)
        if cwd is not None:
            body["cwd"] = cwd
        if stdin is not None:
            body["stdin"] = base64.b64encode(stdin).decode()
        if timeout is not None:
            body["timeout"] = timeout
        out: list[bytes] = []
        err: list[bytes] = []
        end: dict[str, Any] | None = None
        with self.client.stream("POST", f"/vms/{self.id}/exec", json=body, timeout=None) as response:
            for line in response.iter_lines():
                if not line:
                    continue
                message = json.loads(line)
                if "error" in message:
                    raise ApiError(str(message["error"]), 503)
                if "stream" in message:
                    data = base64.b64decode(message["data"])
                    sink = on_stdout if message["stream"] == "stdout" else on_stderr
                    if sink is not None:
                        sink(data)
                    else:
                        (out if message["stream"] == "stdout" else err).append(data)
                else:
                    end = message
        if end is None:
            raise ApiError("the daemon's exec stream ended without the command's end", 502)
        result = ExecResult(
            stdout=b"".join(out),
            stderr=b"".join(err),
            exit_code=end["exit_code"],
            signal=end["signal"],
            duration=float(end["duration"]),
            timed_out=bool(end["timed_out"]),
        )
        return result.check() if check else result
