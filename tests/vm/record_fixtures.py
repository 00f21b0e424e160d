#!/usr/bin/env python3
"""Record decoder fixtures through the daemon's own ``socket.record_path``.

    python3 tests/vm/record_fixtures.py [suite ...]      (default: all four)

For each kernel suite this boots the guest (``bed.VM``), and runs two
sessions, each with its own daemon run (BTF offsets, the production probe
set) recording every raw sample it reads, and its own tcpdump capture in
the guest around the workload:

* ``flows``: TCP over 127.0.0.1 and ::1 (two connections each, payload
  both ways), UDP over 127.0.0.1 and ::1: a connected client to a
  receive-only server, and an unconnected echo server talking to three
  peers (one connected, two unconnected clients).
* ``churn``: short HTTP GETs from one shell loop (busybox ``wget``) to
  busybox ``httpd``, each its own connection.

Around the capture it reads ``kprobe_events``/``kprobe_profile`` for the
daemon's group; the packet probes' ``nmissed`` growth is the only loss the
replay test may allow. A session with misses or ring losses is retried
(``--attempts``); the best attempt is kept.

Output, per kernel, in ``tests/fixtures/recorded/<major.minor>/``:
``<session>.rec`` (the daemon's recording), ``<session>.totals.txt`` (the
capture's packets and IP bytes per 5-tuple and direction), ``<session>.pcap``
(when small), ``<session>.json`` (kernel, excluded ports, probe misses and
hits, the workload's processes and endpoints), ``kernel.txt``, ``README.md``.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bed  # noqa: E402
import flowlib  # noqa: E402
import kernels  # noqa: E402
import oracle  # noqa: E402
from flowlib import CLIENT_USER, SERVER_USER  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OUT_ROOT = REPO / "tests" / "fixtures" / "recorded"
TRACEFS = "/sys/kernel/tracing"
#: Probes on the packet path: their misses are packets the recording lacks.
PACKET_PROBES = ("ip_out", "ip6_out", "ip_in", "ip6_in", "udp_in")
#: Ports the capture never sees (the bed's control channel is filtered by
#: bed.capture, the gRPC port here), so the replay ignores them.
EXCLUDED_PORTS = (bed.GUEST_CONTROL_PORT, bed.GUEST_GRPC_PORT)
#: Workload ports.
TCP_PORT_V4, TCP_PORT_V6 = 9110, 9111
UDP_RECV_V4, UDP_RECV_V6 = 9210, 9211
UDP_ECHO_PORT = 9212
HTTP_PORT = 8081
TCP_CONNECTIONS = 2
TCP_CLIENT_BYTES = 3000
UDP_DATAGRAMS = 3
UDP_SIZE = 200
CHURN_GETS = 120
#: A pcap larger than this is not committed (the totals file always is).
PCAP_COMMIT_LIMIT = 100_000
#: Recording frame kinds (src/ring/record.rs).
KIND_SAMPLE, KIND_LOST = 1, 2


def ep(addr: str, port: int) -> str:
    """An endpoint as Rust's SocketAddr parses it."""
    ip = ipaddress.ip_address(addr)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


# --------------------------------------------------------------------------- probe misses

def profile(vm, group: str) -> dict[str, tuple[int, int]]:
    """name -> (hits, missed) of the probes of ``group``.

    kprobe_profile lists probes by event name in the order of kprobe_events
    (older kernels without the group), so both are read in one command and
    paired line by line; a pair that does not line up is read again.
    """
    for _ in range(5):
        r = vm.run(f"cat {TRACEFS}/kprobe_events; echo '#--#'; cat {TRACEFS}/kprobe_profile", check=True)
        events_txt, _, profile_txt = r.out.partition("#--#\n")
        probes = []
        for line in events_txt.splitlines():
            head = line.split()[0] if line.split() else ""
            gn = head.split(":", 1)[1] if ":" in head else ""
            if "/" in gn:
                probes.append(tuple(gn.split("/", 1)))
        rows = [line.split() for line in profile_txt.splitlines() if len(line.split()) >= 3]
        if len(rows) != len(probes):
            continue
        out = {}
        ok = True
        for (g, n), row in zip(probes, rows):
            if row[0].rsplit("/", 1)[-1] != n:
                ok = False
                break
            if g == group:
                out[n] = (int(row[1]), int(row[2]))
        if ok and out:
            return out
        time.sleep(0.2)
    raise bed.BedError(f"{vm.suite}: kprobe_events and kprobe_profile do not pair up")


