"""Flow engine scenarios against the packet-capture oracle.

Every workload is ``flowtool`` (see flowtool.c) running as an unprivileged
user, so each socket's owner is the exact pid the test spawned. Each flow's
final record must have the right direction, ``complete``, process pid/name,
uid/user name, a community id, and per-side packet and byte counters equal
to what tcpdump saw. The only allowance is the kernel's own count of missed
hits of the daemon's packet probes during the scenario, read from
``kprobe_profile`` in the guest (see :class:`flowlib.Scenario`): all
records of a scenario are judged once against the capture, together within
that budget, and never over the capture.

IPv6 over virtio is not possible with this qemu (7.2 user networking has no
IPv6 host forwarding and ``restrict=on`` blocks guest-initiated traffic), so
IPv6 runs on loopback (``::1``) and on eth0's ULA address.
"""

from __future__ import annotations

import socket
import time

import pytest

import flowlib
from flowlib import CLIENT_USER, SERVER_USER, FlowStream

#: Guest ports of the scenarios (the virtio ones are forwarded by bed.py).
TCP_PORT = 9100
UDP_RECV_PORT = 9201
UDP_ECHO_PORT = 9202
VIRTIO_TCP_PORT = 9180
VIRTIO_UDP_PORT = 9181
#: Bytes each TCP client sends.
TCP_CLIENT_BYTES = 3000
#: Datagrams (and their size) of each UDP client.
UDP_DATAGRAMS = 3
UDP_SIZE = 200
#: How long the receive-only UDP server sleeps before its first recvfrom.
UDP_LATE_RECV_S = 15
#: Bytes the host sends to the receive-only server over virtio.
VIRTIO_TCP_BYTES = 20000
#: Guest addresses of eth0.
GUEST_V4 = "10.0.2.15"
GUEST_ULA = "fd00:5c0:5c0::15"
#: The qemu user-net host alias, source of forwarded connections.
SLIRP_HOST = "10.0.2.2"


def _start(vm, offsets: str, include_updates: bool = False) -> FlowStream:
    flowlib.install_guest_tools(vm)
    flowlib.start_daemon(vm, offsets)
    return FlowStream(vm, include_updates=include_updates)


def test_tcp_loopback_v4_v6(vm, offsets):
    """TCP over 127.0.0.1, ::1 and eth0's ULA: client and server flows of each connection."""
    stream = _start(vm, offsets)
    pb = stream.pb
    runs = []
    try:
        with flowlib.scenario(vm, f"tcp port {TCP_PORT}") as sc:
            for addr in ("127.0.0.1", "::1", GUEST_ULA):
                server = flowlib.spawn_server(vm, SERVER_USER, f"tcp-serve {addr} {TCP_PORT} 1")
                client, locals_ = flowlib.run_client(vm, CLIENT_USER,
                                                     f"tcp-client {addr} {TCP_PORT} 1 {TCP_CLIENT_BYTES}")
                assert server.wait(flowlib.WORKLOAD_WAIT_S) == 0, server.log()
                assert len(locals_) == 1, client.log()
                runs.append((addr, server, client, locals_[0]))
        pairs = []
        for addr, server, client, local in runs:
            pairs += [(local, (addr, TCP_PORT)), ((addr, TCP_PORT), local)]
        got = stream.wait_finals(pb.TRANSPORT_TCP, pairs)
        for addr, server, client, local in runs:
            sc.expect(got[(local, (addr, TCP_PORT))], "tcp", direction=pb.DIRECTION_EGRESS,
                      pid=client.pid, user=CLIENT_USER)
            sc.expect(got[((addr, TCP_PORT), local)], "tcp", direction=pb.DIRECTION_INGRESS,
                      pid=server.pid, user=SERVER_USER)
        sc.verdict(stream)
    finally:
        stream.close()
    assert vm.stop_daemon("TERM") == 0


