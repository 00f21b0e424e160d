"""Socket-counter accounting (``socket.accounting=socket_counters``) against the capture.

TCP flows take their counters from the kernel's own socket counters, read
by one probe when the socket ends (``tcp_v4_destroy_sock``, once per
socket); UDP stays per packet, with egress read at
``ip_output`` behind an in-kernel filter that lets only UDP through. What
the counters mean is checked against tcpdump on the same traffic:

* bytes are TCP payload bytes, each byte once: equal, per side, to the sum
  of the payload lengths of the captured segments (no retransmission on
  loopback);
* packets are TCP segments as the socket counts them: never more, per side,
  than the captured segments, and never fewer than those minus the ones
  only another socket can have handled: the SYN-ACKs, which the listener's
  request socket sends before the connection's own socket exists, and, when
  the handshake or the close was retransmitted under emulation, the extra
  handshake and TIME_WAIT segments (counted from the capture: segments
  with SYN, and those after the first FIN of each side beyond one); in the
  common case exactly the capture minus the SYN-ACK (see the README);
* direction, ``complete``, process and user as in per-packet accounting.

A flow whose close sample the kernel dropped (a missed hit of that one
probe, read from ``kprobe_profile``) is reported as uncounted; that is the
only allowance. The probe set itself is checked: none of the per-packet TCP
probes is installed.
"""

from __future__ import annotations

import flowlib
import oracle
from flowlib import CLIENT_USER, SERVER_USER, FlowStream

#: Guest ports of the scenario.
TCP_PORT = 9300
DOWNLOAD_PORT = 9301
UDP_PORT = 9302
#: Connections of the churn, and the bytes each client sends.
CONNECTIONS = 8
CLIENT_BYTES = 3000
#: Seconds of the download (a 4 KiB block every 100 ms).
DOWNLOAD_S = 2
#: Datagrams of the UDP client, and their size.
DATAGRAMS = 5
DATAGRAM_SIZE = 200
#: Probes per-packet accounting installs and socket-counter accounting must not.
PER_PACKET_ONLY = ("ip_out", "ip_in")
#: Per-call probes no mode installs any more.
RETIRED = ("tcp_send", "tcp_recv", "udp_send", "udp_recv", "udp6_send", "udp6_recv")
#: Probes only socket-counter accounting installs.
COUNTERS_ONLY = ("tcp_end", "udp_out")


#: TCP flags.
SYN, FIN, ACK = 0x02, 0x01, 0x10


def _captured(sc, src: tuple[str, int], dst: tuple[str, int]) -> tuple[int, int, int]:
    """(segments, payload bytes, segments another socket may have handled) the capture saw
    from ``src`` to ``dst``: SYN-ACKs (the request socket), extra SYNs (retransmitted), and
    segments of either side after that side's first FIN beyond the one ACK that closes it
    (TIME_WAIT)."""
    src, dst = oracle._norm(src), oracle._norm(dst)
    both = sorted((p for p in sc.packets if p.proto == "tcp" and {p.src, p.dst} == {src, dst}),
                  key=lambda p: p.ts)
    segs = [p for p in both if p.src == src]
    others = sum(1 for p in segs if p.tcp_flags & SYN and p.tcp_flags & ACK)
    others += max(0, sum(1 for p in segs if p.tcp_flags & SYN and not p.tcp_flags & ACK) - 1)
    fins = [i for i, p in enumerate(both) if p.tcp_flags & FIN]
    if fins:
        after = [p for p in both[fins[0] + 1:] if p.src == src]
        others += max(0, len(after) - 2)
    return len(segs), sum(p.tcp_payload for p in segs), others


