"""DNS enrichment end to end: names from captured responses reach the flows
of the process that resolved them, and only those.

Guest set-up (per test, undone afterwards):

* **server**: dnsmasq (the host's ``/usr/sbin/dnsmasq`` from Debian's
  ``dnsmasq-base``, copied into the guest with the shared libraries the
  initramfs lacks) on 127.0.0.1:53, answering ``web4.sockscope.test`` with
  the guest's eth0 IPv4 address (A) and ``web6.sockscope.test`` with its
  IPv6 address (AAAA), nothing upstream;
* **client**: socat, which resolves through glibc's ``getaddrinfo`` (the
  host's glibc; since 2.34 its DNS backend is built into libc.so.6, so only
  ``/etc/resolv.conf`` and ``hosts: files dns`` in ``/etc/nsswitch.conf``
  are needed).  busybox tools do not do: busybox ``nslookup`` resolves but
  never connects, and busybox-static's ``wget`` would need glibc's NSS
  modules at run time;
* **servers for the workload**: busybox httpd on TCP 8080 and 8081, socat
  UDP receivers on 9001 and 9002 (all dual-stack).

Workload: socat resolves ``web4``/``web6`` and talks to port 8080 (TCP) and
9001 (UDP), one process per connection; then socat processes that did not
resolve anything talk to the same addresses by literal, on ports 8081 and
9002 (so each client flow is identified by its remote endpoint alone).

With DNS enabled exactly the four resolving flows carry a name (remote
side); every other flow (the non-resolving clients, the servers' side, the
DNS queries) has none.  With ``socket.dns.enabled=false`` no flow has a
name and the same client flows are reported.

The capture covers the workload's DNS traffic too (UDP port 53), and the
workload is the only DNS user while the daemon runs, so in both runs:

* every client flow's counters equal the capture's, short only by
  packet-probe hits the kernel counted as missed (:class:`flowlib.Scenario`);
* with DNS enabled the status API's ``dns.packets`` equals the DNS
  responses captured (UDP from port 53; on ``lo`` each is captured once,
  and the daemon reads only the incoming copy), ``dns.answers`` equals the
  A/AAAA records in their answer sections (each response answers a query a
  workload process sent, so every answer is kept for that process),
  ``dns.parse_errors`` is 0; ``dns.entries`` is a snapshot of tables whose
  per-process part empties as the resolving processes' grace ends, so only
  a lower bound is checked: the distinct address/name pairs answered, which
  the host-wide table keeps;
* with DNS disabled all those counters are 0 while the capture shows the
  responses.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

import flowlib
import grpc_client
import oracle

#: The DNS server binary on the host (Debian package dnsmasq-base).
DNSMASQ = Path("/usr/sbin/dnsmasq")
#: Guest addresses the names resolve to (eth0, set up by the bed's init).
GUEST_V4 = "10.0.2.15"
GUEST_V6 = "fd00:5c0:5c0::15"
NAME_V4 = "web4.sockscope.test"
NAME_V6 = "web6.sockscope.test"
#: Ports: resolved clients use the first of each pair, literal ones the second.
TCP_NAMED, TCP_LITERAL = 8080, 8081
UDP_NAMED, UDP_LITERAL = 9001, 9002
DNS_PORT = 53
#: Short timeouts so flows are final soon after the workload.
DAEMON_ARGS = ["-E", "socket.flow_inactive_timeout=2s", "-E", "socket.flow_termination_timeout=1s"]
#: How long to wait for all client flows' final records.
FLOW_WAIT_S = 90
#: How long to wait for dnsmasq to answer.
DNS_READY_S = 30
#: The guest's original resolver configuration (see bed.py / init.sh).
ORIG_NSSWITCH = "passwd: files\ngroup: files\nhosts: files\n"
HTTP_REQUEST = r"printf 'GET /index.html HTTP/1.0\r\n\r\n'"

#: Client flows: (transport, remote ip, remote port) -> expected domain with DNS on.
CLIENT_FLOWS = {
    ("tcp", GUEST_V4, TCP_NAMED): NAME_V4,
    ("tcp", GUEST_V6, TCP_NAMED): NAME_V6,
    ("udp", GUEST_V4, UDP_NAMED): NAME_V4,
    ("udp", GUEST_V6, UDP_NAMED): NAME_V6,
    ("tcp", GUEST_V4, TCP_LITERAL): "",
    ("tcp", GUEST_V6, TCP_LITERAL): "",
    ("udp", GUEST_V4, UDP_LITERAL): "",
    ("udp", GUEST_V6, UDP_LITERAL): "",
}

WORKLOAD = [
    # Resolving clients (getaddrinfo with AF_INET / AF_INET6: one A or AAAA query each).
    f"{HTTP_REQUEST} | socat - TCP4:{NAME_V4}:{TCP_NAMED} >/dev/null",
    f"{HTTP_REQUEST} | socat - TCP6:{NAME_V6}:{TCP_NAMED} >/dev/null",
    f"echo named | socat -u - UDP4-SENDTO:{NAME_V4}:{UDP_NAMED}",
    f"echo named | socat -u - UDP6-SENDTO:{NAME_V6}:{UDP_NAMED}",
    # Same addresses by literal, after the answers are known host-wide.
    f"{HTTP_REQUEST} | socat - TCP4:{GUEST_V4}:{TCP_LITERAL} >/dev/null",
    f"{HTTP_REQUEST} | socat - TCP6:[{GUEST_V6}]:{TCP_LITERAL} >/dev/null",
    f"echo literal | socat -u - UDP4-SENDTO:{GUEST_V4}:{UDP_LITERAL}",
    f"echo literal | socat -u - UDP6-SENDTO:[{GUEST_V6}]:{UDP_LITERAL}",
]


def _ldd(binary: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and parts[parts.index("=>") + 1].startswith("/"):
            libs.append(Path(parts[parts.index("=>") + 1]))
        elif parts and parts[0].startswith("/"):
            libs.append(Path(parts[0]))
    return libs


def _install_dnsmasq(vm) -> None:
    """Copy dnsmasq and the libraries the guest lacks (once per boot)."""
    if vm.run("test -x /usr/sbin/dnsmasq").rc == 0:
        return
    assert DNSMASQ.exists(), f"{DNSMASQ} missing on the host: apt-get install dnsmasq-base"
    libs = _ldd(DNSMASQ)
    have = vm.run("ls -d " + " ".join(str(p) for p in libs) + " 2>/dev/null").out.split()
    for lib in libs:
        if str(lib) not in have:
            vm.put(str(lib), lib.resolve().read_bytes(), mode=0o755)
    vm.put("/usr/sbin/dnsmasq", DNSMASQ.read_bytes(), mode=0o755)


@pytest.fixture
def dns_guest(vm):
    """dnsmasq, resolver configuration and the workload's servers; undone afterwards."""
    _install_dnsmasq(vm)
    spawned = []
    try:
        spawned.append(vm.spawn(
            "exec /usr/sbin/dnsmasq -k --user=root --group=root --pid-file= --no-resolv --no-hosts "
            "--no-poll --listen-address=127.0.0.1 --bind-interfaces --port=53 --log-queries "
            f"--log-facility=- --address=/{NAME_V4}/{GUEST_V4} --address=/{NAME_V6}/{GUEST_V6}"))
        deadline = time.monotonic() + DNS_READY_S
        while vm.run(f"nslookup {NAME_V4} 127.0.0.1 2>&1 | grep -q {GUEST_V4}").rc != 0:
            assert spawned[0].alive(), f"dnsmasq exited: {spawned[0].log()}"
            assert time.monotonic() < deadline, f"dnsmasq not answering: {spawned[0].log()}"
            time.sleep(0.5)
        vm.put("/etc/resolv.conf", b"nameserver 127.0.0.1\noptions timeout:5 attempts:3\n")
        vm.put("/etc/nsswitch.conf", ORIG_NSSWITCH.replace("hosts: files", "hosts: files dns").encode())
        for port in (TCP_NAMED, TCP_LITERAL):
            spawned.append(vm.spawn(f"exec httpd -f -p {port} -h /www"))
        for port in (UDP_NAMED, UDP_LITERAL):
            spawned.append(vm.spawn(f"exec socat -u UDP6-RECV:{port},ipv6only=0 /dev/null"))
        vm.run(f"n=0; while [ $n -lt 100 ] && ! netstat -ltn | grep -q ':{TCP_LITERAL} '; "
               "do usleep 100000; n=$((n+1)); done", check=True)
        yield spawned[0]
    finally:
        for p in spawned:
            p.signal("KILL")
        vm.put("/etc/nsswitch.conf", ORIG_NSSWITCH.encode())
        vm.put("/etc/resolv.conf", b"")


