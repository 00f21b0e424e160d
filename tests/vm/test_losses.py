"""Lost samples: a tiny ring loses under a burst and says so; the default does not.

With ``socket.ring_size_exponent: 0`` (one data page per CPU) a burst of
UDP datagrams overruns the perf rings: the daemon counts the lost samples
per CPU in GetStatus, sends in-band LossNotices (source KERNEL_RING, with
the CPU) to a StreamFlows subscriber, and keeps running and delivering
flows.  With the default exponent the same burst loses nothing and the
burst's flow carries exactly the datagrams the capture saw sent, short only
by missed hits of the daemon's ``ip_out`` probe that the kernel itself
counted in ``kprobe_profile`` during the burst (:class:`flowlib.Scenario`).
"""

from __future__ import annotations

import threading
import time

import grpc

import flowlib
import grpc_client

UDP_PORT = 9101
HTTP_PORT = 8080
#: Datagrams in the burst, and their payload size.  Sized so the default
#: rings (512 KiB per CPU) hold the whole burst even if the reader were not
#: scheduled at all: per datagram an ip_out and a udp_in sample (ip_in
#: drops UDP in the kernel), under 160 bytes each, about 160 KiB in the
#: worst case on one CPU; a one-page ring holds a few dozen samples.
BURST_DATAGRAMS = 500
DATAGRAM_BYTES = 64
FLOW_ARGS = ["-E", "socket.flow_inactive_timeout=2s", "-E", "socket.flow_termination_timeout=1s"]
#: How long to wait for records, notices and counters to settle.
WAIT_S = 90
#: Counters unchanged over this long count as settled (status is refreshed every second).
SETTLE_S = 3


class Subscriber:
    """A follow-mode StreamFlows subscription collected on a thread."""

    def __init__(self, vm):
        pb, rpc = grpc_client.load_stubs()
        self.pb = pb
        self.channel = grpc.insecure_channel(f"127.0.0.1:{vm.grpc_port}")
        self.stream = rpc.FlowServiceStub(self.channel).StreamFlows(
            pb.StreamFlowsRequest(follow=True), timeout=600)
        self.flows = []
        self.losses = []
        self.error = None
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for resp in self.stream:
                with self.lock:
                    kind = resp.WhichOneof("event")
                    if kind == "flow":
                        self.flows.append(resp.flow)
                    elif kind == "loss":
                        self.losses.append(resp.loss)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                self.error = e

    def wait_for(self, what: str, pred, timeout: float = WAIT_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                r = pred(self)
            if r:
                return r
            assert self.error is None, f"stream failed: {self.error}"
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}")

    def final_flow(self, local_port: int | None, remote_port: int, transport: str):
        code = {"tcp": self.pb.TRANSPORT_TCP, "udp": self.pb.TRANSPORT_UDP}[transport]
        for f in self.flows:
            if (f.final and f.network.transport == code and f.remote.port == remote_port
                    and (local_port is None or f.local.port == local_port)):
                return f
        return None

    def ring_losses_per_cpu(self) -> dict[int, int]:
        per_cpu: dict[int, int] = {}
        for loss in self.losses:
            if loss.source == self.pb.LOSS_SOURCE_KERNEL_RING:
                assert loss.HasField("cpu"), f"KERNEL_RING loss notice without a CPU: {loss}"
                per_cpu[loss.cpu] = per_cpu.get(loss.cpu, 0) + loss.count
        return per_cpu

    def close(self):
        self.stream.cancel()
        self.channel.close()


def status(vm):
    pb, rpc = grpc_client.load_stubs()
    with grpc.insecure_channel(f"127.0.0.1:{vm.grpc_port}") as ch:
        return rpc.FlowServiceStub(ch).GetStatus(pb.GetStatusRequest(), timeout=30)


def burst(vm) -> int:
    """Send the burst from one socket; returns the sender's port."""
    vm.run(f"netstat -lun | grep -q ':{UDP_PORT} ' || "
           f"(socat -u UDP4-RECV:{UDP_PORT} /dev/null </dev/null >/dev/null 2>&1 &)", check=True)
    vm.run(f"n=0; while ! netstat -lun | grep -q ':{UDP_PORT} '; do usleep 100000; n=$((n+1)); "
           f"[ $n -lt 100 ] || exit 1; done", check=True)
    r = vm.run(f"dd if=/dev/zero bs={DATAGRAM_BYTES} count={BURST_DATAGRAMS} 2>/dev/null | "
               f"socat -u -b {DATAGRAM_BYTES} - UDP4-SENDTO:127.0.0.1:{UDP_PORT},bind=127.0.0.1:9102",
               check=True, timeout=120)
    assert r.rc == 0
    return 9102


