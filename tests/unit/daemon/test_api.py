"""The daemon's REST API (popek/daemon/app.py) against hostile requests, through the ASGI app (starlette's
TestClient runs its lifespan, so the real Supervisor opens its state dir). No VM boots here: VMs are created with
start=false, or the supervisor's VM-process command is a short harmless process (the supervision tests in
test_supervisor.py test real children). Each bad request must be one 4xx JSON answer naming its cause, and must
leave the daemon's VMs as they were."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

import popek
from popek.daemon.app import create_app
from popek.daemon.supervisor import Cgroups, Supervisor


def harmless(workdir: Path) -> list[str]:
    """Instead of a VM process: one that ends at once, writing the exit file a stopped vmproc writes."""
    code = "import json,sys,pathlib; pathlib.Path(sys.argv[1],'exit.json').write_text(json.dumps({'cause':'test'}))"
    return [sys.executable, "-c", code, str(workdir)]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    state = tmp_path_factory.mktemp("daemon-state")
    sup = Supervisor(state, command=harmless, cgroups=Cgroups(root=state / "no-cgroup"))
    with TestClient(create_app(sup), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def stopped(client: TestClient) -> str:
    """A VM that exists but was never started."""
    answer = client.post("/vms", json={"name": "idle", "start": False})
    assert answer.status_code == 201, answer.text
    assert answer.json()["state"] == "created"
    return str(answer.json()["id"])


def vm_ids(client: TestClient) -> list[str]:
    return sorted(vm["id"] for vm in client.get("/vms").json())


def assert_error(answer: object, status: int, field: str | None = None) -> dict[str, object]:
    from httpx import Response

    assert isinstance(answer, Response)
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"]
    assert "Traceback" not in body["error"]
    if field is not None:
        assert body.get("field") == field, body
    return body


def test_malformed_json_is_400(client: TestClient) -> None:
    before = vm_ids(client)
    answer = client.post("/vms", content=b'{"cpus": 1,', headers={"content-type": "application/json"})
    assert "malformed JSON" in str(assert_error(answer, 400)["error"])
    assert vm_ids(client) == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"cpus": "2"}, "cpus"),
        ({"cpus": 0}, "cpus"),
        ({"cpus": True}, "cpus"),
        ({"mem": "lots"}, "mem"),
        ({"mem": "1T"}, "mem"),  # more than this host has
        ({"accel": "lockstep"}, "accel"),
        ({"name": "../etc"}, "name"),
        ({"disks": "/x.img"}, "disks"),
        ({"disks": ["/no/such/disk.img"]}, "disks.0"),
        ({"disks": ["/etc/hostname,frob"]}, "disks.0"),
        ({"kernel": "relative/bzImage"}, "kernel"),
        ({"kernel": "/no/such/bzImage"}, "kernel"),
        ({"kernel": "/bin/sh\u0000x"}, "kernel"),
        ({"unknown": 1}, "unknown"),
        ({"boot_timeout": -1}, "boot_timeout"),
    ],
)
def test_invalid_spec_is_422_naming_the_field(client: TestClient, body: dict[str, object], field: str) -> None:
    before = vm_ids(client)
    assert_error(client.post("/vms", json={"start": False, **body}), 422, field)
    assert vm_ids(client) == before


def test_body_must_be_an_object(client: TestClient) -> None:
    assert_error(client.post("/vms", json=[1, 2]), 422)
    assert_error(client.post("/vms", json="cpus"), 422)


def test_huge_bodies_are_413_without_being_read(client: TestClient) -> None:
    from popek.daemon.app import MAX_JSON_BODY

    declared = client.post("/vms", content=b"{}", headers={"content-length": str(MAX_JSON_BODY + 1)})
    assert_error(declared, 413)

    def chunks() -> Iterator[bytes]:
        yield b'{"name": "'
        for _ in range(MAX_JSON_BODY // (1 << 20) + 1):
            yield b"a" * (1 << 20)
        yield b'"}'

    assert_error(client.post("/vms", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_unknown_vm_is_404(client: TestClient) -> None:
    for method, url in [
        ("GET", "/vms/nope"),
        ("DELETE", "/vms/nope"),
        ("GET", "/vms/nope/console"),
        ("GET", "/vms/nope/files?path=/etc"),
    ]:
        assert_error(client.request(method, url), 404)
    assert_error(client.post("/vms/nope/actions", json={"action": "stop"}), 404)
    assert_error(client.post("/vms/nope/exec", json={"argv": ["true"]}), 404)


def test_exec_on_a_stopped_vm_is_409(client: TestClient, stopped: str) -> None:
    answer = client.post(f"/vms/{stopped}/exec", json={"argv": ["echo"]})
    assert "not running" in str(assert_error(answer, 409)["error"])
    assert_error(client.post(f"/vms/{stopped}/actions", json={"action": "stop"}), 409)
    assert_error(client.post(f"/vms/{stopped}/actions", json={"action": "pause"}), 409)
    assert_error(client.get(f"/vms/{stopped}/files", params={"path": "/etc"}), 409)
    assert client.get(f"/vms/{stopped}").json()["state"] == "created"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"argv": []},
        {"argv": ["echo"], "shell": "echo"},
        {"argv": "echo hi"},
        {"argv": ["a\u0000b"]},
        {"shell": "true", "env": {"A=B": "x"}},
        {"shell": "true", "cwd": "relative"},
        {"shell": "true", "cwd": "/tmp/../etc"},
        {"shell": "true", "stdin": "not base64!"},
        {"shell": "true", "timeout": 0},
        {"shell": "true", "timeout": 1e300},
    ],
)
def test_bad_exec_body_is_422(client: TestClient, stopped: str, body: dict[str, object]) -> None:
    assert_error(client.post(f"/vms/{stopped}/exec", json=body), 422)


@pytest.mark.parametrize(
    "path", ["relative/x", "/etc/../root/.ssh/id_rsa", "../../etc/passwd", "/a\u0000b", "/" + "a" * 5000]
)
def test_file_path_traversal_and_absurd_paths_are_422(client: TestClient, stopped: str, path: str) -> None:
    for method in ("GET", "PUT", "DELETE"):
        assert_error(client.request(method, f"/vms/{stopped}/files", params={"path": path}), 422)


def test_unknown_action_is_422(client: TestClient, stopped: str) -> None:
    assert_error(client.post(f"/vms/{stopped}/actions", json={"action": "explode"}), 422, "action")


def test_snapshot_restore_needs_this_popek_to_have_it(client: TestClient, tmp_path: Path) -> None:
    """POST /vms {"snapshot"}: 501 exactly when popek.VM has no restore() (the lead adds it separately)."""
    snap = tmp_path / "snap"
    snap.write_bytes(b"x")
    answer = client.post("/vms", json={"snapshot": str(snap), "start": False})
    if getattr(popek.VM, "restore", None) is None:
        assert "not supported by this popek" in str(assert_error(answer, 501)["error"])
    else:
        assert answer.status_code == 201, answer.text
        client.delete(f"/vms/{answer.json()['id']}")


def test_duplicate_name_is_409(client: TestClient, stopped: str) -> None:
    assert_error(client.post("/vms", json={"name": "idle", "start": False}), 409, "name")


def test_openapi_document_names_the_routes(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    for route in ("/vms", "/vms/{ref}", "/vms/{ref}/actions", "/vms/{ref}/exec", "/vms/{ref}/files", "/metrics"):
        assert route in doc["paths"], route
    assert "VmCreate" in doc["components"]["schemas"]


def test_create_get_list_delete(client: TestClient) -> None:
    answer = client.post("/vms", json={"name": "tmp", "cpus": 2, "mem": "256M", "start": False})
    assert answer.status_code == 201
    vm_id = answer.json()["id"]
    info = client.get("/vms/tmp").json()
    assert info["id"] == vm_id and info["spec"]["cpus"] == 2 and info["state"] == "created"
    assert vm_id in vm_ids(client)
    assert client.delete(f"/vms/{vm_id}").status_code == 200
    assert vm_id not in vm_ids(client)
    assert_error(client.get(f"/vms/{vm_id}"), 404)


def test_started_process_that_stops_is_reported_stopped(client: TestClient) -> None:
    """The harmless 'VM process' writes its exit file and ends: the daemon reports stopped with its cause."""
    import time

    vm_id = client.post("/vms", json={"name": "brief"}).json()["id"]
    deadline = time.monotonic() + 20
    while (info := client.get(f"/vms/{vm_id}").json())["state"] != "stopped":
        assert time.monotonic() < deadline, info
        time.sleep(0.05)
    assert info["cause"] == "test" and info["pid"] is None
    metrics = client.get("/metrics").json()
    assert any(vm["id"] == vm_id and vm["state"] == "stopped" for vm in metrics["vms"])
    assert metrics["daemon"]["rss"] > 0
    client.delete(f"/vms/{vm_id}")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
spec_keys = st.sampled_from(["name", "cpus", "mem", "kernel", "initrd", "cmdline", "disks", "net", "rng", "accel", "x"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(spec_keys, json_values, max_size=5))
def test_fuzzed_specs_never_fail_with_500(client: TestClient, body: dict[str, object]) -> None:
    content = json.dumps({**body, "start": False})
    answer = client.post("/vms", content=content, headers={"content-type": "application/json"})
    assert answer.status_code in (201, 409, 422), answer.text
    assert isinstance(answer.json(), dict)
    if answer.status_code == 201:
        client.delete(f"/vms/{answer.json()['id']}")
    else:
        assert answer.json()["error"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64), route=st.sampled_from(["/vms", "/vms/idle/exec", "/vms/idle/actions"]))
def test_fuzzed_bytes_are_4xx(client: TestClient, stopped: str, raw: bytes, route: str) -> None:
    before = vm_ids(client)
    answer = client.post(route, content=raw, headers={"content-type": "application/json"})
    assert 400 <= answer.status_code < 500, answer.text
    assert answer.json()["error"]
    assert vm_ids(client) == before


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ref=st.text(min_size=1, max_size=40).filter(lambda s: s != "idle" and "/" not in s and s not in (".", "..")))
def test_fuzzed_ids_are_404(client: TestClient, stopped: str, ref: str) -> None:
    answer = client.get("/vms/" + quote(ref, safe=""))
    if ref == stopped:
        assert answer.status_code == 200
    else:
        assert_error(answer, 404)
