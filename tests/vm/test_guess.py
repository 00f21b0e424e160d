"""Struct offsets without BTF: runtime guessing, cross-checked against BTF.

On every kernel: the offsets `sockscope check` resolves with
`socket.offsets=guess` equal the BTF ones field by field; with BTF hidden
(`/dev/null` bind-mounted over `/sys/kernel/btf/vmlinux`) `auto` falls back
to guessing and says so, `btf` fails; and the daemon running on guessed
offsets reports a loopback TCP flow whose counters equal the packet capture
(short only by packet-probe hits the kernel counted as missed, see
:class:`flowlib.Scenario`).
"""

from __future__ import annotations

import re
import time

import grpc

import flowlib
import grpc_client

GUEST_BIN = "/usr/bin/sockscope"
VMLINUX_BTF = "/sys/kernel/btf/vmlinux"
#: `sockscope check` offset lines: "  sock_common.skc_family       offset   16 size   2".
OFFSET_LINE = re.compile(r"^\s+(\S+)\s+offset\s+(\d+)\s+size\s+(\d+)", re.M)
#: Exit code of `check` when BTF is required but unreadable (ProbeError::Btf).
EXIT_BTF = 16
#: Exit code of `check` on a kernel with kprobes but no problem: the guest has them all.
EXIT_OK = 0
HTTP_PORT = 8081
DAEMON_ARGS = ["-E", "socket.offsets=guess", "-E", "socket.flow_inactive_timeout=2s",
               "-E", "socket.flow_termination_timeout=1s"]
FLOW_WAIT_S = 90
#: Fields whose size is not observable by guessing (compared by offset only).
OFFSET_ONLY = {"sock.__sk_common"}
#: Members only BTF gives (socket-counter accounting), never guessed.
BTF_ONLY = {"tcp_sock.bytes_received", "tcp_sock.bytes_sent", "tcp_sock.bytes_retrans",
            "tcp_sock.segs_in", "tcp_sock.segs_out", "sock.sk_flags", "sk_buff.sk",
            "inet_sock.inet_sport"}


def check_offsets(vm, mode: str) -> tuple[str, dict[str, tuple[int, int]]]:
    r = vm.run(f"{GUEST_BIN} check -E socket.offsets={mode} -E socket.dns.enabled=false", timeout=180)
    assert r.rc == EXIT_OK, f"check with offsets={mode} failed ({r.rc}):\n{r.out}\n{r.err}"
    fields = {m.group(1): (int(m.group(2)), int(m.group(3))) for m in OFFSET_LINE.finditer(r.out)}
    assert len(fields) >= 25, f"too few offsets printed for {mode}:\n{r.out}"
    return r.out, fields


def test_guessed_offsets_equal_btf(vm):
    _, btf = check_offsets(vm, "btf")
    out, guessed = check_offsets(vm, "guess")
    assert "guess" in out
    assert BTF_ONLY <= set(btf) and not BTF_ONLY & set(guessed), f"BTF-only members: {sorted(btf)}"
    assert "socket-counter accounting unavailable" in out, out
    btf = {k: v for k, v in btf.items() if k not in BTF_ONLY}
    assert set(btf) == set(guessed), f"field sets differ: {set(btf) ^ set(guessed)}"
    diffs = {k: (btf[k], guessed[k]) for k in btf
             if (btf[k][0] != guessed[k][0]) or (k not in OFFSET_ONLY and btf[k][1] != guessed[k][1])}
    assert not diffs, f"{vm.suite}: guessed offsets differ from BTF (btf, guess): {diffs}"
    # Nothing of the guessing is left behind.
    events = vm.run("cat /sys/kernel/tracing/kprobe_events", check=True).out
    assert "sockscope" not in events, events
    instances = vm.run("ls /sys/kernel/tracing/instances", check=True).out
    assert "sockscope" not in instances, instances
    addrs = vm.run("ip -6 addr show dev lo", check=False).out
    assert "fd" not in addrs.lower() or "fd00:5c0" in addrs.lower(), addrs


def test_btf_hidden_falls_back_to_guessing(vm):
    _, btf = check_offsets(vm, "btf")
    vm.run(f"mount --bind /dev/null {VMLINUX_BTF}", check=True)
    try:
        r = vm.run(f"{GUEST_BIN} check -E socket.offsets=btf -E socket.dns.enabled=false", timeout=120)
        assert r.rc == EXIT_BTF, f"btf mode with BTF hidden: expected exit {EXIT_BTF}, got {r.rc}\n{r.out}"
        out, auto = check_offsets(vm, "auto")
        assert re.search(r"offsets.*guess", out), f"auto mode does not say it guessed:\n{out}"
        assert {k: v[0] for k, v in auto.items()} == {k: v[0] for k, v in btf.items() if k not in BTF_ONLY}
    finally:
        vm.run(f"umount {VMLINUX_BTF}", check=True)


def test_flow_on_guessed_offsets_matches_capture(vm):
    pb, rpc = grpc_client.load_stubs()
    vm.start_daemon(DAEMON_ARGS, timeout=180)
    vm.run(f"netstat -ltn | grep -q ':{HTTP_PORT} ' || httpd -p {HTTP_PORT} -h /www", check=True)
    with grpc.insecure_channel(f"127.0.0.1:{vm.grpc_port}") as ch:
        stub = rpc.FlowServiceStub(ch)
        status = stub.GetStatus(pb.GetStatusRequest(), timeout=30)
        assert status.offsets_source.startswith("guess"), status.offsets_source
        stream = stub.StreamFlows(pb.StreamFlowsRequest(follow=True), timeout=FLOW_WAIT_S)
        time.sleep(1)  # let the subscription register before the traffic
        with flowlib.scenario(vm, f"tcp port {HTTP_PORT}") as sc:
            # The shell prints its pid, then becomes wget (same pid).
            wget = vm.run(f"sh -c 'echo $$; exec wget -q -O /dev/null http://127.0.0.1:{HTTP_PORT}/index.html'",
                          check=True)
        client = next(k for k in sc.totals.sent if k[0] == "tcp" and k[2] == ("127.0.0.1", HTTP_PORT))
        flows = {}
        for resp in stream:
            if resp.WhichOneof("event") != "flow" or not resp.flow.final:
                continue
            f = resp.flow
            key = (f.local.port, f.remote.port)
            if key in ((client[1][1], HTTP_PORT), (HTTP_PORT, client[1][1])):
                flows[key] = f
            if len(flows) == 2:
                break
        stream.cancel()
    assert len(flows) == 2, f"expected client and server flows, got {list(flows)}"
    for f in flows.values():
        sc.expect([f], "tcp")
    sc.verdict()
    client_flow = flows[(client[1][1], HTTP_PORT)]
    # Attributed to the wget process itself. (Its name can read "exe": busybox
    # re-executes itself through /proc/self/exe, and a process that has
    # already exited cannot be looked up in /proc any more.)
    assert client_flow.process.pid == int(wget.out.split()[0]), client_flow.process
    assert client_flow.network.direction == pb.DIRECTION_EGRESS
    assert flows[(HTTP_PORT, client[1][1])].network.direction == pb.DIRECTION_INGRESS
    assert vm.stop_daemon("TERM") == 0