# --------------------------------------------------------------------------- recording check

def recording_stats(data: bytes) -> dict:
    """Counts of a recording (format version 1): events, samples, lost records and samples."""
    if data[:8] != b"SSCOPREC" or struct.unpack_from("<I", data, 8)[0] != 1:
        raise bed.BedError("not a version 1 sockscope recording")
    off = 12
    (n,) = struct.unpack_from("<I", data, off)
    off += 4 + n  # clock name
    (events,) = struct.unpack_from("<I", data, off)
    off += 4
    for _ in range(2 * events):
        (n,) = struct.unpack_from("<I", data, off)
        off += 4 + n
    samples = lost_frames = lost = 0
    while off + 4 <= len(data):
        (n,) = struct.unpack_from("<I", data, off)
        kind = data[off + 4]
        if kind == KIND_SAMPLE:
            samples += 1
        elif kind == KIND_LOST:
            lost_frames += 1
            lost += struct.unpack_from("<Q", data, off + 9)[0]
        off += 4 + n
    if off != len(data):
        raise bed.BedError(f"recording ends inside a frame ({off} != {len(data)})")
    return {"events": events, "samples": samples, "lost_records": lost_frames, "lost_samples": lost}


# --------------------------------------------------------------------------- workloads
#
# Each workload is one guest shell script run by one control request: every
# control request is itself traffic and process activity the daemon
# records, so the fewer, the smaller the fixture.

GUEST_SH_HELPERS = r"""
D=/tmp/bed/wl; rm -rf $D; mkdir -p $D
fail() { echo "FAIL $*"; exit 1; }
# wait_line FILE WORD: until WORD is in FILE (a server's ready line).
wait_line() { n=0; until grep -q "$2" "$1" 2>/dev/null; do usleep 20000; n=$((n+1)); [ $n -lt 1500 ] || fail "no $2 in $1: $(cat $1)"; done; }
# wait_recv PID: until PID sleeps in recvfrom (its bound address is then known).
wait_recv() { n=0; until [ "$(cut -d' ' -f1 /proc/$1/syscall 2>/dev/null)" = 45 ]; do usleep 20000; n=$((n+1)); [ $n -lt 1500 ] || fail "pid $1 not in recvfrom"; done; }
# run_ok PID TAG: wait for PID, fail with its log unless it exits 0.
run_ok() { wait $1 || fail "$2 exited $?: $(cat $D/$2.log)"; }
# server TAG UID ARGS: start a flowtool server, wait until ready, print its pid.
server() { t=$1; u=$2; shift 2; %(ft)s -u $u:$u "$@" >$D/$t.log 2>&1 & eval "pid_$t=$!"; wait_line $D/$t.log ready; echo "pid $t $(eval echo \$pid_$t)"; }
# client TAG UID ARGS: run a flowtool client to completion; print its pid and local endpoints.
client() { t=$1; u=$2; shift 2; %(ft)s -u $u:$u "$@" >$D/$t.log 2>&1 & p=$!; run_ok $p $t; echo "pid $t $p"; sed -n "s/^local /local $t /p" $D/$t.log; }
""" % {"ft": flowlib.FLOWTOOL}


GUEST_SCRIPT = "/tmp/bed/workload.sh"


def put_script(vm, body: str) -> None:
    """Put helpers + ``body`` into the guest, to be run by :func:`run_script`.

    Put before the daemon starts: a RUN request line is read byte by byte,
    each byte a receive the daemon would record.
    """
    vm.put(GUEST_SCRIPT, (GUEST_SH_HELPERS + body).encode())


