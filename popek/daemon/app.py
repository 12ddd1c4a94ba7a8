"""The daemon's REST API (docs/daemon.md): a FastAPI application over a Supervisor (popek/daemon/supervisor.py).

FastAPI validates every body against its pydantic model (popek/daemon/models.py) and serves the OpenAPI document
at /openapi.json. Every error is one JSON object ``{"error": message, "field"?: name}``: 400 malformed JSON, 404
unknown VM or guest file, 409 a VM in the wrong state, 413 too large, 422 an invalid spec naming its field, 501 an
operation this popek does not have, 503 a guest agent or VM process that does not answer; an unexpected failure
is a 500 with the exception's type and message, never a traceback.

Exec and files go from the daemon straight to the guest agent through the VM's vsock socket
(``popek.agent.AgentClient(vsock_unix_connector(path, 1024))``, Firecracker's host-side convention); the VM process
only runs the VM.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from popek.agent import (
    AgentClient,
    AgentDisconnected,
    AgentError,
    AgentUnavailable,
    CommandStartError,
    CommandTimeout,
    FileInfo,
    RemoteFileError,
    vsock_unix_connector,
)
from popek.daemon import models, supervisor
from popek.daemon.supervisor import Supervisor, SupervisorError, VmRecord
from popek.devices.virtio.blk import DiskSpec
from popek.errors import ConfigError, PopekError

AGENT_PORT = 1024  # the default guest's agent (popek/image/init; popek.api.AGENT_PORT)
AGENT_TIMEOUT = 60.0
MAX_FILE = 256 << 20  # a file moved in one request
FOLLOW_POLL = 0.25


MAX_JSON_BODY = 32 << 20  # an exec request with its largest inline stdin (models.MAX_STDIN, base64) fits


class BodyTooLarge(HTTPException):
    """A request body over its route's limit: 413 before it is all read into memory (an HTTPException, which
    FastAPI's body parsing passes on as it is)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")


