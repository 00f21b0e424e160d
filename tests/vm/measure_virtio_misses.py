#!/usr/bin/env python3
"""Probe hits the kernel drops on a virtio transfer: a measurement, not a test.

For each kernel (one boot each) the daemon runs with BTF offsets and one
StreamFlows subscriber while the host sends ``TRANSFER_BYTES`` to a guest
reader over eth0, ``ROUNDS`` times. qemu's user networking runs with
``restrict=on``, so the guest reaches no service on the host; the host
connects through the forwarded port instead and the bytes flow host → guest
over the virtio NIC, as in a download. Each transfer runs under the packet
capture (``flowlib.scenario``), which gives per round:

* the kernel's own miss counters of every probe of the daemon
  (``kprobe_profile``, read before and after in the guest),
* the packets of the guest's flow in the capture and in its final record
  (the shortfall is what the dropped hits cost the flow),
* the daemon's ``GetStatus.kretprobe_misses`` before and after, and at the
  end the in-band ``KRETPROBE_MISS`` loss notices the subscriber received.

Results go to ``<SOCKSCOPE_VM_LOGS>/virtio-misses.json``, a summary per
kernel to stdout.

    python3 tests/vm/measure_virtio_misses.py [suite ...]   # default: all four
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc  # noqa: E402

import bed  # noqa: E402
import flowlib  # noqa: E402
import kernels  # noqa: E402
from flowlib import SERVER_USER, FlowStream  # noqa: E402

#: Bytes per transfer.
TRANSFER_BYTES = 300 * 1024
#: Transfers per kernel.
ROUNDS = 20
#: The forwarded guest port of the virtio scenarios (bed.EXTRA_FORWARDS).
PORT = 9180
GUEST_V4 = "10.0.2.15"
#: How long the final record's wait may take (the flow is final 1 s after
#: its close).
FINAL_WAIT_S = 60


def one_round(vm, stream: FlowStream, stub, pb) -> dict:
    st0 = stub.GetStatus(pb.GetStatusRequest(), timeout=30).kretprobe_misses
    group = flowlib.probe_group(vm)
    before = flowlib.read_probe_misses(vm, group)
    t0 = time.monotonic()
    with flowlib.scenario(vm, f"tcp port {PORT}") as sc:
        srv = flowlib.spawn_server(vm, SERVER_USER, f"tcp-recv {GUEST_V4} {PORT} 1")
        with socket.create_connection(("127.0.0.1", vm.forwards[("tcp", PORT)]), timeout=60) as s:
            s.sendall(b"d" * TRANSFER_BYTES)
            s.shutdown(socket.SHUT_WR)
            assert s.recv(1) == b"", "the receiver sent data"
        assert srv.wait(flowlib.WORKLOAD_WAIT_S) == 0, srv.log()
    took = time.monotonic() - t0
    after = flowlib.read_probe_misses(vm, group)
    st1 = stub.GetStatus(pb.GetStatusRequest(), timeout=30).kretprobe_misses
    peers = {src for (p, src, dst) in sc.totals.tuples() if p == "tcp" and dst == (GUEST_V4, PORT)}
    assert len(peers) == 1, f"peers in the capture: {peers}"
    peer = next(iter(peers))
    local = (GUEST_V4, PORT)
    rec = stream.wait_finals(pb.TRANSPORT_TCP, [(local, peer)], timeout=FINAL_WAIT_S)[(local, peer)]
    truth = sc.totals.flow("tcp", local, peer)
    f = rec[-1]
    return {
        "seconds": round(took, 2),
        "misses": {p: after.get(p, 0) - before.get(p, 0) for p in after if after.get(p, 0) != before.get(p, 0)},
        "status_kretprobe_misses": st1 - st0,
        "captured_in": truth.remote.packets, "captured_in_bytes": truth.remote.bytes,
        "captured_out": truth.local.packets,
        "record_in": f.remote.packets, "record_in_bytes": f.remote.bytes, "record_out": f.local.packets,
        "short_in": truth.remote.packets - f.remote.packets, "short_out": truth.local.packets - f.local.packets,
        "final_records": len(rec),
    }


def run_suite(suite: str, rounds: int) -> dict:
    out: dict = {"suite": suite, "rounds": []}
    with bed.VM(suite, with_daemon=True, logdir=bed.logs_root() / f"virtio-misses-{suite}") as vm:
        out["kernel"] = vm.run("uname -r", check=True).out.strip()
        flowlib.install_guest_tools(vm)
        flowlib.start_daemon(vm, "btf", ["-E", "socket.flow_termination_timeout=1s"])
        stream = FlowStream(vm)
        pb = stream.pb
        try:
            with grpc.insecure_channel(f"127.0.0.1:{vm.grpc_port}") as ch:
                _, rpc = flowlib.grpc_client.load_stubs()
                stub = rpc.FlowServiceStub(ch)
                for i in range(rounds):
                    r = one_round(vm, stream, stub, pb)
                    out["rounds"].append(r)
                    print(f"[virtio-misses] {suite} {i + 1}/{rounds} {r}", file=sys.stderr, flush=True)
                # Loss notices are emitted on the daemon's tick: give the last ones time to come.
                time.sleep(3)
                out["inband_kretprobe_miss"] = sum(
                    n.count for n in stream.losses() if n.source == pb.LOSS_SOURCE_KRETPROBE_MISS)
                out["status_kretprobe_misses_end"] = stub.GetStatus(pb.GetStatusRequest(),
                                                                    timeout=30).kretprobe_misses
        finally:
            stream.close()
        out["daemon_exit"] = vm.stop_daemon("TERM")
    rs = out["rounds"]
    total = Counter()
    for r in rs:
        total.update(r["misses"])
    out["summary"] = {
        "rounds": len(rs),
        "rounds_with_misses": sum(1 for r in rs if r["misses"]),
        "misses_by_probe": dict(total),
        "rounds_short": sum(1 for r in rs if r["short_in"] or r["short_out"]),
        "packets_short_in": sum(r["short_in"] for r in rs),
        "packets_short_out": sum(r["short_out"] for r in rs),
        "captured_in_per_round": sorted({r["captured_in"] for r in rs}),
        "max_short_in": max((r["short_in"] for r in rs), default=0),
        "seconds_per_round": round(sum(r["seconds"] for r in rs) / max(len(rs), 1), 2),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("suites", nargs="*", help=f"kernels (default: {' '.join(kernels.SUITES)})")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    a = ap.parse_args(argv)
    unknown = sorted(set(a.suites) - set(kernels.SUITES))
    if unknown:
        ap.error(f"unknown suites {unknown} (known: {' '.join(kernels.SUITES)})")
    path = bed.logs_root() / "virtio-misses.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for suite in a.suites or kernels.SUITES:
        results[suite] = run_suite(suite, a.rounds)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
        s = results[suite]
        print(f"{suite} {s['kernel']}: {json.dumps(s['summary'])}; in-band KRETPROBE_MISS "
              f"{s['inband_kretprobe_miss']}, status {s['status_kretprobe_misses_end']}, exit {s['daemon_exit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