def run_script(vm) -> dict[str, dict]:
    """Run the workload script; returns tag -> {"pid", "locals"} from its output."""
    return _parse_script_output(vm, vm.run(f"sh {GUEST_SCRIPT}", timeout=600))


def _parse_script_output(vm, r: bed.Result) -> dict[str, dict]:
    if r.rc != 0 or "FAIL" in r.out:
        raise bed.BedError(f"{vm.suite}: workload failed (rc {r.rc}):\n{r.out}\n{r.err}")
    tags: dict[str, dict] = {}
    for line in r.out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "pid":
            tags.setdefault(parts[1], {"locals": []})["pid"] = int(parts[2])
        elif len(parts) == 4 and parts[0] == "local":
            tags.setdefault(parts[1], {"locals": []})["locals"].append(int(parts[3]))
    return tags


def flows_workload(vm):
    """TCP and UDP over v4/v6 loopback: the script, and what turns its output into
    the processes and their endpoints."""
    srv, cli = SERVER_USER[1], CLIENT_USER[1]
    steps = []  # (tag, role, addr, port, extra manifest fields)
    body = []
    for i, (addr, port) in enumerate((("127.0.0.1", TCP_PORT_V4), ("::1", TCP_PORT_V6))):
        body += [f"server ts{i} {srv} tcp-serve {addr} {port} {TCP_CONNECTIONS}",
                 f"client tc{i} {cli} tcp-client {addr} {port} {TCP_CONNECTIONS} {TCP_CLIENT_BYTES}",
                 f"run_ok $pid_ts{i} ts{i}"]
        steps += [(f"ts{i}", "tcp_server", addr, port, {}), (f"tc{i}", "tcp_client", addr, port, {})]
    # Receive-only servers, each fed by one client (v4 connected, v6 unconnected).
    for i, (addr, port, mode) in enumerate((("127.0.0.1", UDP_RECV_V4, "connect"),
                                            ("::1", UDP_RECV_V6, "sendto"))):
        body += [f"server ur{i} {srv} udp-recv {addr} {port} {UDP_DATAGRAMS}", f"wait_recv $pid_ur{i}",
                 f"client uc{i} {cli} udp-client {addr} {port} {UDP_DATAGRAMS} {UDP_SIZE} {mode} noreply",
                 f"run_ok $pid_ur{i} ur{i}"]
        steps += [(f"ur{i}", "udp_server", addr, port, {"receive_only": True}),
                  (f"uc{i}", "udp_client", addr, port, {"mode": mode})]
    # One unconnected echo socket per family, three peers each.
    for i, addr in enumerate(("127.0.0.1", "::1")):
        body += [f"server ue{i} {srv} udp-echo {addr} {UDP_ECHO_PORT} {3 * UDP_DATAGRAMS}", f"wait_recv $pid_ue{i}"]
        for j, mode in enumerate(("connect", "sendto", "sendto")):
            body.append(f"client up{i}{j} {cli} udp-client {addr} {UDP_ECHO_PORT} {UDP_DATAGRAMS} {UDP_SIZE} "
                        f"{mode} reply")
            steps.append((f"up{i}{j}", "udp_client", addr, UDP_ECHO_PORT, {"mode": mode}))
        body.append(f"run_ok $pid_ue{i} ue{i}")
        steps.append((f"ue{i}", "udp_server", addr, UDP_ECHO_PORT, {"receive_only": False}))
    return "\n".join(body) + "\n", lambda tags: flows_processes(vm, steps, tags)


def flows_processes(vm, steps, tags: dict[str, dict]) -> list[dict]:
    srv, cli = SERVER_USER[1], CLIENT_USER[1]
    procs = []
    for tag, role, addr, port, extra in steps:
        t = tags.get(tag)
        if t is None or "pid" not in t:
            raise bed.BedError(f"{vm.suite}: no pid of {tag} in the workload output")
        if role.endswith("_server"):
            procs.append({"role": role, "pid": t["pid"], "uid": srv, "local": ep(addr, port), **extra})
        else:
            want = TCP_CONNECTIONS if role == "tcp_client" else 1
            if len(t["locals"]) != want:
                raise bed.BedError(f"{vm.suite}: {tag} printed {t['locals']} local ports")
            # An unconnected socket's getsockname shows the wildcard address:
            # the local address is the one it talks over.
            procs.append({"role": role, "pid": t["pid"], "uid": cli, "remote": ep(addr, port),
                          "locals": [ep(addr, p) for p in t["locals"]], **extra})
    return procs


