"""Shared helpers of the flow scenarios (``test_flows*.py``).

* :func:`install_guest_tools` builds ``flowtool.c`` statically on the host,
  copies it into the guest and adds the unprivileged users the workloads
  run as.
* :class:`FlowStream` follows ``StreamFlows`` in a background thread and
  collects every envelope.
* :func:`scenario` runs a workload under the packet capture and measures,
  in the guest, the misses the kernel counted for the daemon's packet
  probes over the same window; :meth:`Scenario.expect` queues final records
  and :meth:`Scenario.verdict` judges them all at once against the capture,
  with those misses as the only allowance (see :class:`Scenario`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import grpc

import bed
import grpc_client
import oracle

HERE = Path(__file__).resolve().parent
#: Guest path of the workload tool.
FLOWTOOL = "/usr/bin/flowtool"
#: Unprivileged users of the workloads: name -> (uid, gid).
CLIENT_USER = ("alice", 1000, 1000)
SERVER_USER = ("srv", 1001, 1001)
#: Daemon options: idle flows become final quickly; interim records every
#: 2 s. The termination timeout stays at its default (5 s): it is also how
#: long a handshake waits for its accept, and a TCG guest under load can
#: take more than a second to schedule the accepting process.
DAEMON_ARGS = ["-E", "socket.flow_inactive_timeout=2s", "-E", "socket.flow_update_interval=2s"]
#: x86_64 syscall number of recvfrom, as /proc/PID/syscall shows it.
SYS_RECVFROM = 45
#: x86_64 syscall numbers of nanosleep and clock_nanosleep.
SYS_SLEEPS = (35, 230)
#: Offset sources the flow scenarios run with: BTF, and runtime guessing
#: (what a kernel without BTF gets).
OFFSETS_MODES = ("btf", "guess")
#: How long a daemon that guesses its offsets may take to serve (the
#: guessing runs workloads, slow under TCG).
GUESS_READY_TIMEOUT_S = 180
#: How long a scenario waits for its final records.
FINAL_WAIT_S = 90
#: How long a spawned workload may run.
WORKLOAD_WAIT_S = 120
#: How long to wait for a server's "ready" line.
READY_WAIT_S = 30


def build_flowtool() -> Path:
    """Compile ``flowtool.c`` statically (cached by source mtime); fails loudly without gcc."""
    return bed.build_static(HERE / "flowtool.c")


def install_guest_tools(vm) -> None:
    """Put flowtool into the guest and make sure the workload users exist."""
    if vm.run(f"test -x {FLOWTOOL}").rc != 0:
        vm.put(FLOWTOOL, build_flowtool().read_bytes(), mode=0o755)
    for name, uid, gid in (CLIENT_USER, SERVER_USER):
        vm.run(f"grep -q '^{name}:' /etc/passwd || "
               f"{{ echo '{name}:x:{uid}:{gid}::/tmp:/bin/sh' >>/etc/passwd; "
               f"echo '{name}:x:{gid}:' >>/etc/group; }}", check=True)


def wait_until(cond, timeout: float, what: str, interval: float = 0.3):
    """Poll ``cond()`` until it returns something truthy; fail loudly on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def spawn_server(vm, user: tuple[str, int, int], args: str) -> bed.Spawned:
    """Start a flowtool server as ``user`` and wait for its ready line."""
    p = vm.spawn(f"exec {FLOWTOOL} -u {user[1]}:{user[2]} {args}")
    wait_until(lambda: "ready" in p.log() or not p.alive(), READY_WAIT_S, f"server {args}")
    assert "ready" in p.log(), f"server {args} failed: {p.log()}"
    return p


def start_daemon(vm, offsets: str, extra: list[str] | tuple[str, ...] = ()) -> None:
    """Start the daemon with the scenario settings and offsets from ``offsets`` (btf|guess)."""
    args = DAEMON_ARGS + ["-E", f"socket.offsets={offsets}"] + list(extra)
    if offsets == "guess":
        vm.start_daemon(args, timeout=GUESS_READY_TIMEOUT_S)
    else:
        vm.start_daemon(args)
    pb, rpc = grpc_client.load_stubs()
    with grpc.insecure_channel(f"127.0.0.1:{vm.grpc_port}") as ch:
        src = rpc.FlowServiceStub(ch).GetStatus(pb.GetStatusRequest(), timeout=30).offsets_source
    assert src.startswith(offsets), f"asked for offsets={offsets}, the daemon uses {src!r}"


