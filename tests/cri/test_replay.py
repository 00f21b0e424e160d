"""replay_server.py answers exactly what record.py recorded, filters as containerd does.

Needs neither containerd nor the daemon: the server is started on a Unix
socket (and once on TCP) from ``tests/fixtures/cri/recorded.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import containerd as cd  # noqa: E402
import replay_server  # noqa: E402

FIXTURE = replay_server.DEFAULT_FIXTURE


@pytest.fixture(scope="module")
def recorded():
    assert FIXTURE.exists(), f"{FIXTURE} missing: run tests/cri/record.py"
    return json.loads(FIXTURE.read_text())


def start_server(*where):
    proc = subprocess.Popen([sys.executable, str(HERE / "replay_server.py"), "--fixture",
                             str(FIXTURE), *where],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        pytest.fail(f"replay_server.py did not start: {line!r} {proc.stderr.read()}")
    return proc, line.split("listening on ", 1)[1].strip()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    sock = tmp_path_factory.mktemp("replay") / "cri.sock"
    proc, address = start_server("--unix", str(sock))
    assert address == f"unix://{sock}"
    c = cd.CriClient(address)
    yield c
    c.close()
    proc.terminate()
    proc.wait(10)


def test_answers_as_recorded(client, recorded):
    assert cd.to_dict(client.version()) == recorded["version"]
    assert cd.to_dict(client.list_pod_sandbox()) == recorded["list_pod_sandbox"]
    assert cd.to_dict(client.list_containers()) == recorded["list_containers"]
    assert recorded["pod_sandbox_status"].keys() == \
        {s["id"] for s in recorded["list_pod_sandbox"]["items"]}
    for sid, answer in recorded["pod_sandbox_status"].items():
        assert cd.to_dict(client.pod_sandbox_status(sid)) == answer


def test_recording_is_complete(recorded):
    """The fixture holds what the VM test needs: two running pods in shop."""
    names = sorted(s["metadata"]["name"] for s in recorded["list_pod_sandbox"]["items"])
    assert names == ["client-7c9d5b8f4-abcde", "server-0"]
    assert {s["metadata"]["namespace"] for s in recorded["list_pod_sandbox"]["items"]} == {"shop"}
    assert len(recorded["list_containers"]["containers"]) == 2
    assert all(c["state"] == "CONTAINER_RUNNING" for c in recorded["list_containers"]["containers"])
    assert recorded["version"]["runtime_name"] == "containerd"
    assert recorded["recorded"]["containerd"] == recorded["version"]["runtime_version"]


def test_filters(client, recorded):
    sandboxes = [s["id"] for s in recorded["list_pod_sandbox"]["items"]]
    containers = recorded["list_containers"]["containers"]
    for sid in sandboxes:
        for key in (sid, sid[:12]):  # full id, and a unique prefix as containerd accepts
            assert [s.id for s in client.list_pod_sandbox(id=key).items] == [sid]
            assert [c.id for c in client.list_containers(pod_sandbox_id=key).containers] == \
                [c["id"] for c in containers if c["pod_sandbox_id"] == sid]
        assert client.pod_sandbox_status(sid[:12]).status.id == sid
    for c in containers:
        assert [x.id for x in client.list_containers(id=c["id"]).containers] == [c["id"]]
        assert [x.id for x in client.list_containers(id=c["id"][:12]).containers] == [c["id"]]
        # Set fields are ANDed: this container is not in the other sandbox.
        other = next(s for s in sandboxes if s != c["pod_sandbox_id"])
        assert client.list_containers(id=c["id"], pod_sandbox_id=other).containers == []
    unknown = "f" * 64
    assert client.list_pod_sandbox(id=unknown).items == []
    assert client.list_containers(id=unknown).containers == []
    assert client.list_containers(pod_sandbox_id=unknown).containers == []
    running = cd.pb2.ContainerStateValue(state=cd.pb2.CONTAINER_RUNNING)
    assert len(client.list_containers(state=running).containers) == len(containers)
    exited = cd.pb2.ContainerStateValue(state=cd.pb2.CONTAINER_EXITED)
    assert client.list_containers(state=exited).containers == []
    ready = cd.pb2.PodSandboxStateValue(state=cd.pb2.SANDBOX_NOTREADY)
    assert client.list_pod_sandbox(state=ready).items == []
    by_label = client.list_pod_sandbox(label_selector={"app": "server"}).items
    assert [s.metadata.name for s in by_label] == ["server-0"]
    by_label = client.list_containers(label_selector={"io.kubernetes.pod.name": "server-0"})
    assert [c.metadata.name for c in by_label.containers] == ["server"]


def test_unknown_sandbox_status_not_found(client):
    with pytest.raises(grpc.RpcError) as e:
        client.pod_sandbox_status("f" * 64)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert e.value.details() == "an error occurred when try to find sandbox: not found"


def test_writes_unimplemented(client):
    with pytest.raises(grpc.RpcError) as e:
        client.run_pod("x", "default")
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_tcp(recorded):
    proc, address = start_server("--tcp", "127.0.0.1:0")
    try:
        assert address.startswith("127.0.0.1:") and not address.endswith(":0")
        c = cd.CriClient(address)
        assert cd.to_dict(c.list_containers()) == recorded["list_containers"]
        c.close()
    finally:
        proc.terminate()
        proc.wait(10)