class Collector:
    """Collects final flow records from a StreamFlows subscription on a thread."""

    def __init__(self, pb, rpc, channel):
        self.flows = []
        self.cond = threading.Condition()
        self.stream = rpc.FlowServiceStub(channel).StreamFlows(pb.StreamFlowsRequest(follow=True),
                                                                timeout=FLOW_WAIT_S + 60)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for resp in self.stream:
                if resp.WhichOneof("event") == "flow" and resp.flow.final:
                    with self.cond:
                        self.flows.append(resp.flow)
                        self.cond.notify_all()
        except grpc.RpcError:
            pass

    def wait_for(self, pred, timeout: float) -> list:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred(self.flows):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return list(self.flows)

    def close(self):
        self.stream.cancel()
        self.thread.join(10)


def _key(pb, f):
    transport = "tcp" if f.network.transport == pb.TRANSPORT_TCP else "udp"
    return (transport, f.remote.ip, f.remote.port)


def _client_flows(pb, flows) -> dict:
    """The final record of each expected client flow (remote endpoint is the server)."""
    found = {}
    for f in flows:
        k = _key(pb, f)
        if k in CLIENT_FLOWS and f.local.port != f.remote.port:
            assert k not in found, f"two client flows to {k}: {found[k]} and {f}"
            found[k] = f
    return found