def syscall_of(vm, p: bed.Spawned) -> int | None:
    """The system call ``p`` is blocked in (from /proc/PID/syscall), if any."""
    first = vm.run(f"cat /proc/{p.pid}/syscall").out.split()[:1]
    return int(first[0]) if first and first[0].lstrip("-").isdigit() else None


def wait_blocked_in_recvfrom(vm, p: bed.Spawned) -> None:
    """Wait until ``p`` sleeps in recvfrom (its bound address is then known to the daemon)."""
    wait_until(lambda: vm.run(f"cat /proc/{p.pid}/syscall").out.split()[:1] == [str(SYS_RECVFROM)],
               READY_WAIT_S, f"pid {p.pid} to block in recvfrom")


def run_client(vm, user: tuple[str, int, int], args: str) -> tuple[bed.Spawned, list[tuple[str, int]]]:
    """Run a flowtool client as ``user`` to completion; returns it and its local endpoints."""
    p = vm.spawn(f"exec {FLOWTOOL} -u {user[1]}:{user[2]} {args}")
    rc = p.wait(WORKLOAD_WAIT_S)
    log = p.log()
    assert rc == 0, f"client {args} exited {rc}: {log}"
    locals_ = [(parts[1], int(parts[2])) for parts in (line.split() for line in log.splitlines())
               if len(parts) == 3 and parts[0] == "local"]
    return p, locals_


def same_ip(a: str, b: str) -> bool:
    return ipaddress.ip_address(a) == ipaddress.ip_address(b)


#: Longest a collected StreamFlows call may last.
STREAM_TIMEOUT_S = 600


class Collector:
    """Reads one StreamFlows call on a thread until it ends."""

    def __init__(self, stub, request):
        self.flows = []
        self.error: grpc.RpcError | None = None
        self.lock = threading.Lock()
        self.call = stub.StreamFlows(request, timeout=STREAM_TIMEOUT_S)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for resp in self.call:
                if resp.WhichOneof("event") == "flow":
                    with self.lock:
                        self.flows.append(resp.flow)
        except grpc.RpcError as e:
            self.error = e

    def final(self):
        with self.lock:
            return [f for f in self.flows if f.final]