class BodyLimit:
    """ASGI middleware: bodies are bounded (MAX_FILE for file uploads, MAX_JSON_BODY for the rest), checked on
    Content-Length and again as the body arrives (a chunked body has none)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = MAX_FILE if scope["method"] == "PUT" else MAX_JSON_BODY
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await JSONResponse({"error": BodyTooLarge(limit).detail}, status_code=413)(scope, receive, send)
                return
        seen = 0

        async def bounded() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, bounded, send)


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


def _error(status: int, message: str, field: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first: dict[str, Any] = dict(errors[0]) if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return _error(400, f"malformed JSON: {first.get('ctx', {}).get('error', first.get('msg'))}")
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    if not loc and first.get("type") == "missing":
        return _error(422, "a JSON body is needed")
    if not loc and first.get("type") in ("model_attributes_type", "dict_type"):
        return _error(422, "the body must be a JSON object")
    field = ".".join(loc) or None
    message = str(first.get("msg", "invalid value"))
    return _error(422, f"{field}: {message}" if field else message, field)


def _file_info(info: FileInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "mode": info.mode,
        "uid": info.uid,
        "gid": info.gid,
        "size": info.size,
        "mtime_ns": info.mtime_ns,
        "type": "dir" if info.is_dir else "symlink" if info.is_symlink else "file" if info.is_file else "other",
    }


def _agent_error(exc: AgentError) -> ApiError:
    if isinstance(exc, RemoteFileError):
        status = {errno.ENOENT: 404, errno.EACCES: 403, errno.EPERM: 403}.get(exc.errno, 409)
        return ApiError(status, str(exc), "path")
    if isinstance(exc, CommandStartError):
        return ApiError(422, str(exc), "argv")
    if isinstance(exc, AgentUnavailable | AgentDisconnected):
        return ApiError(503, f"the guest agent does not answer: {exc}")
    if isinstance(exc, CommandTimeout):
        return ApiError(504, str(exc))
    return ApiError(502, f"{type(exc).__name__}: {exc}")


def _mem_bytes(mem: int | str) -> int:
    from popek.cli import parse_size

    return mem if isinstance(mem, int) else parse_size(mem)


def _check_spec(body: models.VmCreate) -> dict[str, Any]:
    """The spec as the VM process gets it, checked by popek.VM's own constructor (which builds nothing), and
    host files that must exist checked here, so a bad spec is a 422 and no process is started."""
    import popek

    spec = body.model_dump()
    if body.snapshot is not None:
        if not Path(body.snapshot).exists():
            raise ApiError(422, f"snapshot: no such file: {body.snapshot}", "snapshot")
        spec["mem_bytes"] = 0
        return spec
    for name in ("kernel", "initrd"):
        value = spec.get(name)
        if value is not None and not Path(value).is_file():
            raise ApiError(422, f"{name}: no such file: {value}", name)
    for i, disk in enumerate(body.disks):
        try:
            parsed = DiskSpec.parse(disk)
        except ConfigError as exc:
            raise ApiError(422, f"disks.{i}: {exc}", f"disks.{i}") from exc
        if not parsed.path.is_absolute() or not parsed.path.exists():
            raise ApiError(422, f"disks.{i}: no such file (an absolute path is needed): {parsed.path}", f"disks.{i}")
    host_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        popek.VM(
            kernel=body.kernel,
            initrd=body.initrd,
            append=body.cmdline,
            mem=body.mem,
            cpus=body.cpus,
            accel=body.accel,
            disks=body.disks,
            rng=body.rng,
            net=body.net,
            ports=body.ports,
            boot_timeout=body.boot_timeout,
        )
        spec["mem_bytes"] = _mem_bytes(body.mem)
    except ConfigError as exc:
        message = str(exc)
        field = next((f for f in ("mem", "cpus", "disks", "net", "ports", "accel") if message.startswith(f)), None)
        field = field or ("mem" if "size" in message or "memory" in message else None)
        raise ApiError(422, message, field) from exc
    if spec["mem_bytes"] > host_memory:
        raise ApiError(422, f"mem: {spec['mem_bytes']} bytes is more than the host's {host_memory} bytes of RAM", "mem")
    return spec


class Daemon:
    """The application's state: the supervisor, and one AgentClient per VM (connections are per call)."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.started = time.time()

    def agent(self, record: VmRecord) -> AgentClient:
        return AgentClient(vsock_unix_connector(record.vsock_path, AGENT_PORT, AGENT_TIMEOUT), timeout=AGENT_TIMEOUT)

    async def running(self, ref: str) -> VmRecord:
        """The VM, which must be running for its agent to be used: 409 otherwise."""
        record = self.sup.find(ref)
        state = await self.sup.refresh(record)
        if state != "running":
            raise ApiError(409, f"VM {record.name} is {state}, not running")
        return record

    async def info(self, record: VmRecord, *, tail: bool = False) -> dict[str, Any]:
        state = await self.sup.refresh(record)
        spec = {k: v for k, v in record.spec.items() if k != "mem_bytes"}
        info = models.VmInfo(
            id=record.id,
            name=record.name,
            state=state,
            pid=record.pid if record.live else None,
            created=record.created,
            started=record.started,
            uptime=(time.time() - record.started) if record.live and record.started else None,
            spec=spec,
            cause=record.cause,
            console_tail=record.console_tail().decode(errors="replace") if tail else None,
            cgroup=record.cgroup,
        )
        return info.model_dump()


