"""Operations features on a real kernel: Prometheus metrics agree with
GetStatus, the JSON lines output carries the same flows as a gRPC subscriber
with the same filter, and a process in a containerd-pod-like cgroup gets
that container id and pod UID on its flows.

One daemon run per kernel (TCG guests are slow): the daemon writes JSONL for
``destination_port: [8080]`` to a guest file and serves metrics on guest port
9464 (forwarded to the host); a filtered and an unfiltered gRPC subscriber
run from the host while the guest makes HTTP requests to two servers and a
client placed in a pod cgroup talks to a slow server.
"""

from __future__ import annotations

import json
import urllib.request

import grpc

import flowlib
import grpc_client

METRICS_PORT = 9464
#: Guest ports the bed forwards to the host for this module.
GUEST_FORWARDS = [METRICS_PORT]
FILTERED_PORT = 8080
OTHER_PORT = 8081
SLOW_PORT = 8082
#: Requests made to each HTTP server.
REQUESTS = 3
WORKDIR = "/tmp/ops"
JSONL = f"{WORKDIR}/flows.jsonl"
#: The guest's address on eth0 (qemu user networking).
GUEST_V4 = "10.0.2.15"
CONFIG = f"""
export:
  jsonl:
    path: {JSONL}
    filters:
      - destination_port: [{FILTERED_PORT}]
"""
DAEMON_ARGS = ["-c", f"{WORKDIR}/sockscope.yml", "-E", f"metrics.listen=0.0.0.0:{METRICS_PORT}",
               "-E", "socket.flow_inactive_timeout=2s", "-E", "socket.flow_termination_timeout=1s"]
POD_UID = "3f2a1c4e-9b7d-4e21-8c5a-0d6e7f8a9b10"
CONTAINER_ID = "".join(f"{i:02x}" for i in range(32))
POD_CGROUP = ("/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/"
              f"kubepods-besteffort-pod{POD_UID.replace('-', '_')}.slice/"
              f"cri-containerd-{CONTAINER_ID}.scope")
#: Upper bound for conditions waited on.
WAIT_S = 60


def wait_for(what, cond, timeout=WAIT_S):
    return flowlib.wait_until(cond, timeout, what, interval=0.5)


def scrape(vm) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{vm.host_port(METRICS_PORT)}/metrics", timeout=20) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        assert series not in samples, f"duplicate series {series}"
        samples[series] = float(value)
    return samples