class FlowStream:
    """A StreamFlows(follow) subscription read by a background thread."""

    def __init__(self, vm, include_updates: bool = False):
        self.pb, rpc = grpc_client.load_stubs()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{vm.grpc_port}")
        self.stub = rpc.FlowServiceStub(self.channel)
        self.call = self.stub.StreamFlows(self.pb.StreamFlowsRequest(follow=True, include_updates=include_updates))
        self.items: list = []
        self.error: Exception | None = None
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        # Condition-based: the subscription is registered once the status lists it.
        wait_until(lambda: len(self.stub.GetStatus(self.pb.GetStatusRequest(), timeout=10).subscribers) >= 1,
                   30, "the StreamFlows subscription to register")

    def _run(self) -> None:
        try:
            for resp in self.call:
                with self.lock:
                    self.items.append(resp)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.error = e

    def flows(self) -> list:
        """All flow records received so far, in order."""
        if self.error is not None:
            raise AssertionError(f"StreamFlows failed: {self.error}")
        with self.lock:
            return [r.flow for r in self.items if r.WhichOneof("event") == "flow"]

    def envelopes(self) -> list:
        with self.lock:
            return list(self.items)

    def health(self) -> str:
        """Loss notices received and the daemon's loss counters: context for a failed check."""
        try:
            st = self.stub.GetStatus(self.pb.GetStatusRequest(), timeout=10)
            counters = (f"lost per cpu {[(c.cpu, c.lost) for c in st.cpus]}, decode errors {st.decode_errors}, "
                        f"kretprobe misses {st.kretprobe_misses}")
        except grpc.RpcError as e:
            counters = f"status unavailable: {e.code()}"
        return f"loss notices: {self.losses()}; {counters}"

    def losses(self) -> list:
        with self.lock:
            return [r.loss for r in self.items if r.WhichOneof("event") == "loss"]

    def finals(self, transport: int, local: tuple[str, int], remote: tuple[str, int]) -> list:
        """Final records of one flow (by transport and both endpoints)."""
        return [f for f in self.flows() if f.final and f.network.transport == transport
                and f.local.port == local[1] and f.remote.port == remote[1]
                and same_ip(f.local.ip, local[0]) and same_ip(f.remote.ip, remote[0])]

    def wait_finals(self, transport: int, pairs: list[tuple[tuple[str, int], tuple[str, int]]],
                    timeout: float = FINAL_WAIT_S, scenario: "Scenario | None" = None) -> dict:
        """Wait until every (local, remote) pair has a final record; returns pair -> records.

        With ``scenario`` (ended), a flow still without a record at the
        timeout is given as ``[AbsentFlow]`` when the kernel counted enough
        misses at the probes that count its captured packets to have missed
        every one of them; :meth:`Scenario.verdict` then charges all its
        packets to those misses. Otherwise a missing flow fails here.
        """
        def ready():
            by = self.index(transport)
            return all(by.get(_key(loc, rem)) for loc, rem in pairs)
        try:
            wait_until(ready, timeout, f"final records of {len(pairs)} flows", interval=1)
        except AssertionError:
            by = self.index(transport)
            missing = [p for p in pairs if not by.get(_key(*p))]
            if scenario is not None and scenario.misses_explain(self.pb, transport, missing):
                by.update({_key(*p): [AbsentFlow(*p)] for p in missing})
                return {p: by[_key(*p)] for p in pairs}
            ports = {x for loc, rem in missing[:5] for x in (loc[1], rem[1])}
            near = [f"{f.final and 'final' or 'interim'} {f.local.ip}:{f.local.port}->{f.remote.ip}:{f.remote.port} "
                    f"pid={f.process.pid} pk={f.local.packets}/{f.remote.packets}" for f in self.flows()
                    if f.local.port in ports or f.remote.port in ports]
            raise AssertionError(f"{len(missing)} of {len(pairs)} flows have no final record, e.g. {missing[:5]}; "
                                 f"records with those ports: {near[:20]}")
        by = self.index(transport)
        return {p: by[_key(*p)] for p in pairs}

    def index(self, transport: int) -> dict:
        """Final records keyed by normalized (local, remote)."""
        by: dict = {}
        for f in self.flows():
            if f.final and f.network.transport == transport:
                by.setdefault(_key((f.local.ip, f.local.port), (f.remote.ip, f.remote.port)), []).append(f)
        return by

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(10)
        self.channel.close()


class AbsentFlow:
    """A flow with no record at all, every packet of which the kernel may have missed
    (see :meth:`FlowStream.wait_finals`); judged by :meth:`Scenario.verdict` as a record
    of zero packets on both sides."""

    def __init__(self, local: tuple[str, int], remote: tuple[str, int]):
        self.local = _Side(*local)
        self.remote = _Side(*remote)

    def __repr__(self) -> str:
        return f"AbsentFlow({self.local.ip}:{self.local.port} -> {self.remote.ip}:{self.remote.port})"


class _Side:
    """One endpoint of an :class:`AbsentFlow`: its address and no packet."""

    def __init__(self, ip: str, port: int):
        self.ip, self.port, self.packets, self.bytes = ip, port, 0, 0


def _key(local: tuple[str, int], remote: tuple[str, int]) -> tuple:
    return (str(ipaddress.ip_address(local[0])), local[1], str(ipaddress.ip_address(remote[0])), remote[1])


# --------------------------------------------------------------------------- kernel-measured misses

#: Guest tracefs files that list the kprobes and their hit/miss counters.
KPROBE_EVENTS = "/sys/kernel/tracing/kprobe_events"
KPROBE_PROFILE = "/sys/kernel/tracing/kprobe_profile"
#: Reads of the two files tried before giving up on a consistent pair (a
#: probe added or removed between the reads, e.g. by another instance).
PROFILE_READ_ATTEMPTS = 5
#: The daemon's probes whose hits are packets in flow counters (one hit,
#: one packet on one side of one flow): egress IPv4/IPv6 at ip_output /
#: ip6_output, TCP ingress at ip_local_deliver / ip6_input, UDP ingress at
#: delivery to the socket.
PACKET_PROBES = ("ip_out", "ip6_out", "ip_in", "ip6_in", "udp_in", "udp_out", "udp6_out")