def churn_workload(vm):
    """CHURN_GETS short HTTP GETs from one shell loop to busybox httpd."""
    body = f"""
httpd -f -p 127.0.0.1:{HTTP_PORT} -h /www & h=$!
n=0; until grep -q ':{HTTP_PORT:04X} 00000000:0000 0A' /proc/net/tcp; do usleep 20000; n=$((n+1)); [ $n -lt 1500 ] || fail "httpd not listening"; done
( i=0; while [ $i -lt {CHURN_GETS} ]; do wget -q -O /dev/null http://127.0.0.1:{HTTP_PORT}/index.html || exit 1; i=$((i+1)); done ) & l=$!
wait $l || fail "wget loop exited $?"
kill $h; wait $h
echo "pid httpd $h"; echo "pid loop $l"
"""
    def processes(tags: dict[str, dict]) -> list[dict]:
        return [{"role": "http_server", "pid": tags["httpd"]["pid"], "uid": 0, "local": ep("127.0.0.1", HTTP_PORT)},
                {"role": "churn_client", "pid": tags["loop"]["pid"], "uid": 0,
                 "remote": ep("127.0.0.1", HTTP_PORT), "connections": CHURN_GETS}]
    return body, processes


SESSIONS = {"flows": flows_workload, "churn": churn_workload}


# --------------------------------------------------------------------------- one session

def totals_text(t: oracle.Totals) -> str:
    lines = ["# proto src dst direction packets ip_bytes (tcpdump -i any in the guest; sent: transmitted "
             "by the guest, received: delivered to it; a loopback packet is both)"]
    for name, table in (("sent", t.sent), ("received", t.received)):
        for (proto, src, dst), c in sorted(table.items()):
            lines.append(f"{proto} {ep(*src)} {ep(*dst)} {name} {c.packets} {c.bytes}")
    return "\n".join(lines) + "\n"


def start_capture(vm, pcap: str, bpf: str) -> bed.Spawned:
    """tcpdump on all interfaces in the guest, as bed.VM.capture runs it; the
    file is fetched only after the daemon stopped (a fetch is traffic the
    daemon would record)."""
    proc = vm.spawn(f"exec tcpdump -Z root -n -U --immediate-mode -s {bed.CAPTURE_SNAPLEN} -i any -w {pcap} "
                    f"'({bpf}) and not port {bed.GUEST_CONTROL_PORT}'")
    flowlib.wait_until(lambda: "listening on" in proc.log() or not proc.alive(), 30, "tcpdump to start")
    if not proc.alive():
        raise bed.BedError(f"{vm.suite}: tcpdump did not start: {proc.log()}")
    return proc


def record_session(vm, session: str) -> dict:
    guest_rec, guest_pcap = f"/tmp/bed/{session}.rec", f"/tmp/bed/{session}.pcap"
    vm.run(f"rm -f {guest_rec} {guest_pcap}", check=True)
    body, processes = SESSIONS[session](vm)
    put_script(vm, body)
    vm.start_daemon(["-E", "socket.offsets=btf", "-E", f"socket.record_path={guest_rec}"])
    group = f"sockscope_{vm.daemon.pid}"
    try:
        before = profile(vm, group)
        tcpdump = start_capture(vm, guest_pcap, f"(tcp or udp) and not port {bed.GUEST_GRPC_PORT}")
        try:
            tags = run_script(vm)
        finally:
            time.sleep(0.5)  # let in-flight packets reach the capture
            tcpdump.stop("INT")
        after = profile(vm, group)
    finally:
        rc = vm.stop_daemon("TERM")
    assert rc == 0, f"daemon exited {rc}: {vm.daemon_log()}"
    procs = processes(tags)
    data = vm.fetch(guest_rec, timeout=300)
    pcap = vm.fetch(guest_pcap, timeout=300)
    (vm.logdir / f"{session}.pcap").write_bytes(pcap)
    packets = oracle.parse_pcap(pcap)
    probes = {n: {"hits": after[n][0] - before[n][0], "missed": after[n][1] - before[n][1]}
              for n in sorted(after) if n in before}
    return {
        "recording": data,
        "pcap": pcap,
        "totals": totals_text(oracle.Totals(packets)),
        "manifest": {
            "session": session,
            "suite": vm.suite,
            "kernel_release": vm.kernel.release,
            "kernel_package_version": vm.kernel.version,
            "probe_group": group,
            "excluded_ports": list(EXCLUDED_PORTS),
            "packet_probe_misses": sum(probes.get(n, {}).get("missed", 0) for n in PACKET_PROBES),
            "probes": probes,
            "recording": recording_stats(data),
            "captured_packets": len(packets),
            "processes": procs,
        },
    }