def compare_metrics_with_status(m1, st, m2):
    """Counters: m1 <= status <= m2 (scrape, GetStatus, scrape); gauges lie between the scrapes."""
    def counter(series, value):
        assert series in m1 and series in m2, f"{series} missing from the exposition"
        assert m1[series] <= value <= m2[series], f"{series}: {m1[series]} / status {value} / {m2[series]}"

    def gauge(series, value):
        assert series in m1 and series in m2, f"{series} missing from the exposition"
        lo, hi = sorted((m1[series], m2[series]))
        assert lo <= value <= hi, f"{series}: {m1[series]} / status {value} / {m2[series]}"

    assert st.cpus, "no per-CPU ring counters in the status"
    cpu_series = {k for k in m2 if k.startswith("sockscope_ring_samples_total{")}
    assert cpu_series == {f'sockscope_ring_samples_total{{cpu="{c.cpu}"}}' for c in st.cpus}
    for c in st.cpus:
        counter(f'sockscope_ring_samples_total{{cpu="{c.cpu}"}}', c.samples)
        counter(f'sockscope_ring_lost_samples_total{{cpu="{c.cpu}"}}', c.lost)
    assert sum(c.samples for c in st.cpus) > 0, "no samples read"
    counter('sockscope_lost_total{source="kernel_ring"}', sum(c.lost for c in st.cpus))
    counter("sockscope_decode_errors_total", st.decode_errors)
    counter("sockscope_kretprobe_misses_total", st.kretprobe_misses)
    counter("sockscope_flows_emitted_total", st.flows_received)
    counter("sockscope_export_queue_drops_total", st.export_queue_drops)
    counter("sockscope_dns_packets_total", st.dns.packets)
    counter("sockscope_dns_answers_total", st.dns.answers)
    counter("sockscope_dns_parse_errors_total", st.dns.parse_errors)
    gauge("sockscope_dns_entries", st.dns.entries)
    gauge("sockscope_tracked_sockets", st.tracked_sockets)
    gauge("sockscope_tracked_flows", st.tracked_flows)
    gauge("sockscope_tracked_processes", st.tracked_processes)
    gauge("sockscope_history_flows", st.history_occupancy)
    gauge("sockscope_history_capacity", st.history_capacity)
    gauge("sockscope_subscribers", len(st.subscribers))
    for s in st.subscribers:
        labels = f'{{subscriber="{s.id}",peer="{s.peer}"}}'
        gauge("sockscope_subscriber_delivered" + labels, s.delivered)
        gauge("sockscope_subscriber_dropped" + labels, s.drops)
        gauge("sockscope_subscriber_queue_capacity" + labels, s.queue_capacity)
    assert m2["sockscope_serving"] == 1.0 and st.serving
    assert m2["sockscope_probes_installed"] == len(st.probes) > 0
    probes = {k for k in m2 if k.startswith("sockscope_probe_installed{")}
    assert len(probes) == len(st.probes)
    assert any(f'kernel_release="{st.kernel_release}"' in k for k in m2 if k.startswith("sockscope_build_info{"))


def tuple_of(local_ip, local_port, remote_ip, remote_port):
    return (local_ip, int(local_port), remote_ip, int(remote_port))