def probe_group(vm) -> str:
    """The kprobe group of the running daemon (``sockscope_<pid>``)."""
    assert vm.daemon is not None and vm.daemon.alive(), "the daemon is not running: its probes cannot be read"
    return f"sockscope_{vm.daemon.pid}"


def parse_profile(events: str, profile: str, group: str) -> dict[str, int] | None:
    """``nmissed`` of each probe of ``group``, from one read of kprobe_events and kprobe_profile.

    kprobe_profile lists every kprobe by its bare event name, in the order of
    kprobe_events (checked on 5.10 and 7.2), one line ``name nhit nmissed``;
    the two texts are paired line by line. ``None`` when they do not pair up.
    """
    probes = []
    for line in events.splitlines():
        head = line.split(maxsplit=1)[0] if line.strip() else ""
        _, _, gn = head.partition(":")
        g, _, n = gn.partition("/")
        if n:
            probes.append((g, n))
    rows = [line.split() for line in profile.splitlines() if line.strip()]
    if len(rows) != len(probes) or any(len(r) != 3 or not r[2].isdigit() for r in rows):
        return None
    out = {}
    for (g, n), (name, _hits, missed) in zip(probes, rows):
        if name.rsplit("/", 1)[-1] != n:
            return None
        if g == group:
            out[n] = int(missed)
    return out


def read_probe_misses(vm, group: str) -> dict[str, int]:
    """The kernel's miss counter of every probe of ``group``, read in the guest."""
    sep = "--sockscope-profile--"
    last = ""
    for _ in range(PROFILE_READ_ATTEMPTS):
        r = vm.run(f"cat {KPROBE_EVENTS}; echo {sep}; cat {KPROBE_PROFILE}", check=True)
        events, _, profile = r.out.partition(sep + "\n")
        got = parse_profile(events, profile, group)
        if got is not None:
            # Per-packet accounting counts egress at ip_out, TCP ingress at
            # ip_in; socket-counter accounting has udp_out for UDP egress.
            need = ("udp_out", "udp_in") if "udp_out" in got else ("ip_out", "ip_in", "udp_in")
            missing = [p for p in need if p not in got]
            assert not missing, f"the daemon's group {group} has no packet probes {missing}:\n{events}"
            return got
        last = r.out
    raise AssertionError(f"{KPROBE_EVENTS} and {KPROBE_PROFILE} never paired up:\n{last}")


def packet_probe(proto: str, ip: str, local_side: bool) -> str:
    """The probe that counts one side of a flow: the local (sent) or the remote (received) side."""
    v6 = ipaddress.ip_address(ip).version == 6
    if local_side:
        return "ip6_out" if v6 else "ip_out"
    if proto == "udp":
        return "udp_in"
    return "ip6_in" if v6 else "ip_in"


def explainable(shortfall_bytes: int, shortfall_packets: int, sizes: list[int]) -> bool:
    """Whether some ``shortfall_packets`` of the captured packet ``sizes`` add up to exactly
    ``shortfall_bytes`` (the byte shortfall of a side missing that many packets)."""
    if shortfall_packets == 0:
        return shortfall_bytes == 0
    if shortfall_packets > len(sizes) or shortfall_bytes <= 0:
        return False
    limit = (1 << (shortfall_bytes + 1)) - 1
    # reach[c]: bit s set when some c of the packets seen so far sum to s.
    reach = [1] + [0] * shortfall_packets
    for size, n in Counter(sizes).items():
        for _ in range(min(n, shortfall_packets)):
            for c in range(shortfall_packets, 0, -1):
                reach[c] |= (reach[c - 1] << size) & limit
    return bool(reach[shortfall_packets] >> shortfall_bytes & 1)