def test_socket_counters_against_the_capture(vm):
    flowlib.install_guest_tools(vm)
    flowlib.start_daemon(vm, "btf", ["-E", "socket.accounting=socket_counters"])
    group = flowlib.probe_group(vm)
    events = vm.run(f"cat {flowlib.KPROBE_EVENTS}", check=True).out
    ours = {line.split()[0].split("/", 1)[1] for line in events.splitlines()
            if line.strip() and line.split()[0].split(":", 1)[-1].startswith(group + "/")}
    assert not ours & set(PER_PACKET_ONLY), f"per-packet probes installed: {sorted(ours)}"
    assert not ours & set(RETIRED), f"retired probes installed: {sorted(ours)}"
    assert set(COUNTERS_ONLY) <= ours, f"socket-counter probes missing: {sorted(ours)}"
    stream = FlowStream(vm)
    pb = stream.pb
    misses_before = flowlib.read_probe_misses(vm, group)
    try:
        with flowlib.scenario(vm, f"tcp port {TCP_PORT} or tcp port {DOWNLOAD_PORT} "
                                  f"or udp port {UDP_PORT}") as sc:
            runs = []
            for addr, n in (("127.0.0.1", CONNECTIONS), ("::1", 1)):
                server = flowlib.spawn_server(vm, SERVER_USER, f"tcp-serve {addr} {TCP_PORT} {n}")
                client, locals_ = flowlib.run_client(vm, CLIENT_USER,
                                                     f"tcp-client {addr} {TCP_PORT} {n} {CLIENT_BYTES}")
                assert server.wait(flowlib.WORKLOAD_WAIT_S) == 0, server.log()
                assert len(locals_) == n, client.log()
                runs += [(client, server, loc, (addr, TCP_PORT)) for loc in locals_]
            server = flowlib.spawn_server(vm, SERVER_USER, f"tcp-source 127.0.0.1 {DOWNLOAD_PORT} {DOWNLOAD_S}")
            client, locals_ = flowlib.run_client(vm, CLIENT_USER, f"tcp-client 127.0.0.1 {DOWNLOAD_PORT} 1 0")
            assert server.wait(flowlib.WORKLOAD_WAIT_S) == 0, server.log()
            runs.append((client, server, locals_[0], ("127.0.0.1", DOWNLOAD_PORT)))
            echo = flowlib.spawn_server(vm, SERVER_USER, f"udp-echo 127.0.0.1 {UDP_PORT} {DATAGRAMS}")
            uc, uloc = flowlib.run_client(vm, CLIENT_USER, f"udp-client 127.0.0.1 {UDP_PORT} "
                                                           f"{DATAGRAMS} {DATAGRAM_SIZE} connect reply")
            assert echo.wait(flowlib.WORKLOAD_WAIT_S) == 0, echo.log()
        misses = flowlib.read_probe_misses(vm, group)
        end_missed = misses.get("tcp_end", 0) - misses_before.get("tcp_end", 0)
        pairs = []
        for _c, _s, loc, srv in runs:
            pairs += [(loc, srv), (srv, loc)]
        got = stream.wait_finals(pb.TRANSPORT_TCP, pairs)
        problems, uncounted, rows = [], 0, []
        for c, s, loc, srv in runs:
            for local, remote, direction, proc, user in ((loc, srv, pb.DIRECTION_EGRESS, c, CLIENT_USER),
                                                         (srv, loc, pb.DIRECTION_INGRESS, s, SERVER_USER)):
                recs = got[(local, remote)]
                if len(recs) != 1:
                    problems.append(f"{local}->{remote}: {len(recs)} final records")
                    continue
                f = recs[0]
                p = flowlib.flow_problems(f, sc.totals, "tcp", direction=direction, pid=proc.pid, user=user)
                if f.accounting == pb.ACCOUNTING_UNCOUNTED:
                    uncounted += 1
                elif f.accounting != pb.ACCOUNTING_SOCKET_COUNTERS:
                    p.append(f"accounting {f.accounting}")
                else:
                    out_segs, out_bytes, out_other = _captured(sc, local, remote)
                    in_segs, in_bytes, in_other = _captured(sc, remote, local)
                    rows.append(f"{local}->{remote}: out {f.local.packets}/{f.local.bytes} capture "
                                f"{out_segs}/{out_bytes}; in {f.remote.packets}/{f.remote.bytes} capture "
                                f"{in_segs}/{in_bytes}")
                    if (f.local.bytes, f.remote.bytes) != (out_bytes, in_bytes):
                        p.append(f"payload out/in {f.local.bytes}/{f.remote.bytes}, capture {out_bytes}/{in_bytes}")
                    for side, n, segs, other in (("out", f.local.packets, out_segs, out_other),
                                                 ("in", f.remote.packets, in_segs, in_other)):
                        if not segs - other <= n <= segs:
                            p.append(f"segments {side} {n}, capture {segs} of which {other} "
                                     "only another socket can have handled")
                if p:
                    problems.append(f"{local}->{remote}: {p}")
        print("[socket counters] " + "\n  ".join(rows))
        assert uncounted <= end_missed, f"{uncounted} flows uncounted, tcp_end missed {end_missed} hits"
        assert not problems, "\n".join(problems)
        # UDP stays per packet: judged like every flow scenario.
        srv = ("127.0.0.1", UDP_PORT)
        ugot = stream.wait_finals(pb.TRANSPORT_UDP, [(uloc[0], srv), (srv, uloc[0])], scenario=sc)
        for recs in ugot.values():
            assert all(r.accounting == pb.ACCOUNTING_PACKETS for r in recs), recs
        sc.expect(ugot[(uloc[0], srv)], "udp", direction=pb.DIRECTION_EGRESS, pid=uc.pid, user=CLIENT_USER)
        sc.expect(ugot[(srv, uloc[0])], "udp", direction=pb.DIRECTION_INGRESS, pid=echo.pid, user=SERVER_USER)
        sc.verdict(stream)
    finally:
        stream.close()
    assert vm.stop_daemon("TERM") == 0