def test_udp_connected_unconnected_multi_peer(vm, offsets):
    """UDP: a connected client to a receive-only server; one echo socket talking to three peers."""
    stream = _start(vm, offsets)
    pb = stream.pb
    try:
        with flowlib.scenario(vm, f"udp port {UDP_RECV_PORT} or udp port {UDP_ECHO_PORT}") as sc:
            # Connected client -> receive-only, unconnected server socket.
            recv = flowlib.spawn_server(vm, SERVER_USER, f"udp-recv 127.0.0.1 {UDP_RECV_PORT} {UDP_DATAGRAMS}")
            c1, l1 = flowlib.run_client(vm, CLIENT_USER, f"udp-client 127.0.0.1 {UDP_RECV_PORT} "
                                                         f"{UDP_DATAGRAMS} {UDP_SIZE} connect noreply")
            assert recv.wait(flowlib.WORKLOAD_WAIT_S) == 0, recv.log()
            # One unconnected echo socket per family, three peers each: one
            # connected client and two unconnected (sendto) clients.
            echoes = []
            for addr in ("127.0.0.1", "::1"):
                echo = flowlib.spawn_server(vm, SERVER_USER,
                                            f"udp-echo {addr} {UDP_ECHO_PORT} {3 * UDP_DATAGRAMS}")
                clients = []
                for mode in ("connect", "sendto", "sendto"):
                    c, loc = flowlib.run_client(vm, CLIENT_USER, f"udp-client {addr} {UDP_ECHO_PORT} "
                                                                 f"{UDP_DATAGRAMS} {UDP_SIZE} {mode} reply")
                    assert len(loc) == 1, c.log()
                    clients.append((c, (addr, loc[0][1])))  # unconnected getsockname shows the wildcard
                assert echo.wait(flowlib.WORKLOAD_WAIT_S) == 0, echo.log()
                echoes.append((addr, echo, clients))
        server_recv = ("127.0.0.1", UDP_RECV_PORT)
        pairs = [(l1[0], server_recv), (server_recv, l1[0])]
        for addr, echo, clients in echoes:
            for _c, loc in clients:
                pairs += [(loc, (addr, UDP_ECHO_PORT)), ((addr, UDP_ECHO_PORT), loc)]
        got = stream.wait_finals(pb.TRANSPORT_UDP, pairs, scenario=sc)
        sc.expect(got[(l1[0], server_recv)], "udp", direction=pb.DIRECTION_EGRESS, pid=c1.pid,
                  user=CLIENT_USER)
        sc.expect(got[(server_recv, l1[0])], "udp", direction=pb.DIRECTION_INGRESS, pid=recv.pid,
                  user=SERVER_USER)
        all_server_flows = []
        for addr, echo, clients in echoes:
            for c, loc in clients:
                sc.expect(got[(loc, (addr, UDP_ECHO_PORT))], "udp", direction=pb.DIRECTION_EGRESS,
                          pid=c.pid, user=CLIENT_USER)
                sc.expect(got[((addr, UDP_ECHO_PORT), loc)], "udp", direction=pb.DIRECTION_INGRESS,
                          pid=echo.pid, user=SERVER_USER)
            all_server_flows.append([got[((addr, UDP_ECHO_PORT), loc)] for _c, loc in clients])
        sc.verdict(stream)
        for server_flows in all_server_flows:
            # One socket, three peers: three distinct flows of the same socket.
            server_flows = [recs[0] for recs in server_flows]
            assert len({f.id for f in server_flows}) == 3, server_flows
            assert len({f.kernel_sock_address for f in server_flows}) == 1, server_flows
    finally:
        stream.close()
    assert vm.stop_daemon("TERM") == 0