class Scenario:
    """One workload under the packet capture, and the kernel's packet-probe misses over it.

    Made by :func:`scenario`. The allowance is fixed before any record is
    judged: for each packet probe, the misses the kernel counted for the
    daemon's group in ``kprobe_profile``, read in the guest right before
    the capture starts and right after it stops (the daemon running both
    times). A kprobe hit while another kprobe handler runs on that CPU (a
    softirq in the middle of a handler) is dropped and counted there, and
    nothing else the daemon reports enters the allowance.

    :meth:`verdict` judges all expected records once, on their final
    values. A record side (local = sent, counted at ``ip_out``/``ip6_out``;
    remote = received, counted at ``ip_in``/``ip6_in`` for TCP, ``udp_in``
    for UDP) equals the capture, or is short of it by ``k`` packets and by
    bytes that exactly ``k`` of that side's captured packets add up to; it
    is never over the capture in packets or bytes. The shortfalls of all
    sides counted by one probe together are at most that probe's misses.
    With no misses every record equals the capture.
    """

    def __init__(self, vm, group: str, before: dict[str, int]):
        self.vm = vm
        self.group = group
        self.before = before
        self.capture = None
        self.misses: dict[str, int] | None = None
        self.expected: list[tuple] = []
        self.result: dict | None = None

    @property
    def totals(self) -> oracle.Totals:
        return self.capture.totals

    @property
    def packets(self) -> list:
        return self.capture.packets

    def _close(self, capture, after: dict[str, int]) -> None:
        self.capture = capture
        gone = [p for p in self.before if p not in after]
        assert not gone, f"probes {gone} of {self.group} disappeared during the scenario"
        self.misses = {p: after.get(p, 0) - self.before.get(p, 0) for p in PACKET_PROBES if p in after}
        assert all(n >= 0 for n in self.misses.values()), f"miss counters went down: {self.before} -> {after}"
        # Recorded now, so a scenario that fails before its verdict still
        # shows its misses in the run's summary; verdict() fills in the rest.
        self.result = {"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "flows": 0,
                       "misses": dict(self.misses), "misses_total": sum(self.misses.values()),
                       "flows_short": 0, "packets_short": 0, "bytes_short": 0, "judged": False}
        self.vm.accounting.append(self.result)

    def expect(self, records: list, proto: str, **want) -> None:
        """Queue one flow's final records (exactly one expected) for :meth:`verdict`.

        ``want`` (direction, pid, user, name) are flowtool attributes checked
        by :func:`flow_problems`; without them only the counters are judged.
        """
        assert self.misses is not None and not self.result["judged"], "records expected outside the scenario"
        self.expected.append((list(records), proto, want))

    def _side(self, proto: str, src: tuple[str, int], dst: tuple[str, int], sent: bool) -> list:
        src, dst = oracle._norm(src), oracle._norm(dst)
        return [p for p in self.capture.packets
                if p.proto == proto and p.src == src and p.dst == dst and (p.loopback or p.outgoing == sent)]

    def _sizes(self, proto: str, src: tuple[str, int], dst: tuple[str, int], sent: bool) -> list[int]:
        return [p.ip_len for p in self._side(proto, src, dst, sent)]

    def _sequence_problems(self, f, side: str, short_packets: int, short_bytes: int,
                           src: tuple[str, int], dst: tuple[str, int]) -> list[str]:
        """The side's sequence-space figures against the capture (see :func:`sequence_problems`)."""
        ep = getattr(f, side)
        return sequence_problems(f, ep, side, self._side("tcp", src, dst, sent=(side == "local")),
                                 short_packets, short_bytes)

    def _counting_probe(self, proto: str, local_ip: str, local_side: bool) -> str:
        """The probe that counts one side of a flow in this scenario's accounting."""
        probe = packet_probe(proto, local_ip, local_side)
        if proto == "udp" and local_side and "udp_out" in self.misses:
            probe = probe.replace("ip", "udp")  # socket-counter accounting
        return probe

    def misses_explain(self, pb, transport: int, pairs: list) -> bool:
        """Whether the misses the kernel counted could have taken every captured packet of
        the flows ``pairs`` (each seen in the capture), at the probes that count them."""
        assert self.misses is not None, "misses asked before the scenario ended"
        proto = {pb.TRANSPORT_TCP: "tcp", pb.TRANSPORT_UDP: "udp"}[transport]
        need: dict[str, int] = defaultdict(int)
        for local, remote in pairs:
            truth = self.totals.flow(proto, local, remote)
            if truth.local.packets + truth.remote.packets == 0:
                return False
            need[self._counting_probe(proto, local[0], True)] += truth.local.packets
            need[self._counting_probe(proto, local[0], False)] += truth.remote.packets
        explained = all(n <= self.misses.get(probe, 0) for probe, n in need.items() if n)
        print(f"[accounting] {len(pairs)} flows with no record need {dict(need)} missed hits; "
              f"the kernel counted {self.misses}: {'within' if explained else 'beyond'} that")
        return explained

    def verdict(self, stream: "FlowStream | None" = None) -> dict:
        """Judge every expected record once; fails listing the problems (with ``stream``'s
        loss notices and counters as context), prints the allowance used."""
        assert self.misses is not None, "verdict before the scenario ended"
        assert not self.result["judged"], "one verdict per scenario"
        problems: list[str] = []
        used: dict[str, int] = defaultdict(int)
        short_flows, short_packets, short_bytes, absent_flows = 0, 0, 0, 0
        shorts: list[str] = []
        for records, proto, want in self.expected:
            if len(records) != 1:
                problems.append(f"{len(records)} final records for one flow: {records}")
                continue
            f = records[0]
            absent = isinstance(f, AbsentFlow)
            name = f"{proto} {f.local.ip}:{f.local.port} -> {f.remote.ip}:{f.remote.port}"
            p = flow_problems(f, self.totals, proto, **want) if want and not absent else []
            absent_flows += absent
            truth = self.totals.flow(proto, (f.local.ip, f.local.port), (f.remote.ip, f.remote.port))
            if truth.local.packets + truth.remote.packets == 0:
                p.append("the capture has no packet of this flow")
            short = False
            for side, got_p, got_b, want_c, src, dst in (
                    ("local", f.local.packets, f.local.bytes, truth.local,
                     (f.local.ip, f.local.port), (f.remote.ip, f.remote.port)),
                    ("remote", f.remote.packets, f.remote.bytes, truth.remote,
                     (f.remote.ip, f.remote.port), (f.local.ip, f.local.port))):
                dp, db = want_c.packets - got_p, want_c.bytes - got_b
                if proto == "tcp" and dp >= 0 and db >= 0 and not absent:
                    p += self._sequence_problems(f, side, dp, db, src, dst)
                if dp == 0 and db == 0:
                    continue
                where = f"{side} side {got_p} packets/{got_b} bytes, capture {want_c.packets}/{want_c.bytes}"
                if dp < 0 or db < 0:
                    p.append(f"{where}: over the capture")
                    continue
                sizes = self._sizes(proto, src, dst, sent=(side == "local"))
                if not explainable(db, dp, sizes):
                    p.append(f"{where}: no {dp} captured packets of this side add up to the {db} bytes missing")
                    continue
                probe = self._counting_probe(proto, f.local.ip, side == "local")
                shorts.append(f"{name}: {where} (counted at {probe})")
                used[probe] += dp
                short_packets += dp
                short_bytes += db
                short = True
            short_flows += short
            if p:
                problems.append(f"{name}: {p}\n{f}")
        over = {pr: (n, self.misses.get(pr, 0)) for pr, n in used.items() if n > self.misses.get(pr, 0)}
        if over:
            problems.append("packets missing beyond the kernel-counted misses of their probes "
                            + ", ".join(f"{pr}: {n} missing, {m} missed" for pr, (n, m) in sorted(over.items()))
                            + "; short records:\n  " + "\n  ".join(shorts[:10]))
        misses = sum(self.misses.values())
        self.result.update(flows=len(self.expected), flows_short=short_flows, packets_short=short_packets,
                           bytes_short=short_bytes, flows_absent=absent_flows, short_by_probe=dict(used),
                           judged=True, ok=not problems)
        print(f"[accounting] {self.result['test']}: {len(self.expected)} flows judged; packet-probe misses "
              f"{misses} ({', '.join(f'{k} {v}' for k, v in self.misses.items() if v) or 'none'}); "
              f"{short_flows} flows short of the capture by {short_packets} packets / {short_bytes} bytes"
              + (f", {absent_flows} of them with no record at all" if absent_flows else "")
              + (" within that allowance" if not over else ", beyond that allowance"))
        if problems:
            context = f"\ndaemon's view: {stream.health()}" if stream is not None else ""
            raise AssertionError(f"{len(problems)} problems in {len(self.expected)} flows (packet-probe misses "
                                 f"measured in the kernel: {self.misses}):\n" + "\n".join(problems[:10]) + context)
        return self.result


