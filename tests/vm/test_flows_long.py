"""Flow scenarios with volume or duration: a 600-connection burst and a long
download with interim records, checked against the packet capture.

As in test_flows.py, the counters' only allowance is the kernel's count of
missed packet-probe hits over the scenario (:class:`flowlib.Scenario`):
with none, every record equals the capture.
"""

from __future__ import annotations

import flowlib
from flowlib import CLIENT_USER, SERVER_USER, FlowStream

#: Connections of the burst.
BURST = 600
BURST_PORT = 9110
#: Bytes each burst client sends.
BURST_BYTES = 100
DOWNLOAD_PORT = 9120
#: Seconds the download runs (interim records every 2 s).
DOWNLOAD_S = 7
#: Expected spacing of interim records, with slack for a slow TCG guest.
UPDATE_INTERVAL_S = 2.0
UPDATE_GAP_MIN_S, UPDATE_GAP_MAX_S = 1.0, 5.0
#: Interim records a 7 s transfer must produce per side at a 2 s interval.
MIN_INTERIM = 2


def test_burst_of_600_connections(vm, offsets):
    """600 short connections: 600 distinct flows per side, none lost or merged, counters as captured."""
    flowlib.install_guest_tools(vm)
    # Loopback reuses TIME_WAIT ports by default (tcp_tw_reuse=2): turn that
    # off so every connection has its own 4-tuple and can be told apart.
    tw = vm.run("cat /proc/sys/net/ipv4/tcp_tw_reuse", check=True).out.strip()
    vm.run("echo 0 >/proc/sys/net/ipv4/tcp_tw_reuse", check=True)
    flowlib.start_daemon(vm, offsets)
    stream = FlowStream(vm)
    pb = stream.pb
    try:
        with flowlib.scenario(vm, f"tcp port {BURST_PORT}") as sc:
            server = flowlib.spawn_server(vm, SERVER_USER, f"tcp-serve 127.0.0.1 {BURST_PORT} {BURST}")
            client, locals_ = flowlib.run_client(vm, CLIENT_USER,
                                                 f"tcp-client 127.0.0.1 {BURST_PORT} {BURST} {BURST_BYTES}")
            assert server.wait(flowlib.WORKLOAD_WAIT_S) == 0, server.log()
        ports = [p for _ip, p in locals_]
        assert len(ports) == BURST and len(set(ports)) == BURST, f"{len(set(ports))} distinct client ports"
        srv = ("127.0.0.1", BURST_PORT)
        pairs = [(loc, srv) for loc in locals_] + [(srv, loc) for loc in locals_]
        got = stream.wait_finals(pb.TRANSPORT_TCP, pairs, timeout=180)
        for loc in locals_:
            sc.expect(got[(loc, srv)], "tcp", direction=pb.DIRECTION_EGRESS, pid=client.pid, user=CLIENT_USER)
            sc.expect(got[(srv, loc)], "tcp", direction=pb.DIRECTION_INGRESS, pid=server.pid, user=SERVER_USER)
        verdict = sc.verdict(stream)
        # Totals: every captured packet of the burst is in exactly one record
        # per side, but for the ones the verdict allowed for.
        flows = [r[0] for r in got.values()]
        assert len({f.id for f in flows}) == 2 * BURST
        pkts = sum(f.local.packets + f.remote.packets for f in flows)
        truth = sum(c.packets for c in sc.totals.sent.values()) + sum(c.packets for c in sc.totals.received.values())
        assert pkts == truth - verdict["packets_short"], \
            f"records count {pkts} packets, capture {truth}, {verdict['packets_short']} allowed for"
        others = [x for x in stream.losses() if x.source != pb.LOSS_SOURCE_KRETPROBE_MISS]
        assert not others, f"loss notices: {others}"
    finally:
        stream.close()
        vm.run(f"echo {tw} >/proc/sys/net/ipv4/tcp_tw_reuse")
    assert vm.stop_daemon("TERM") == 0


def test_long_download_interim_updates(vm, offsets):
    """A 7 s download: interim records about every 2 s, same id, non-decreasing, then one final."""
    flowlib.install_guest_tools(vm)
    flowlib.start_daemon(vm, offsets)
    stream = FlowStream(vm, include_updates=True)
    pb = stream.pb
    try:
        with flowlib.scenario(vm, f"tcp port {DOWNLOAD_PORT}") as sc:
            server = flowlib.spawn_server(vm, SERVER_USER, f"tcp-source 127.0.0.1 {DOWNLOAD_PORT} {DOWNLOAD_S}")
            client, locals_ = flowlib.run_client(vm, CLIENT_USER, f"tcp-client 127.0.0.1 {DOWNLOAD_PORT} 1 0")
            assert server.wait(flowlib.WORKLOAD_WAIT_S) == 0, server.log()
        srv = ("127.0.0.1", DOWNLOAD_PORT)
        loc = locals_[0]
        sides = (((loc, srv), pb.DIRECTION_EGRESS, client, CLIENT_USER),
                 ((srv, loc), pb.DIRECTION_INGRESS, server, SERVER_USER))
        got = stream.wait_finals(pb.TRANSPORT_TCP, [s[0] for s in sides])
        for pair, direction, proc, user in sides:
            sc.expect(got[pair], "tcp", direction=direction, pid=proc.pid, user=user)
        sc.verdict(stream)
        for pair, direction, proc, user in sides:
            final = got[pair][0]
            envs = [e for e in stream.envelopes() if e.WhichOneof("event") == "flow" and e.flow.id == final.id]
            assert envs[-1].flow.final and sum(e.flow.final for e in envs) == 1, envs
            interim = [e for e in envs if not e.flow.final]
            assert len(interim) >= MIN_INTERIM, f"{pair}: {len(interim)} interim records"
            prev = None
            for e in interim + [envs[-1]]:
                f = e.flow
                assert (f.local.port, f.remote.port) == (final.local.port, final.remote.port)
                c = (f.local.packets, f.local.bytes, f.remote.packets, f.remote.bytes)
                if prev is not None:
                    assert all(a <= b for a, b in zip(prev, c)), f"{pair}: counters went down {prev} -> {c}"
                prev = c
            # Spacing of interim records, by the daemon's send time.
            times = [e.time.ToNanoseconds() / 1e9 for e in interim]
            gaps = [b - a for a, b in zip(times, times[1:])]
            assert all(UPDATE_GAP_MIN_S <= g <= UPDATE_GAP_MAX_S for g in gaps), f"{pair}: gaps {gaps}"
            # The bulk side grew between interim records.
            bulk = [e.flow.local.bytes if direction == pb.DIRECTION_INGRESS else e.flow.remote.bytes
                    for e in interim]
            assert bulk[-1] > bulk[0], f"{pair}: bulk bytes did not grow across interim records {bulk}"
    finally:
        stream.close()
    assert vm.stop_daemon("TERM") == 0