def create_app(sup: Supervisor) -> FastAPI:
    """The ASGI application; its lifespan opens (adopts) and closes the supervisor."""
    daemon = Daemon(sup)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await sup.open()
        try:
            yield
        finally:
            await sup.close()

    app = FastAPI(
        title="popek daemon",
        version="1",
        description="Many VMs on one host (docs/daemon.md)",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(ApiError)
    async def on_api(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.field)

    @app.exception_handler(SupervisorError)
    async def on_supervisor(request: Request, exc: SupervisorError) -> JSONResponse:
        return _error(exc.status, str(exc), exc.field)

    @app.exception_handler(AgentError)
    async def on_agent(request: Request, exc: AgentError) -> JSONResponse:
        err = _agent_error(exc)
        return _error(err.status, err.message, err.field)

    @app.exception_handler(Exception)
    async def on_other(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")

    app.add_middleware(BodyLimit)

    # --- VMs

    @app.post("/vms", status_code=201)
    async def create_vm(body: models.VmCreate) -> dict[str, Any]:
        """Create a VM (and start it unless start is false)."""
        spec = await asyncio.to_thread(_check_spec, body)
        record = sup.create(spec, body.name)
        if body.start:
            sup.start(record)
        return {"id": record.id, "name": record.name, "state": record.state}

    @app.get("/vms")
    async def list_vms() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(daemon.info(record) for record in list(sup.vms.values()))))

    @app.get("/vms/{ref}")
    async def get_vm(ref: str) -> dict[str, Any]:
        return await daemon.info(sup.find(ref), tail=True)

    @app.delete("/vms/{ref}")
    async def delete_vm(ref: str) -> dict[str, Any]:
        record = sup.find(ref)
        await sup.delete(record)
        return {"deleted": record.id}

    @app.post("/vms/{ref}/actions")
    async def action(ref: str, body: models.Action) -> dict[str, Any]:
        record = sup.find(ref)
        state = await sup.refresh(record)
        if body.action == "start":
            sup.start(record)  # 409 if live
        elif body.action == "stop":
            if not record.live:
                raise ApiError(409, f"VM {record.name} is {state}, not running")
            await sup.stop(record)
        elif body.action == "reset":
            # a reset boots the VM anew in a fresh process: the cleanest state a VMM can give
            if record.live:
                await sup.stop(record)
            sup.start(record)
        else:
            answer = await sup.control(record, {"op": body.action})
            if "error" in answer:
                raise ApiError(int(answer.get("status", 500)), str(answer["error"]))
        return await daemon.info(record)

    @app.post("/vms/{ref}/snapshots", status_code=201)
    async def snapshot(ref: str, body: models.SnapshotBody) -> dict[str, Any]:
        record = sup.find(ref)
        if not Path(body.path).parent.is_dir():
            raise ApiError(422, f"path: no such directory: {Path(body.path).parent}", "path")
        answer = await sup.control(record, {"op": "snapshot", "path": body.path}, timeout=600)
        if "error" in answer:
            raise ApiError(int(answer.get("status", 500)), str(answer["error"]))
        return {"path": body.path}

    # --- the guest agent

    @app.post("/vms/{ref}/exec")
    async def exec_command(ref: str, body: models.ExecBody) -> StreamingResponse:
        """Run a command; the answer streams NDJSON: {"stream": "stdout"|"stderr", "data": base64} lines, then
        {"exit_code", "signal", "timed_out", "duration"} (or {"error"} if the VM went away meanwhile)."""
        record = await daemon.running(ref)
        client = daemon.agent(record)
        command: list[str] | str = body.argv if body.argv is not None else (body.shell or "")
        stdin = body.stdin_bytes()
        env: dict[str | bytes, str | bytes | None] = dict(body.env.items())
        process = await asyncio.to_thread(
            client.spawn, command, env=env, cwd=body.cwd, stdin=stdin is not None, timeout=body.timeout
        )

        def lines() -> Iterator[bytes]:
            try:
                if stdin is not None:
                    process.write(stdin)
                    process.close_stdin()
                while (piece := process.read()) is not None:
                    stream, data = piece
                    yield json.dumps({"stream": stream, "data": base64.b64encode(data).decode()}).encode() + b"\n"
                result = process.wait()
                yield json.dumps(
                    {
                        "exit_code": result.exit_code,
                        "signal": result.signal,
                        "timed_out": result.timed_out,
                        "duration": result.duration,
                    }
                ).encode() + b"\n"
            except (PopekError, OSError) as exc:
                yield json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode() + b"\n"
            finally:
                process.close()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    def _path(path: str) -> str:
        try:
            return models.guest_path(path)
        except ValueError as exc:
            raise ApiError(422, f"path: {exc}", "path") from exc

    @app.get("/vms/{ref}/files", response_model=None)
    async def get_file(
        ref: str,
        path: Annotated[str, Query(max_length=models.MAX_PATH)],
        op: Annotated[str, Query(pattern="^(read|list|stat)$")] = "read",
    ) -> Response | dict[str, Any] | list[dict[str, Any]]:
        """op=read (the bytes), list (a directory's entries) or stat (one file)."""
        target = _path(path)
        record = await daemon.running(ref)
        files = daemon.agent(record).files
        if op == "list":
            return [_file_info(info) for info in await asyncio.to_thread(files.list, target)]
        info = await asyncio.to_thread(files.stat, target)
        if op == "stat":
            return _file_info(info)
        if info.is_dir:
            raise ApiError(409, f"{target} is a directory (op=list lists it)", "path")
        if info.size > MAX_FILE:
            raise ApiError(413, f"{target} has {info.size} bytes; at most {MAX_FILE} move in one request", "path")
        data = await asyncio.to_thread(files.read, target)
        return Response(data, media_type="application/octet-stream")

    @app.put("/vms/{ref}/files", status_code=201)
    async def put_file(
        ref: str,
        request: Request,
        path: Annotated[str, Query(max_length=models.MAX_PATH)],
        mode: Annotated[int, Query(ge=0, le=0o7777)] = 0o644,
        kind: Annotated[str, Query(pattern="^(file|dir)$")] = "file",
        parents: bool = False,
    ) -> dict[str, Any]:
        """kind=file: the body becomes the file; kind=dir: make a directory (parents: mkdir -p)."""
        target = _path(path)
        record = await daemon.running(ref)
        files = daemon.agent(record).files
        if kind == "dir":
            await asyncio.to_thread(files.mkdir, target, parents, mode)
            return {"path": target}
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_FILE:
                raise ApiError(413, f"at most {MAX_FILE} bytes move in one request")
            chunks.append(chunk)
        written = await asyncio.to_thread(files.write, target, b"".join(chunks), mode)
        return {"path": target, "size": written}

    @app.delete("/vms/{ref}/files")
    async def delete_file(
        ref: str, path: Annotated[str, Query(max_length=models.MAX_PATH)], recursive: bool = False
    ) -> dict[str, Any]:
        target = _path(path)
        if target == "/":
            raise ApiError(422, "path: refusing to remove the guest's root", "path")
        record = await daemon.running(ref)
        await asyncio.to_thread(daemon.agent(record).files.remove, target, recursive)
        return {"removed": target}

    # --- console and metrics

    @app.get("/vms/{ref}/console", response_model=None)
    async def console(ref: str, follow: bool = False) -> Response:
        """The console log so far; with follow=1, then what comes, until the VM's process ends."""
        record = sup.find(ref)
        log = record.dir / "console.log"
        if not follow:
            try:
                data = await asyncio.to_thread(log.read_bytes)
            except FileNotFoundError:
                data = b""
            return Response(data, media_type="application/octet-stream")

        async def stream() -> AsyncIterator[bytes]:
            offset = 0
            while True:
                try:
                    with log.open("rb") as f:
                        f.seek(offset)
                        data = f.read(1 << 20)
                except FileNotFoundError:
                    data = b""
                if data:
                    offset += len(data)
                    yield data
                    continue
                if not record.live:
                    return
                await asyncio.sleep(FOLLOW_POLL)

        return StreamingResponse(stream(), media_type="application/octet-stream")

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        """Per VM: state, uptime, RSS of its process, its exit and assist counts (popek.VM.stats), and the bytes
        its disks, network and vsock moved (popek.VM.io_counters)."""

        async def one(record: VmRecord) -> dict[str, Any]:
            entry = await daemon.info(record)
            entry.pop("spec", None)
            entry["rss"] = supervisor.rss_bytes(record.pid) if record.live and record.pid else None
            entry["stats"] = entry["io"] = None
            if entry["state"] in ("running", "paused", "booting"):
                try:
                    answer = await sup.control(record, {"op": "stats"}, timeout=5)
                except SupervisorError:
                    pass
                else:
                    entry["stats"], entry["io"] = answer.get("stats"), answer.get("io")
            return entry

        vms = list(await asyncio.gather(*(one(record) for record in list(sup.vms.values()))))
        return {
            "daemon": {
                "pid": os.getpid(),
                "uptime": time.time() - daemon.started,
                "rss": supervisor.rss_bytes(os.getpid()),
            },
            "cgroups": sup.cgroups.note or "memory and cpu limits per VM",
            "vms": vms,
        }

    return app