def sequence_problems(f, ep, side: str, packets: list, short_packets: int, short_bytes: int) -> list[str]:
    """Problems of one TCP record side's ``sequence_space`` against that side's captured ``packets``.

    Socket-counter accounting has no packet samples to compare: the figures must be absent.
    Per-packet accounting: present once the side counted a packet. A side that counted every
    captured packet covers exactly the capture's payload span (:func:`oracle.tcp_payload_span`,
    from its SYN) and reports nothing uncounted. A side short of the capture by ``short_packets``
    packets and ``short_bytes`` IP bytes: the payload it counted (covered less uncounted) is the
    capture's span less the payload of those missing packets, whose headers (IP length less
    payload, per captured packet) make up the rest of ``short_bytes``; so the shortfall it
    reports is what the capture carried and no counted packet did.
    """
    name = f"{side} side sequence space"
    if not hasattr(ep, "HasField"):
        return []  # a stand-in record of the host-only tests, no protobuf message
    has = ep.HasField("sequence_space")
    if f.accounting != 0:  # ACCOUNTING_PACKETS
        return [f"{name} present under socket-counter accounting"] if has else []
    if not has:
        return [f"{name} missing"] if ep.packets else []
    q = ep.sequence_space
    span = oracle.tcp_payload_span(packets)
    problems = []
    if q.uncounted_bytes > q.payload_bytes:
        problems.append(f"{name}: {q.uncounted_bytes} uncounted of {q.payload_bytes}")
    if short_packets == 0 and short_bytes == 0:
        if q.uncounted_bytes:
            problems.append(f"{name}: {q.uncounted_bytes} bytes uncounted, none missing from the capture")
        if span is not None and (not q.from_syn or q.payload_bytes != span):
            problems.append(f"{name}: {q.payload_bytes} bytes (from_syn {q.from_syn}), capture span {span}")
        return problems
    if span is None or not q.from_syn:
        return problems  # the start was not counted: nothing exact to compare
    missing_payload = span - (q.payload_bytes - q.uncounted_bytes)
    if q.uncounted_bytes > missing_payload or not explainable(
            short_bytes - missing_payload, short_packets, [p.ip_len - p.tcp_payload for p in packets]):
        problems.append(f"{name}: {q.payload_bytes} covered, {q.uncounted_bytes} uncounted; capture span "
                        f"{span}, {short_packets} packets / {short_bytes} bytes missing")
    return problems


