"""Kernel facilities sockscope depends on, checked in every kernel suite.

These run without the daemon: kprobes through tracefs, BTF, AF_PACKET
capture (and the pcap oracle on real captures), host → guest port
forwarding.  The kernel's release and the presence of the functions the
probe set may use are written to ``<logs>/<suite>/facts.json``.
"""

from __future__ import annotations

import json
import secrets
import socket
import time

import pytest

import oracle

#: Kernel functions the probe set may attach to; presence is recorded.
CANDIDATE_FUNCTIONS = (
    "ip_output", "ip6_output", "ip_local_deliver", "ip6_input", "tcp_v4_rcv", "tcp_v6_rcv",
    "tcp_connect", "inet_csk_accept", "inet_release", "udp_sendmsg", "udpv6_sendmsg", "udp_recvmsg",
    "udpv6_recvmsg", "tcp_sendmsg", "tcp_recvmsg", "sock_init_data", "inet_create", "inet6_create",
    "commit_creds", "kernel_clone", "do_exit", "__udp_enqueue_schedule_skb", "udp_queue_rcv_skb",
    "udpv6_queue_rcv_skb", "tcp_v4_do_rcv", "tcp_v6_do_rcv", "__ip_local_out", "ip_local_out",
    "ip6_xmit", "inet6_csk_xmit",
)
#: Older or alternative names, recorded as well (not probed).
LEGACY_FUNCTIONS = ("_do_fork", "do_fork", "ip_local_out_sk", "tcp_v4_connect", "tcp_v6_connect",
                    "udp_v4_rcv", "udp_v6_rcv", "__sys_connect", "security_socket_connect")
TRACING = "/sys/kernel/tracing"
HTTP_PORT = 8080
#: Size of /www/index.html in the initramfs (19 bytes * 64).
INDEX_SIZE = 19 * 64
#: Minimum size of a plausible vmlinux BTF blob.
MIN_BTF_BYTES = 1 << 20
#: Guest-side wait for a listener before the host connects.
LISTEN_WAIT_S = 20


def _write_facts(vm, **facts) -> None:
    path = vm.logdir / "facts.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(facts)
    path.write_text(json.dumps(data, indent=1))


def _ensure_httpd(vm) -> None:
    vm.run(f"netstat -ltn | grep -q ':{HTTP_PORT} ' || httpd -p {HTTP_PORT} -h /www", check=True)


def test_release_and_btf(vm):
    r = vm.run("uname -r", check=True)
    assert r.out.strip() == vm.kernel.release
    size = vm.run("stat -c %s /sys/kernel/btf/vmlinux", check=True)
    assert int(size.out) >= MIN_BTF_BYTES
    _write_facts(vm, release=r.out.strip(), btf_bytes=int(size.out), boot_s=round(vm.boot_seconds, 1))


def test_available_filter_functions(vm):
    listing = vm.fetch(f"{TRACING}/available_filter_functions", timeout=120).decode()
    counts: dict[str, int] = {}
    for line in listing.splitlines():
        if line.strip():
            name = line.split()[0]
            counts[name] = counts.get(name, 0) + 1
    names = set(counts)
    assert len(names) > 1000, "available_filter_functions is implausibly short"
    present = [f for f in CANDIDATE_FUNCTIONS if f in names]
    missing = [f for f in CANDIDATE_FUNCTIONS if f not in names]
    # A name listed more than once is several static functions: a kprobe on it is ambiguous.
    ambiguous = {f: counts[f] for f in present if counts[f] > 1}
    _write_facts(vm, filter_functions_present=present, filter_functions_missing=missing,
                 filter_functions_ambiguous=ambiguous, filter_functions_total=len(names),
                 legacy_functions_present=[f for f in LEGACY_FUNCTIONS if f in names])
    # What the smoke probes below attach to must be there on every kernel.
    assert "tcp_connect" in names and "tcp_v4_rcv" in names and "inet_csk_accept" in names


def test_kprobe_accepted_per_candidate_function(vm):
    """Register an entry kprobe on every candidate; record which the kernel accepts."""
    script = "; ".join(
        f"if echo 'p:facts/f{i} {f}' >> {TRACING}/kprobe_events 2>/dev/null; then echo 'ok {f}'; "
        f"echo '-:facts/f{i}' >> {TRACING}/kprobe_events; else echo 'no {f}'; fi"
        for i, f in enumerate(CANDIDATE_FUNCTIONS))
    out = vm.run(script, timeout=120, check=True).out.split("\n")
    verdict = dict(reversed(line.split(" ", 1)) for line in out if line.strip())
    assert set(verdict) == set(CANDIDATE_FUNCTIONS), f"incomplete probe report: {out}"
    rejected = [f for f in CANDIDATE_FUNCTIONS if verdict[f] != "ok"]
    def accepted(fetch: str) -> bool:
        return vm.run(f"echo 'p:facts/fa tcp_connect {fetch}' >> {TRACING}/kprobe_events && "
                      f"echo '-:facts/fa' >> {TRACING}/kprobe_events").rc == 0

    # $argN (4.20+) and BTF-typed arguments by name with member access (CONFIG_PROBE_EVENTS_BTF_ARGS).
    _write_facts(vm, kprobe_rejected=rejected, kprobe_argn=accepted("sk=$arg1:x64"),
                 kprobe_btf_args=accepted("dport=sk->__sk_common.skc_dport"))
    assert "facts/" not in vm.run(f"cat {TRACING}/kprobe_events").out, "probes were not removed"
    # These are the backbone of any probe set; every supported kernel must accept them.
    for f in ("tcp_connect", "inet_csk_accept", "udp_sendmsg", "inet_release"):
        assert f not in rejected, f"{vm.suite}: kprobe on {f} rejected"