def test_virtio_tcp_udp_from_host(vm, offsets):
    """TCP and UDP from the host over eth0 (qemu forwarding) to receive-only servers.

    Only inbound: with ``restrict=on`` qemu drops UDP the guest sends to the
    host alias, so the UDP server cannot answer over virtio.
    """
    stream = _start(vm, offsets)
    pb = stream.pb
    try:
        with flowlib.scenario(vm, f"tcp port {VIRTIO_TCP_PORT} or udp port {VIRTIO_UDP_PORT}") as sc:
            tcp_srv = flowlib.spawn_server(vm, SERVER_USER, f"tcp-recv {GUEST_V4} {VIRTIO_TCP_PORT} 1")
            # The UDP server sleeps before its first recvfrom: the datagrams
            # queue on a socket that has not received anything yet.
            udp_srv = flowlib.spawn_server(vm, SERVER_USER, f"udp-recv-late {GUEST_V4} {VIRTIO_UDP_PORT} "
                                           f"{UDP_DATAGRAMS} {UDP_LATE_RECV_S}")
            assert flowlib.syscall_of(vm, udp_srv) in flowlib.SYS_SLEEPS, "the UDP server is not asleep"
            with socket.create_connection(("127.0.0.1", vm.forwards[("tcp", VIRTIO_TCP_PORT)]), timeout=30) as s:
                s.sendall(b"v" * VIRTIO_TCP_BYTES)
                s.shutdown(socket.SHUT_WR)
                assert s.recv(1) == b"", "the receive-only server sent data"
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.settimeout(30)
                for _ in range(UDP_DATAGRAMS):
                    u.sendto(b"w" * UDP_SIZE, ("127.0.0.1", vm.forwards[("udp", VIRTIO_UDP_PORT)]))
            flowlib.wait_until(lambda: "UDP" in vm.run(f"cat /proc/net/udp | awk '$2 ~ /:{VIRTIO_UDP_PORT:04X}$/ "
                                                       f"&& $5 !~ /:00000000$/ {{print \"UDP\"}}'").out,
                               10, "the datagrams to be queued")
            assert flowlib.syscall_of(vm, udp_srv) in flowlib.SYS_SLEEPS, \
                "the UDP server woke before the datagrams were queued; raise UDP_LATE_RECV_S"
            assert tcp_srv.wait(flowlib.WORKLOAD_WAIT_S) == 0, tcp_srv.log()
            assert udp_srv.wait(flowlib.WORKLOAD_WAIT_S) == 0, udp_srv.log()
        t = sc.totals
        peers = {}
        for proto, port in (("tcp", VIRTIO_TCP_PORT), ("udp", VIRTIO_UDP_PORT)):
            srcs = {src for (p, src, dst) in t.tuples() if p == proto and dst == (GUEST_V4, port)}
            assert len(srcs) == 1 and next(iter(srcs))[0] == SLIRP_HOST, f"{proto} peers in capture: {srcs}"
            peers[proto] = next(iter(srcs))
        # The traffic really crossed eth0: the capture saw it as sent/received, not loopback.
        assert all(not p.loopback for p in sc.packets), "virtio traffic was captured on a loopback device"
        tcp_local, udp_local = (GUEST_V4, VIRTIO_TCP_PORT), (GUEST_V4, VIRTIO_UDP_PORT)
        got_t = stream.wait_finals(pb.TRANSPORT_TCP, [(tcp_local, peers["tcp"])])
        got_u = stream.wait_finals(pb.TRANSPORT_UDP, [(udp_local, peers["udp"])], scenario=sc)
        # The capture saw the whole payload arrive (plus headers); the
        # verdict then holds the record to the capture.
        received = t.flow("tcp", tcp_local, peers["tcp"]).remote
        assert received.bytes > VIRTIO_TCP_BYTES, f"the capture saw {received} of a {VIRTIO_TCP_BYTES}-byte upload"
        sc.expect(got_t[(tcp_local, peers["tcp"])], "tcp", direction=pb.DIRECTION_INGRESS,
                  pid=tcp_srv.pid, user=SERVER_USER)
        sc.expect(got_u[(udp_local, peers["udp"])], "udp", direction=pb.DIRECTION_INGRESS,
                  pid=udp_srv.pid, user=SERVER_USER)
        sc.verdict(stream)
    finally:
        stream.close()
    assert vm.stop_daemon("TERM") == 0


def test_own_grpc_connection_not_reported(vm, offsets):
    """The daemon's own gRPC connections are not reported by default."""
    stream = _start(vm, offsets)
    pb = stream.pb
    try:
        # A second, short-lived gRPC connection, closed before the workload.
        import grpc
        with grpc.insecure_channel(f"127.0.0.1:{vm.grpc_port}") as ch:
            _pb, rpc = flowlib.grpc_client.load_stubs()
            for _ in range(3):
                rpc.FlowServiceStub(ch).GetStatus(pb.GetStatusRequest(), timeout=10)
        closed_at = time.monotonic()
        # Positive control: a later flow is reported, after the closed gRPC
        # connection's final record would have been due.
        with flowlib.scenario(vm, f"tcp port {TCP_PORT}") as sc:
            server = flowlib.spawn_server(vm, SERVER_USER, f"tcp-serve 127.0.0.1 {TCP_PORT} 1")
            client, locals_ = flowlib.run_client(vm, CLIENT_USER, f"tcp-client 127.0.0.1 {TCP_PORT} 1 10")
            assert server.wait(flowlib.WORKLOAD_WAIT_S) == 0
        flowlib.wait_until(lambda: time.monotonic() - closed_at > 5, 10, "the termination timeouts to pass")
        pair = (locals_[0], ("127.0.0.1", TCP_PORT))
        got = stream.wait_finals(pb.TRANSPORT_TCP, [pair])
        sc.expect(got[pair], "tcp", direction=pb.DIRECTION_EGRESS, pid=client.pid, user=CLIENT_USER)
        sc.verdict(stream)
        own = [f for f in stream.flows() if 50051 in (f.local.port, f.remote.port)
               or f.process.name == "sockscope"]
        assert not own, f"the daemon reported its own traffic: {own[:3]}"
    finally:
        stream.close()
    assert vm.stop_daemon("TERM") == 0