def test_metrics_jsonl_and_pod_container(vm):
    pb, rpc = grpc_client.load_stubs()
    vm.run(f"mkdir -p {WORKDIR} && rm -f {JSONL}*", check=True)
    vm.put(f"{WORKDIR}/sockscope.yml", CONFIG.encode())
    for port in (FILTERED_PORT, OTHER_PORT):
        vm.run(f"netstat -ltn | grep -q ':{port} ' || httpd -p {port} -h /www", check=True)
    if vm.run(f"netstat -ltn | grep -q ':{SLOW_PORT} '").rc != 0:
        vm.spawn(f"exec socat TCP-LISTEN:{SLOW_PORT},reuseaddr,fork SYSTEM:'sleep 2; echo slow'")
    wait_for("the slow server", lambda: vm.run(f"netstat -ltn | grep -q ':{SLOW_PORT} '").rc == 0)
    vm.run(f"mkdir -p {POD_CGROUP}", check=True)
    vm.put(f"{WORKDIR}/pod-client.sh",
           (f"echo $$ > {WORKDIR}/pod-client.pid\n"
            f"echo $$ > {POD_CGROUP}/cgroup.procs\n"
            f"exec socat -u TCP:127.0.0.1:{SLOW_PORT} STDOUT\n").encode(), mode=0o755)

    vm.start_daemon(DAEMON_ARGS)
    with grpc.insecure_channel(f"127.0.0.1:{vm.grpc_port}") as ch:
        stub = rpc.FlowServiceStub(ch)
        filtered = flowlib.Collector(stub, pb.StreamFlowsRequest(
            follow=True, allow=[pb.FlowFilter(destination_port=[FILTERED_PORT])]))
        everything = flowlib.Collector(stub, pb.StreamFlowsRequest(follow=True))
        # JSONL writer plus the two streams.
        wait_for("three subscribers", lambda: len(
            stub.GetStatus(pb.GetStatusRequest(), timeout=20).subscribers) == 3)

        with vm.capture(f"tcp port {FILTERED_PORT} or tcp port {OTHER_PORT}") as cap:
            for port in (FILTERED_PORT, OTHER_PORT):
                for _ in range(REQUESTS):
                    vm.run(f"wget -q -O /dev/null http://127.0.0.1:{port}/index.html", check=True)
        out = vm.run(f"sh {WORKDIR}/pod-client.sh", check=True).out
        assert "slow" in out
        pod_pid = int(vm.run(f"cat {WORKDIR}/pod-client.pid", check=True).out)

        clients = {port: {k[1][1] for k in cap.totals.sent
                          if k[0] == "tcp" and k[2] == ("127.0.0.1", port) and k[1][1] != port}
                   for port in (FILTERED_PORT, OTHER_PORT)}
        assert all(len(c) == REQUESTS for c in clients.values()), clients

        def client_flows(coll, port):
            return {f.local.port for f in coll.final()
                    if f.remote.port == port and f.local.port in clients[port]}
        wait_for("the filtered stream's final client flows",
                 lambda: client_flows(filtered, FILTERED_PORT) == clients[FILTERED_PORT])
        wait_for("the unfiltered stream's final client flows",
                 lambda: client_flows(everything, OTHER_PORT) == clients[OTHER_PORT])
        pod_flow = wait_for("the pod client's flow", lambda: next(
            (f for f in everything.final() if f.remote.port == SLOW_PORT and f.process.pid == pod_pid), None))
        assert pod_flow.container_id == CONTAINER_ID, pod_flow
        assert pod_flow.pod_uid == POD_UID, pod_flow

        # Metrics against GetStatus: scrape, status, scrape.
        m1 = scrape(vm)
        st = stub.GetStatus(pb.GetStatusRequest(), timeout=20)
        m2 = scrape(vm)
        compare_metrics_with_status(m1, st, m2)
        assert st.flows_received >= 2 * REQUESTS + 1
        jsonl_subs = [s for s in st.subscribers if s.peer == f"jsonl:{JSONL}"]
        assert len(jsonl_subs) == 1, st.subscribers
        # The node's facts, against the guest's own.
        uname = vm.run("uname -n; uname -m; uname -r", check=True).out.split("\n")
        node = st.node
        assert [node.hostname, node.architecture, node.kernel_release] == [u.strip() for u in uname[:3]], node
        assert GUEST_V4 in node.ip_addresses and "127.0.0.1" not in node.ip_addresses, node
        os_name = vm.run(". /etc/os-release 2>/dev/null && echo \"$NAME\"").out.strip()
        assert node.os_name == os_name, (node.os_name, os_name)

        # Stop: the engine flushes, every subscriber sees the same tail.
        assert vm.stop_daemon("TERM") == 0
        for c in (filtered, everything):
            c.thread.join(timeout=30)
            assert not c.thread.is_alive(), "stream did not end with the daemon"

    lines = vm.fetch(JSONL).decode().splitlines()
    docs = [json.loads(line) for line in lines]
    assert docs, "JSONL output is empty"
    assert all(d["flow"]["final"] for d in docs), "interim records without include_updates"
    assert all(d["destination"]["port"] == FILTERED_PORT for d in docs)
    assert all(d["host"]["os"]["kernel"] == node.kernel_release and GUEST_V4 in d["host"]["ip"]
               and d["agent"]["type"] == "sockscope" for d in docs), docs[0]
    from_jsonl = sorted((int(d["flow"]["id"]), d["source"]["port"], d["destination"]["port"]) for d in docs)
    from_grpc = sorted((f.id, f.source.port, f.destination.port) for f in filtered.final())
    assert from_jsonl == from_grpc
    # The filter excluded real flows: the unfiltered stream saw the 8081 ones.
    assert {f.id for f in everything.final() if f.destination.port == OTHER_PORT}
    assert not {f.id for f in filtered.final() if f.destination.port != FILTERED_PORT}
    # Everything delivered to the JSONL subscriber by the status read was written.
    assert len(docs) >= jsonl_subs[0].delivered > 0
    assert jsonl_subs[0].drops == 0