@contextlib.contextmanager
def scenario(vm, bpf: str):
    """Run the ``with`` body under ``vm.capture(bpf)`` and measure the daemon's packet-probe
    misses over it; yields a :class:`Scenario` (its capture is filled in on exit)."""
    group = probe_group(vm)
    sc = Scenario(vm, group, read_probe_misses(vm, group))
    with vm.capture(bpf) as cap:
        yield sc
    # The capture has stopped; the daemon's probes must still be there.
    probe_group(vm)
    sc._close(cap, read_probe_misses(vm, group))


def flow_problems(f, totals: oracle.Totals, proto: str, *, direction: int, pid: int,
                  user: tuple[str, int, int], name: str = "flowtool", complete: bool = True) -> list[str]:
    """Everything wrong with one final record's attributes (the counters are
    judged by :meth:`Scenario.verdict`); empty when it is right."""
    p = []
    if not f.final:
        p.append("not final")
    if f.complete != complete:
        p.append("not complete" if complete else "complete, though its start was not seen")
    if f.network.direction != direction:
        p.append(f"direction {f.network.direction}, want {direction}")
    if f.process.pid != pid or f.process.name != name:
        p.append(f"process {f.process.pid}/{f.process.name!r}, want {pid}/{name!r}")
    if f.user.id != user[1] or f.user.name != user[0] or f.credentials.uid != user[1]:
        p.append(f"user {f.user.id}/{f.user.name!r} (cred uid {f.credentials.uid}), want {user[1]}/{user[0]!r}")
    if not f.network.community_id.startswith("1:"):
        p.append(f"community_id {f.network.community_id!r}")
    return p