def _run_workload(vm, dns_enabled: bool):
    pb, rpc = grpc_client.load_stubs()
    vm.start_daemon(DAEMON_ARGS + ["-E", f"socket.dns.enabled={'true' if dns_enabled else 'false'}"])
    with grpc.insecure_channel(f"127.0.0.1:{vm.grpc_port}") as ch:
        col = Collector(pb, rpc, ch)
        try:
            time.sleep(1)  # let the subscription register
            bpf = " or ".join([f"tcp port {p}" for p in (TCP_NAMED, TCP_LITERAL)]
                              + [f"udp port {p}" for p in (UDP_NAMED, UDP_LITERAL, DNS_PORT)])
            with flowlib.scenario(vm, bpf) as sc:
                for cmd in WORKLOAD:
                    vm.run(cmd, timeout=60, check=True)
            flows = col.wait_for(lambda fl: len(_client_flows(pb, fl)) == len(CLIENT_FLOWS), FLOW_WAIT_S)
            status = rpc.FlowServiceStub(ch).GetStatus(pb.GetStatusRequest(), timeout=20)
        finally:
            col.close()
    clients = _client_flows(pb, flows)
    missing = set(CLIENT_FLOWS) - set(clients)
    assert not missing, f"no final record for client flows {sorted(missing)}; got {[_key(pb, f) for f in flows]}"
    for k, f in clients.items():
        assert f.process.name == "socat" or f.process.executable.endswith("/socat"), (k, f.process)
        sc.expect([f], k[0])
    sc.verdict()
    assert vm.stop_daemon("TERM") == 0
    return pb, flows, clients, status, sc


def _captured_dns(sc) -> tuple[int, int, set]:
    """DNS responses in the capture: (how many, their A/AAAA answers, the responses)."""
    responses = [p for p in sc.packets if p.proto == "udp" and p.src[1] == DNS_PORT]
    answers = [oracle.dns_answers(p.udp_payload) for p in responses]
    assert None not in answers, f"a captured DNS response is cut short or malformed: {responses}"
    return len(responses), sum(answers), responses


def _answered(log: str, name: str, ip: str) -> bool:
    """dnsmasq logged an answer (``config`` for --address names) of ``name`` with ``ip``."""
    return re.search(rf"(reply|config) {re.escape(name)} is {re.escape(ip)}", log) is not None


def test_resolved_flows_carry_the_name(vm, dns_guest):
    pb, flows, clients, status, sc = _run_workload(vm, dns_enabled=True)
    for k, f in clients.items():
        assert f.remote.domain == CLIENT_FLOWS[k], f"{k}: domain {f.remote.domain!r}"
        assert f.local.domain == "", f"{k}: local side named {f.local.domain!r}"
    named = {(_key(pb, f), f.remote.domain) for f in flows if f.remote.domain or f.local.domain}
    want = {(k, d) for k, d in CLIENT_FLOWS.items() if d}
    assert named == want, f"flows with a name: {sorted(named)}"
    packets, answers, _ = _captured_dns(sc)
    # One query per resolving client, each answered with the name's address.
    assert packets >= 4 and answers >= 4, f"the capture shows {packets} responses with {answers} answers"
    assert (status.dns.packets, status.dns.answers) == (packets, answers), \
        f"status {status.dns}; the capture has {packets} DNS responses with {answers} A/AAAA answers"
    assert status.dns.parse_errors == 0, status.dns
    pairs = {(NAME_V4, GUEST_V4), (NAME_V6, GUEST_V6)}
    assert status.dns.entries >= len(pairs), status.dns
    assert _answered(dns_guest.log(), NAME_V6, GUEST_V6)


def test_dns_disabled_names_nothing(vm, dns_guest):
    pb, flows, clients, status, sc = _run_workload(vm, dns_enabled=False)
    assert not [f for f in flows if f.remote.domain or f.local.domain]
    assert (status.dns.packets, status.dns.answers, status.dns.entries) == (0, 0, 0), status.dns
    # The queries did happen and were answered (the workload's socat calls also fail otherwise).
    packets, answers, _ = _captured_dns(sc)
    assert packets >= 4 and answers >= 4, f"the capture shows {packets} responses with {answers} answers"
    assert _answered(dns_guest.log(), NAME_V6, GUEST_V6), dns_guest.log()