def http_flow_after(vm, sub: Subscriber):
    """A wget after the burst must still become a final flow on the subscription."""
    vm.run(f"netstat -ltn | grep -q ':{HTTP_PORT} ' || httpd -p {HTTP_PORT} -h /www", check=True)
    vm.run(f"wget -q -O /dev/null http://127.0.0.1:{HTTP_PORT}/index.html", check=True)
    return sub.wait_for("a final flow of the wget after the burst",
                        lambda s: s.final_flow(None, HTTP_PORT, "tcp"))


def settled_losses(vm, sub: Subscriber) -> tuple[dict[int, int], dict[int, int]]:
    """Per-CPU lost samples in GetStatus and in KERNEL_RING notices, once neither changes."""
    deadline = time.monotonic() + WAIT_S
    prev = None
    while True:
        st = status(vm)
        with sub.lock:
            cur = ({c.cpu: c.lost for c in st.cpus if c.lost}, sub.ring_losses_per_cpu())
        if cur == prev:
            return cur
        assert time.monotonic() < deadline, f"loss counters never settled: {cur}"
        prev = cur
        time.sleep(SETTLE_S)


def minus(a: dict[int, int], b: dict[int, int]) -> dict[int, int]:
    return {k: a.get(k, 0) - b.get(k, 0) for k in set(a) | set(b) if a.get(k, 0) != b.get(k, 0)}


def test_tiny_ring_reports_losses_and_keeps_running(vm):
    vm.start_daemon(FLOW_ARGS + ["-E", "socket.ring_size_exponent=0"])
    sub = Subscriber(vm)
    try:
        sub.wait_for("the subscription", lambda s: len(status(vm).subscribers) == 1)
        # A one-page ring may already have lost samples before the
        # subscription existed: compare growth from a settled baseline.
        base_status, base_notices = settled_losses(vm, sub)
        burst(vm)
        sub.wait_for("KERNEL_RING loss notices", lambda s: s.ring_losses_per_cpu() != base_notices)
        end_status, end_notices = settled_losses(vm, sub)
        lost = minus(end_status, base_status)
        assert lost and all(n > 0 for n in lost.values()), f"GetStatus shows no new lost samples: {lost}"
        notified = minus(end_notices, base_notices)
        assert lost == notified, \
            f"per-CPU lost in status {lost} != KERNEL_RING notices {notified}; all notices: {sub.losses}"
        st = status(vm)
        assert sum(c.samples for c in st.cpus) > 0
        assert vm.daemon.alive(), "daemon died under the burst"
        http_flow_after(vm, sub)
        assert status(vm).serving
    finally:
        sub.close()
    assert vm.stop_daemon("TERM") == 0


def test_default_ring_loses_nothing_on_same_burst(vm):
    vm.start_daemon(FLOW_ARGS)
    sub = Subscriber(vm)
    try:
        sub.wait_for("the subscription", lambda s: len(status(vm).subscribers) == 1)
        with flowlib.scenario(vm, f"udp port {UDP_PORT}") as sc:
            port = burst(vm)
        sender = ("127.0.0.1", port)
        sent = sc.totals.flow("udp", sender, ("127.0.0.1", UDP_PORT)).local
        # The workload itself, as the capture saw it: every datagram sent once.
        assert (sent.packets, sent.bytes) == (BURST_DATAGRAMS, BURST_DATAGRAMS * (DATAGRAM_BYTES + 28)), \
            f"the capture saw {sent} sent by the burst"
        flow = sub.wait_for("the burst's final UDP flow",
                            lambda s: s.final_flow(port, UDP_PORT, "udp"))
        # The wget after the burst proves the pipeline has caught up past it.
        http_flow_after(vm, sub)
        st = status(vm)
        assert sum(c.samples for c in st.cpus) >= 2 * BURST_DATAGRAMS, "fewer samples than the burst's sends"
        assert all(c.lost == 0 for c in st.cpus), f"lost samples with the default ring: {list(st.cpus)}"
        pb = grpc_client.load_stubs()[0]
        with sub.lock:
            # Probe-miss notices are not ring losses; any other notice is.
            ring = [x for x in sub.losses if x.source != pb.LOSS_SOURCE_KRETPROBE_MISS]
            assert not ring, f"loss notices with the default ring: {ring}"
        # The burst's flow against the capture, with the kernel-counted
        # ip_out misses of the burst as the only allowance.
        with sub.lock:
            records = [f for f in sub.flows if f.final and f.network.transport == flow.network.transport
                       and (f.local.port, f.remote.port) == (port, UDP_PORT)]
        sc.expect(records, "udp")
        sc.verdict()
    finally:
        sub.close()
    assert vm.stop_daemon("TERM") == 0