def head_commit() -> str:
    r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def record_suite(suite: str, attempts: int) -> Path:
    with bed.VM(suite, with_daemon=True) as vm:
        flowlib.install_guest_tools(vm)
        minor = ".".join(vm.kernel.release.split(".")[:2])
        out = OUT_ROOT / minor
        out.mkdir(parents=True, exist_ok=True)
        kept = {}
        for session in SESSIONS:
            best = None
            for attempt in range(1, attempts + 1):
                r = record_session(vm, session)
                m = r["manifest"]
                bad = m["packet_probe_misses"] + m["recording"]["lost_samples"]
                print(f"[record] {suite} {session} attempt {attempt}: {m['recording']['samples']} samples, "
                      f"{m['captured_packets']} captured packets, packet-probe misses "
                      f"{m['packet_probe_misses']}, ring losses {m['recording']['lost_samples']}", flush=True)
                if best is None or bad < best[0]:
                    best = (bad, r)
                if bad == 0:
                    break
            r = best[1]
            r["manifest"]["attempts"] = attempt
            (out / f"{session}.rec").write_bytes(r["recording"])
            (out / f"{session}.totals.txt").write_text(r["totals"])
            (out / f"{session}.json").write_text(json.dumps(r["manifest"], indent=1) + "\n")
            pcap = out / f"{session}.pcap"
            if len(r["pcap"]) <= PCAP_COMMIT_LIMIT:
                pcap.write_bytes(r["pcap"])
            elif pcap.exists():
                pcap.unlink()
            kept[session] = r["manifest"]
        (out / "kernel.txt").write_text(f"{vm.kernel.release}\n")
        readme = [f"# Recorded sessions, Linux {vm.kernel.release}", "",
                  f"Recorded {datetime.date.today().isoformat()} by `tests/vm/record_fixtures.py {suite}` "
                  f"with the daemon built from commit {head_commit()} (Debian {suite} kernel package "
                  f"{vm.kernel.version}), offsets from BTF. See ../README.md.", "",
                  "| session | samples | captured packets | packet-probe misses | ring losses |",
                  "|---|---|---|---|---|"]
        for s, m in kept.items():
            readme.append(f"| {s} | {m['recording']['samples']} | {m['captured_packets']} | "
                          f"{m['packet_probe_misses']} | {m['recording']['lost_samples']} |")
        (out / "README.md").write_text("\n".join(readme) + "\n")
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suites", nargs="*", help=f"kernel suites (default: {' '.join(kernels.SUITES)})")
    ap.add_argument("--attempts", type=int, default=3, help="tries per session while misses are reported")
    a = ap.parse_args(argv)
    unknown = sorted(set(a.suites) - set(kernels.SUITES))
    if unknown:
        ap.error(f"unknown suites {unknown} (known: {' '.join(kernels.SUITES)})")
    for suite in a.suites or kernels.SUITES:
        out = record_suite(suite, a.attempts)
        size = sum(p.stat().st_size for p in out.iterdir())
        print(f"[record] {suite}: {out} ({size} bytes)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
