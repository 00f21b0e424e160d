"""Shared helpers of the flow scenarios (``test_flows*.py``).

* :func:`install_guest_tools` builds ``flowtool.c`` statically on the host,
  copies it into the guest and adds the unprivileged users the workloads
  run as.
* :class:`FlowStream` follows ``StreamFlows`` in a background thread and
  collects every envelope.
* :func:`check_flow` compares one final record against the packet capture
  and what the workload deterministically did.
"""

from __future__ import annotations

import ipaddress
import subprocess
import threading
import time
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
#: How long a failing flow check waits for probe-miss notices (the daemon
#: polls kprobe_profile every 2 s).
MISS_NOTICE_WAIT_S = 6
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
    src = HERE / "flowtool.c"
    out = bed.logs_root() / "flowtool"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        out.parent.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", str(out), str(src)],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"building flowtool failed:\n{r.stderr}"
    return out


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

    def reported_misses(self) -> int:
        """Probe misses told in-band so far (KRETPROBE_MISS loss notices)."""
        return sum(x.count for x in self.losses() if x.source == self.pb.LOSS_SOURCE_KRETPROBE_MISS)

    def losses(self) -> list:
        with self.lock:
            return [r.loss for r in self.items if r.WhichOneof("event") == "loss"]

    def finals(self, transport: int, local: tuple[str, int], remote: tuple[str, int]) -> list:
        """Final records of one flow (by transport and both endpoints)."""
        return [f for f in self.flows() if f.final and f.network.transport == transport
                and f.local.port == local[1] and f.remote.port == remote[1]
                and same_ip(f.local.ip, local[0]) and same_ip(f.remote.ip, remote[0])]

    def wait_finals(self, transport: int, pairs: list[tuple[tuple[str, int], tuple[str, int]]],
                    timeout: float = FINAL_WAIT_S) -> dict:
        """Wait until every (local, remote) pair has a final record; returns pair -> records."""
        def ready():
            by = self.index(transport)
            return all(by.get(_key(loc, rem)) for loc, rem in pairs)
        try:
            wait_until(ready, timeout, f"final records of {len(pairs)} flows", interval=1)
        except AssertionError:
            by = self.index(transport)
            missing = [p for p in pairs if not by.get(_key(*p))]
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


def _key(local: tuple[str, int], remote: tuple[str, int]) -> tuple:
    return (str(ipaddress.ip_address(local[0])), local[1], str(ipaddress.ip_address(remote[0])), remote[1])


def short_by_reported_misses(f, totals: oracle.Totals, proto: str, missed: int) -> bool:
    """The record is short of the capture, never over it, by at most ``missed`` packets.

    A kprobe hit while another kprobe handler runs on the same CPU (a
    softirq taking a packet in the middle of a handler) is dropped by the
    kernel and counted in kprobe_profile; the daemon reports those as
    KRETPROBE_MISS losses. A record may then lack that many packets.
    """
    want = totals.flow(proto, (f.local.ip, f.local.port), (f.remote.ip, f.remote.port))
    dl, dr = want.local.packets - f.local.packets, want.remote.packets - f.remote.packets
    return (dl >= 0 and dr >= 0 and 0 < dl + dr <= missed
            and f.local.bytes <= want.local.bytes and f.remote.bytes <= want.remote.bytes)


def problems_allowing_misses(f, totals: oracle.Totals, proto: str, stream: "FlowStream | None",
                             **want) -> list[str]:
    """flow_problems with the probe misses ``stream`` was told of; when the record is wrong,
    waits a little for a miss notice still on its way (the daemon polls misses)."""
    if stream is None:
        return flow_problems(f, totals, proto, **want)
    problems = flow_problems(f, totals, proto, missed=stream.reported_misses(), **want)
    deadline = time.monotonic() + MISS_NOTICE_WAIT_S
    while problems and time.monotonic() < deadline:
        time.sleep(0.5)
        problems = flow_problems(f, totals, proto, missed=stream.reported_misses(), **want)
    return problems


def flow_problems(f, totals: oracle.Totals, proto: str, *, direction: int, pid: int,
                  user: tuple[str, int, int], name: str = "flowtool", missed: int = 0) -> list[str]:
    """Everything wrong with one final record; empty when it is right.

    ``missed``: probe misses the daemon reported in-band; the counters may
    be short of the capture by that many packets (see short_by_reported_misses).
    """
    p = []
    if not f.final:
        p.append("not final")
    if not f.complete:
        p.append("not complete")
    if f.network.direction != direction:
        p.append(f"direction {f.network.direction}, want {direction}")
    if f.process.pid != pid or f.process.name != name:
        p.append(f"process {f.process.pid}/{f.process.name!r}, want {pid}/{name!r}")
    if f.user.id != user[1] or f.user.name != user[0] or f.credentials.uid != user[1]:
        p.append(f"user {f.user.id}/{f.user.name!r} (cred uid {f.credentials.uid}), want {user[1]}/{user[0]!r}")
    if not f.network.community_id.startswith("1:"):
        p.append(f"community_id {f.network.community_id!r}")
    truth = totals.flow(proto, (f.local.ip, f.local.port), (f.remote.ip, f.remote.port))
    if truth.local.packets + truth.remote.packets == 0:
        p.append("the capture has no packet of this flow")
    try:
        oracle.assert_flow_matches(totals, proto, (f.local.ip, f.local.port), (f.remote.ip, f.remote.port),
                                   local_packets=f.local.packets, local_bytes=f.local.bytes,
                                   remote_packets=f.remote.packets, remote_bytes=f.remote.bytes)
    except AssertionError as e:
        if not short_by_reported_misses(f, totals, proto, missed):
            p.append(str(e) + (f" (probe misses reported: {missed})" if missed else ""))
    return p


def check_flow(records: list, totals: oracle.Totals, proto: str, stream: "FlowStream | None" = None,
               **want) -> None:
    """Exactly one final record, and it matches the capture and the workload."""
    health = f"\n{stream.health()}" if stream is not None else ""
    assert len(records) == 1, f"{len(records)} final records for one flow: {records}{health}"
    problems = problems_allowing_misses(records[0], totals, proto, stream, **want)
    assert not problems, f"{proto} flow {records[0].local.ip}:{records[0].local.port} -> " \
                         f"{records[0].remote.ip}:{records[0].remote.port}: {problems}\n{records[0]}{health}"