def test_kprobes_fire_on_tcp_connection(vm):
    _ensure_httpd(vm)
    probes = ["p:smoke/tcp_connect tcp_connect sk=%di:x64",
              "p:smoke/tcp_v4_rcv tcp_v4_rcv skb=%di:x64",
              "r:smoke/accept_ret inet_csk_accept ret=$retval:x64"]
    setup = " && ".join(f"echo '{p}' >> {TRACING}/kprobe_events" for p in probes)
    try:
        vm.run(f"echo 0 > {TRACING}/tracing_on; echo > {TRACING}/trace; {setup} && "
               f"echo 1 > {TRACING}/events/smoke/enable && echo 1 > {TRACING}/tracing_on", check=True)
        listed = vm.run(f"cat {TRACING}/kprobe_events", check=True).out
        assert "smoke/tcp_connect" in listed and "smoke/accept_ret" in listed
        vm.run(f"wget -q -O /dev/null http://127.0.0.1:{HTTP_PORT}/index.html", check=True)
        trace = vm.run(f"echo 0 > {TRACING}/tracing_on; cat {TRACING}/trace", check=True).out
    finally:
        vm.run(f"echo 0 > {TRACING}/events/smoke/enable; echo '-:smoke/tcp_connect' >> {TRACING}/kprobe_events;"
               f"echo '-:smoke/tcp_v4_rcv' >> {TRACING}/kprobe_events; echo '-:smoke/accept_ret' >> "
               f"{TRACING}/kprobe_events; echo 1 > {TRACING}/tracing_on")
    lines = [line for line in trace.splitlines() if not line.startswith("#")]
    connects = [line for line in lines if "tcp_connect:" in line]
    assert any("wget" in line for line in connects), f"no tcp_connect hit from wget in trace:\n{trace[-3000:]}"
    assert any("tcp_v4_rcv:" in line for line in lines), f"no tcp_v4_rcv hit:\n{trace[-3000:]}"
    assert any("accept_ret:" in line and "ret=0x" in line for line in lines), f"no accept return:\n{trace[-3000:]}"
    assert "smoke" not in vm.run(f"cat {TRACING}/kprobe_events").out, "smoke probes were not removed"


def test_capture_oracle_on_loopback_tcp_and_udp(vm):
    _ensure_httpd(vm)
    payload = secrets.token_hex(50)  # 100 bytes
    with vm.capture() as cap:
        vm.run(f"wget -q -O /dev/null http://127.0.0.1:{HTTP_PORT}/index.html", check=True)
        vm.run(f"wget -q -O /dev/null 'http://[::1]:{HTTP_PORT}/index.html'", check=True)
        vm.run(f"printf %s {payload} | socat -u - UDP4-SENDTO:127.0.0.1:9001", check=True)
    t = cap.totals
    # Loopback: every packet is both sent and received by this host (and captured once).
    assert t.sent and dict(t.sent) == dict(t.received), "loopback packets not seen once in each direction"
    for ip in ("127.0.0.1", "::1"):
        clients = [k for k in t.sent if k[0] == "tcp" and k[2] == (ip, HTTP_PORT)]
        assert len(clients) == 1, f"expected one HTTP client flow to {ip}: {sorted(t.tuples())}"
        _, client, server = clients[0]
        ft = t.flow("tcp", client, server)
        hdr = 20 if ":" not in ip else 40
        # client sends SYN, ACK, request, FIN...; server returns the page plus headers
        assert ft.local.packets >= 3 and ft.remote.packets >= 3
        assert ft.remote.bytes > INDEX_SIZE + 3 * (hdr + 20)
    udp = [k for k in t.sent if k[0] == "udp" and k[2] == ("127.0.0.1", 9001)]
    assert len(udp) == 1
    ut = t.flow("udp", udp[0][1], udp[0][2])
    assert ut.local == oracle.Counter(1, len(payload) + 28)


def test_hostfwd_reaches_guest_listener(vm):
    token = secrets.token_hex(16)
    port = 50051  # the forwarded gRPC port; the daemon is not running here
    with vm.capture(bpf=f"tcp port {port}") as cap:
        srv = vm.spawn(f"nc -l -p {port} > /tmp/hostfwd.txt")
        deadline = time.monotonic() + LISTEN_WAIT_S
        while f":{port} " not in vm.run("netstat -ltn").out:
            assert time.monotonic() < deadline, "guest nc did not start listening"
            time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", vm.grpc_port), timeout=10) as s:
            s.sendall(token.encode() + b"\n")
        assert srv.wait(30) == 0
    assert vm.run("cat /tmp/hostfwd.txt", check=True).out.strip() == token
    inbound = [k for k in cap.totals.received if k[2] == ("10.0.2.15", port)]
    assert inbound, f"no inbound eth0 packets to 10.0.2.15:{port}: {sorted(cap.totals.tuples())}"
    ft = cap.totals.flow("tcp", ("10.0.2.15", port), inbound[0][1])
    assert ft.remote.bytes >= len(token) + 1 + 3 * 40 and ft.local.packets >= 2
