"""Pod identity on a real kernel, from a container runtime's recorded answers.

The guest has no containerd, so the answers a real containerd gave for two
pods (``tests/fixtures/cri/recorded.json``, made by ``tests/cri/record.py``:
a Deployment's client pod and a StatefulSet's server pod in namespace
``shop``, each with one container and a CNI address) are served from the
host by ``tests/cri/replay_server.py``. The guest reaches it through the
bed's host-service forward, bridged to the daemon's runtime socket by socat.

In the guest, processes are placed in cgroups named as the kubelet and
containerd name them for those containers, and the pods' addresses are put
on the loopback device. Then, one daemon run per kernel:

* the client pod connects to the server pod: the client's flow names its
  own pod and container and the server's pod as the remote one; the
  server's flow the other way round; a host process's connection to the
  server pod names only the remote pod; a ``label_selector`` stream gets
  exactly the flows with the client pod at one end; the JSON lines output
  carries the ECS/Beats names;
* the runtime is taken away: a process of a container the daemon has not
  seen still gets its flow, without pod fields, and the failed lookup is
  counted; the runtime comes back: the daemon lists it again, and the
  known pods keep resolving.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import grpc

import bed
import flowlib
import grpc_client

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cri"))

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "cri" / "recorded.json"
WORKDIR = "/tmp/pods"
JSONL = f"{WORKDIR}/flows.jsonl"
#: The daemon's runtime socket in the guest.
CRI_SOCKET = "/run/cri/cri.sock"
SERVER_PORT = 8090
#: A container id the recording does not have.
UNKNOWN_ID = "ab" * 32
DAEMON_ARGS = ["-E", f"kubernetes.runtime_endpoint=unix://{CRI_SOCKET}",
               "-E", "kubernetes.resync_interval=2s", "-E", "kubernetes.request_timeout=1s",
               "-E", f"export.jsonl.path={JSONL}",
               "-E", "socket.flow_inactive_timeout=2s", "-E", "socket.flow_termination_timeout=1s"]
WAIT_S = 60


def wait_for(what, cond, timeout=WAIT_S):
    return flowlib.wait_until(cond, timeout, what, interval=0.5)


def recorded_pods():
    """container id -> (sandbox, container, pod ip) from the fixture."""
    d = json.loads(FIXTURE.read_text())
    sandboxes = {s["id"]: s for s in d["list_pod_sandbox"]["items"]}
    out = {}
    for c in d["list_containers"]["containers"]:
        sid = c.get("pod_sandbox_id") or c.get("podSandboxId")
        st = d["pod_sandbox_status"][sid]["status"]
        out[c["id"]] = (sandboxes[sid], c, st["network"]["ip"])
    return out


def cgroup_of(sandbox, container_id):
    uid = sandbox["metadata"]["uid"].replace("-", "_")
    return ("/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/"
            f"kubepods-besteffort-pod{uid}.slice/cri-containerd-{container_id}.scope")


def own_labels(sandbox):
    return {k: v for k, v in sandbox["labels"].items() if not k.startswith("io.kubernetes.")}


def check_pod(pod, sandbox, container, ip):
    """``pod`` (a Flow's pod or remote_pod) is the recorded sandbox; with
    ``container`` also that container."""
    meta = sandbox["metadata"]
    assert (pod.name, pod.namespace, pod.uid) == (meta["name"], meta["namespace"], meta["uid"]), pod
    assert dict(pod.labels) == own_labels(sandbox), pod
    assert list(pod.ips) == [ip], pod
    if container is None:
        assert (pod.container_name, pod.image) == ("", ""), pod
    else:
        assert pod.container_name == container["metadata"]["name"], pod
        assert pod.image == container["image"]["image"], pod


def in_cgroup(vm, name, cgroup, command):
    """Runs ``command`` (exec'd) in ``cgroup``; returns the Spawned and its pid file."""
    pidfile = f"{WORKDIR}/{name}.pid"
    vm.run(f"mkdir -p {cgroup}", check=True)
    vm.put(f"{WORKDIR}/{name}.sh", (f"echo $$ > {pidfile}\necho $$ > {cgroup}/cgroup.procs\n"
                                    f"exec {command}\n").encode(), mode=0o755)
    return vm.spawn(f"exec sh {WORKDIR}/{name}.sh"), pidfile


def test_pods_from_the_runtime_on_both_ends(vm):
    import replay_server

    pb, rpc = grpc_client.load_stubs()
    pods = recorded_pods()
    by_name = {s["metadata"]["name"].split("-")[0]: (cid, s, c, ip) for cid, (s, c, ip) in pods.items()}
    client_id, client_sb, client_c, client_ip = by_name["client"]
    server_id, server_sb, server_c, server_ip = by_name["server"]

    server, _ = replay_server.serve(FIXTURE, tcp=f"127.0.0.1:{vm.host_service_port}")
    try:
        vm.run(f"rm -rf {WORKDIR} && mkdir -p {WORKDIR} /run/cri", check=True)
        for ip in (client_ip, server_ip):
            vm.run(f"ip addr show dev lo | grep -q ' {ip}/' || ip addr add {ip}/32 dev lo", check=True)
        host, port = bed.HOST_SERVICE_ADDR
        vm.spawn(f"exec socat UNIX-LISTEN:{CRI_SOCKET},fork,unlink-early TCP:{host}:{port}")
        wait_for("the runtime socket bridge", lambda: vm.run(f"test -S {CRI_SOCKET}").rc == 0)
        srv, _ = in_cgroup(vm, "server", cgroup_of(server_sb, server_id),
                                     f"socat TCP-LISTEN:{SERVER_PORT},bind={server_ip},reuseaddr,fork "
                                     "SYSTEM:'echo pod'")
        wait_for("the server pod's listener",
                 lambda: vm.run(f"netstat -ltn | grep -q '{server_ip}:{SERVER_PORT} '").rc == 0)

        vm.start_daemon(DAEMON_ARGS)
        with grpc.insecure_channel(f"127.0.0.1:{vm.grpc_port}") as ch:
            stub = rpc.FlowServiceStub(ch)
            status = lambda: stub.GetStatus(pb.GetStatusRequest(), timeout=20).kubernetes  # noqa: E731
            wait_for("the daemon to list the runtime's pods", lambda: status().pods == 2)
            k = status()
            assert k.connected and k.runtime.startswith("containerd"), k
            assert k.endpoint == CRI_SOCKET and k.containers == 2, k
            everything = flowlib.Collector(stub, pb.StreamFlowsRequest(follow=True))
            selected = flowlib.Collector(stub, pb.StreamFlowsRequest(
                follow=True, allow=[pb.FlowFilter(namespace=["shop"], label_selector=["app=client"])]))
            wait_for("three subscribers", lambda: len(
                stub.GetStatus(pb.GetStatusRequest(), timeout=20).subscribers) == 3)

            cli, cli_pidfile = in_cgroup(vm, "client", cgroup_of(client_sb, client_id),
                                         f"socat -u TCP:{server_ip}:{SERVER_PORT},bind={client_ip} STDOUT")
            assert cli.wait(WAIT_S) == 0 and "pod" in cli.log(), cli.log()
            host_out = vm.run(f"socat -u TCP:{server_ip}:{SERVER_PORT},bind=127.0.0.1 STDOUT", check=True).out
            assert "pod" in host_out
            cli_pid = int(vm.run(f"cat {cli_pidfile}", check=True).out)

            def final(coll, pred):
                return next((f for f in coll.final() if pred(f)), None)

            client_flow = wait_for("the client pod's flow", lambda: final(
                everything, lambda f: f.process.pid == cli_pid and f.remote.port == SERVER_PORT))
            check_pod(client_flow.pod, client_sb, client_c, client_ip)
            assert (client_flow.pod.workload.kind, client_flow.pod.workload.name) == ("Deployment", "client")
            check_pod(client_flow.remote_pod, server_sb, None, server_ip)
            assert (client_flow.remote_pod.workload.kind,
                    client_flow.remote_pod.workload.name) == ("StatefulSet", "server")
            assert client_flow.container_id == client_id

            server_flow = wait_for("the server pod's flow", lambda: final(
                everything, lambda f: f.local.port == SERVER_PORT and f.remote.ip == client_ip))
            assert server_flow.container_id == server_id, server_flow
            check_pod(server_flow.pod, server_sb, server_c, server_ip)
            check_pod(server_flow.remote_pod, client_sb, None, client_ip)

            host_flow = wait_for("the host process's flow to the server pod", lambda: final(
                everything, lambda f: f.remote.port == SERVER_PORT and f.local.ip == "127.0.0.1"))
            assert not host_flow.HasField("pod") and not host_flow.container_id, host_flow
            check_pod(host_flow.remote_pod, server_sb, None, server_ip)

            # The selector holds at one end of the first two flows only.
            wait_for("the selected stream's flows",
                     lambda: {f.id for f in selected.final()} >= {client_flow.id, server_flow.id})
            assert host_flow.id not in {f.id for f in selected.final()}
            assert all(f.pod.labels.get("app") == "client" or f.remote_pod.labels.get("app") == "client"
                       for f in selected.final()), selected.final()

            # The runtime goes away: a container never seen gets its flow,
            # without pod fields, and its failed lookup is counted.
            server.stop(0).wait()
            before = status()
            stranger, stranger_pidfile = in_cgroup(vm, "stranger", cgroup_of(client_sb, UNKNOWN_ID),
                                                   f"socat -u TCP:{server_ip}:{SERVER_PORT} STDOUT")
            assert stranger.wait(WAIT_S) == 0, stranger.log()
            stranger_pid = int(vm.run(f"cat {stranger_pidfile}", check=True).out)
            stranger_flow = wait_for("the unknown container's flow", lambda: final(
                everything, lambda f: f.process.pid == stranger_pid))
            assert stranger_flow.container_id == UNKNOWN_ID and not stranger_flow.HasField("pod"), stranger_flow
            down = wait_for("the failed lookup to be counted",
                            lambda: (lambda k: k if k.lookup_failures > before.lookup_failures
                                     and not k.connected else None)(status()))
            assert down.last_error, down

            # It comes back: listed again, and the known pods still resolve.
            server, _ = replay_server.serve(FIXTURE, tcp=f"127.0.0.1:{vm.host_service_port}")
            wait_for("the runtime to be listed again",
                     lambda: (lambda k: k.connected and k.resyncs > down.resyncs)(status()))
            again, again_pidfile = in_cgroup(vm, "client2", cgroup_of(client_sb, client_id),
                                             f"socat -u TCP:{server_ip}:{SERVER_PORT},bind={client_ip} STDOUT")
            assert again.wait(WAIT_S) == 0, again.log()
            again_pid = int(vm.run(f"cat {again_pidfile}", check=True).out)
            again_flow = wait_for("the client pod's flow after the runtime's return", lambda: final(
                everything, lambda f: f.process.pid == again_pid))
            check_pod(again_flow.pod, client_sb, client_c, client_ip)
            assert status().lookup_failures == down.lookup_failures

            assert vm.stop_daemon("TERM") == 0
            for c in (everything, selected):
                c.thread.join(timeout=30)
        srv.stop("KILL")
    finally:
        server.stop(0)

    docs = [json.loads(line) for line in vm.fetch(JSONL).decode().splitlines()]
    doc = next(d for d in docs if d["process"]["pid"] == cli_pid and d["destination"]["port"] == SERVER_PORT)
    k8s = doc["kubernetes"]
    assert k8s["pod"]["name"] == client_sb["metadata"]["name"] and k8s["namespace"] == "shop", k8s
    assert k8s["deployment"]["name"] == "client" and k8s["container"]["name"] == "client", k8s
    assert doc["orchestrator"]["resource"] == {"type": "pod", "name": client_sb["metadata"]["name"],
                                               "id": client_sb["metadata"]["uid"]}, doc["orchestrator"]
    assert doc["container"]["id"] == client_id and doc["container"]["name"] == "client", doc["container"]
    assert doc["remote"]["kubernetes"]["statefulset"]["name"] == "server", doc["remote"]
