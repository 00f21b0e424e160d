#!/usr/bin/env python3
"""Overhead benchmark: sockscope against no monitor and against softflowd.

    python3 tests/vm/bench_overhead.py [suite ...]     # default: all four kernels

Per kernel, one boot. Every round runs each monitor in turn (the order
rotates from round to round):

    none            no monitor
    sockscope-tcp   ``sockscope serve`` (the test bed's start, default
                    configuration) + one ``sockscope watch --follow
                    --format json`` subscriber over TCP loopback
    sockscope-unix  the same, the subscriber on the Unix socket
    sockscope-counters  ``sockscope serve -E socket.accounting=socket_counters``
                    (TCP counted from the socket's own counters at close)
                    with the subscriber over TCP loopback
    softflowd       ``softflowd -i lo -d`` exporting NetFlow v5 to a
                    loopback port nobody listens on

and, when named in ``--monitors`` (not run by default):

    sockscope-nodns ``sockscope serve -E socket.dns.enabled=false`` with
                    the subscriber over TCP loopback: what the DNS
                    capture's packet socket costs, every packet of the
                    machine passing its filter

and under each monitor the same three workloads of ``benchtool.c``: churn
(N short TCP connections), bulk (one TCP transfer) and UDP (datagrams from
one socket), all on 127.0.0.1. For each run the guest measures, in one
control request, the workload's wall time (CLOCK_MONOTONIC in the guest)
and its own CPU, and utime+stime from ``/proc/PID/stat`` of the daemon, the
subscriber and softflowd before the workload, when it ends and after a
settle time (default 6 s: the daemon finishes TCP flows 5 s after they
close, and their records reach the subscriber in that window; when a
monitor process is still busy then, the window grows a second at a time
until it is not, so a backlog is counted where it arose). Monitor CPU
is the whole window, workload plus settle, minus the monitor's idle rate
(measured for 5 s after its last workload) times the window; the raw
figure and the idle rate are kept too.

Reported per workload: the median over rounds of the wall-time ratio and
of the workload-CPU ratio against no monitor in the same round, and the
median monitor CPU per 1k connections / per 100 MiB / per 10k datagrams.
Per monitor: peak RSS (VmHWM) and, for sockscope, tracked sockets as the
workload ends, ring samples and records delivered, from ``sockscope status
--json``. One table per kernel on stdout; every round in
``target/vm-bed/bench-overhead.json`` (``SOCKSCOPE_VM_LOGS`` moves it,
``--out`` names another file); ``--report [--markdown]`` prints the tables
again from that file without booting anything.

Under TCG both vCPUs share one host thread, so every guest CPU cycle a
monitor spends slows the workload as well: absolute times mean nothing,
ratios within one boot do. This is a benchmark, not a test: it passes or
fails nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bed  # noqa: E402
import kernels  # noqa: E402

HERE = Path(__file__).resolve().parent
#: Guest paths of the tools put into the guest.
GUEST_BENCHTOOL = "/usr/bin/benchtool"
HOST_SOFTFLOWD = Path("/usr/sbin/softflowd")
HOST_SOFTFLOWCTL = Path("/usr/sbin/softflowctl")
#: softflowd's control socket and pid file in the guest (/var/run does not exist there).
SOFTFLOWD_CTL = "/tmp/softflowd.ctl"
SOFTFLOWD_PID = "/tmp/softflowd.pid"
#: NetFlow collector address: a loopback port nothing listens on.
SOFTFLOWD_COLLECTOR = "127.0.0.1:9995"
#: The daemon's Unix socket (default ``server.unix_socket``).
UNIX_SOCKET = "/run/sockscope/sockscope.sock"
MONITORS = ("none", "sockscope-tcp", "sockscope-unix", "sockscope-counters", "softflowd")
#: Monitors run only when named in ``--monitors``.
EXTRA_MONITORS = ("sockscope-nodns",)
#: With ``--baseline BINARY``: the same sockscope monitors run from that other build
#: (the subscriber stays the measured build's), to compare two builds in one boot.
BASELINE_MONITORS = ("baseline-tcp", "baseline-unix", "baseline-counters")
#: Guest path of the baseline build.
GUEST_BASELINE = "/usr/bin/sockscope-baseline"
#: Daemon options per sockscope monitor (beyond the test bed's defaults).
DAEMON_OPTIONS = {"sockscope-counters": ["-E", "socket.accounting=socket_counters"],
                  "sockscope-nodns": ["-E", "socket.dns.enabled=false"]}
WORKLOADS = ("churn", "bulk", "udp")
#: USER_HZ of the Debian x86_64 kernels (/proc/PID/stat ticks).
CLK_TCK = 100
#: Quiet time after a monitor starts, before its first workload.
STARTUP_QUIET_S = 5
#: How long the monitor's idle CPU is measured after its last workload.
IDLE_WINDOW_S = 5
#: After the settle time, the window is extended a second at a time while a
#: monitor process still used more than this many ticks in the last second
#: (a backlog being worked off), at most SETTLE_EXTEND_MAX_S seconds.
BUSY_TICKS_PER_S = 10
SETTLE_EXTEND_MAX_S = 60
#: Guest-side limit of one workload run (benchtool itself gives up at 300 s).
RUN_LIMIT_S = 420


@dataclasses.dataclass
class Params:
    rounds: int
    churn: int
    bulk_mib: int
    udp: int
    udp_size: int
    settle: float
    workloads: tuple[str, ...] = WORKLOADS
    monitors: tuple[str, ...] = MONITORS

    def argv(self, workload: str) -> str:
        return {"churn": f"churn {self.churn}", "bulk": f"bulk {self.bulk_mib}",
                "udp": f"udp {self.udp} {self.udp_size}"}[workload]

    def per_unit(self, workload: str) -> tuple[float, str]:
        """Factor from one run to the reporting unit, and the unit's name."""
        return {"churn": (1000 / self.churn, "1k conn"), "bulk": (100 / self.bulk_mib, "100 MiB"),
                "udp": (10000 / self.udp, "10k dgram")}[workload]

    def expected_units(self, workload: str) -> int:
        return {"churn": self.churn, "bulk": self.bulk_mib << 20, "udp": self.udp}[workload]


def build_benchtool() -> Path:
    """Compile ``benchtool.c`` statically (cached by source mtime)."""
    return bed.build_static(HERE / "benchtool.c")


def guest_files() -> dict[str, Path]:
    """benchtool, and softflowd/softflowctl with the shared libraries they need."""
    for tool in (HOST_SOFTFLOWD, HOST_SOFTFLOWCTL):
        if not tool.exists():
            raise bed.BedError(f"{tool} is missing on the host (apt-get install softflowd; see tests/setup)")
    files: dict[str, Path] = {GUEST_BENCHTOOL: build_benchtool()}
    for tool in (HOST_SOFTFLOWD, HOST_SOFTFLOWCTL):
        files[str(tool)] = tool
        for lib in bed._ldd(tool):
            files.setdefault(str(lib), lib.resolve())
    return files


def is_sockscope(monitor: str) -> bool:
    return monitor.startswith(("sockscope-", "baseline-"))


def sockscope_kind(monitor: str) -> str:
    """The sockscope monitor a baseline monitor mirrors (``baseline-tcp`` -> ``sockscope-tcp``)."""
    return "sockscope-" + monitor.removeprefix("baseline-") if monitor.startswith("baseline-") else monitor


def field(msg: dict, name: str, default=None):
    """A field of proto3 JSON by its proto name or its lowerCamelCase JSON name."""
    camel = name.split("_")[0] + "".join(x.title() for x in name.split("_")[1:])
    return msg.get(name, msg.get(camel, default))


def cpu_ticks(stat_line: str) -> int | None:
    """utime+stime of a /proc/PID/stat line (None when the process is gone)."""
    if ")" not in stat_line:
        return None
    fields = stat_line.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def guest_busy_ticks(cpu_line: str) -> int:
    """Busy ticks (everything but idle and iowait) of /proc/stat's "cpu" line."""
    v = [int(x) for x in cpu_line.split()[1:]]
    return sum(v[:8]) - v[3] - v[4]


class Bench:
    """Monitors and measurements in one booted guest."""

    def __init__(self, vm: bed.VM, p: Params):
        self.vm = vm
        self.p = p

    # ---- monitors
    def start(self, monitor: str) -> dict[str, int]:
        """Start a monitor; returns role -> guest pid of its processes."""
        vm = self.vm
        if monitor == "none":
            return {}
        if monitor == "softflowd":
            sf = vm.spawn(f"exec {HOST_SOFTFLOWD} -i lo -d -n {SOFTFLOWD_COLLECTOR} "
                          f"-p {SOFTFLOWD_PID} -c {SOFTFLOWD_CTL}")
            self.wait(lambda: vm.run(f"test -S {SOFTFLOWD_CTL}").rc == 0 or not sf.alive(), 30,
                      "softflowd's control socket")
            if not sf.alive():
                raise bed.BedError(f"softflowd exited: {sf.log()}")
            self.spawned = {"softflowd": sf}
            return {"softflowd": sf.pid}
        kind = sockscope_kind(monitor)
        binary = GUEST_BASELINE if monitor.startswith("baseline-") else bed.GUEST_DAEMON
        daemon = vm.start_daemon(DAEMON_OPTIONS.get(kind, []), binary=binary)
        self.wait(lambda: vm.run(f"test -S {UNIX_SOCKET}").rc == 0, 30, "the daemon's Unix socket")
        server = UNIX_SOCKET if kind == "sockscope-unix" else f"127.0.0.1:{bed.GUEST_GRPC_PORT}"
        watch = vm.spawn(f"exec {bed.GUEST_DAEMON} watch --server {server} --follow --format json >/dev/null")
        self.wait(lambda: len(self.status().get("subscribers", [])) >= 1 or not watch.alive(), 30,
                  "the subscriber to register")
        if not watch.alive():
            raise bed.BedError(f"sockscope watch exited: {watch.log()}")
        self.spawned = {"subscriber": watch}
        return {"daemon": daemon.pid, "subscriber": watch.pid}

    def stop(self, monitor: str) -> None:
        if monitor == "none":
            return
        for role, proc in self.spawned.items():
            proc.stop("TERM")
        if is_sockscope(monitor):
            self.vm.stop_daemon("TERM")

    def status(self) -> dict:
        r = self.vm.run(f"{bed.GUEST_DAEMON} status --json --server {UNIX_SOCKET}", timeout=30)
        if r.rc != 0:
            return {}
        try:
            return json.loads(r.out)
        except ValueError:
            return {}

    def softflowd_stats(self) -> str:
        return self.vm.run(f"{HOST_SOFTFLOWCTL} -c {SOFTFLOWD_CTL} statistics", timeout=30).out

    @staticmethod
    def wait(cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise bed.BedError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(0.5)

    # ---- measurements
    def snapshot_script(self, tag: str, pids: dict[str, int]) -> str:
        lines = [f"echo \"{tag} clock $(cut -d' ' -f1 /proc/uptime)\"",
                 f"echo \"{tag} cpu $(head -n1 /proc/stat)\""]
        lines += [f"echo \"{tag} pid {role} $(cat /proc/{pid}/stat 2>/dev/null)\"" for role, pid in pids.items()]
        if "daemon" in pids:
            # Per thread of the daemon (ring reader, engine, gRPC workers...): where its CPU goes.
            # Per thread also its voluntary context switches: how often it slept and woke.
            lines.append(f"for t in /proc/{pids['daemon']}/task/*; do n=$(tr ' ' _ <$t/comm); "
                         f"echo \"{tag} thread $n $(cat $t/stat 2>/dev/null)\"; "
                         f"echo \"{tag} wakes $n $(awk '/^voluntary_ctxt_switches/{{print $2}}' $t/status)\"; done")
        return "\n".join(lines)

    @staticmethod
    def extend_script(pids: dict[str, int]) -> str:
        """Shell loop that waits while a monitor process is still busy."""
        if not pids:
            return ":"
        ticks = " + ".join(f"$(sed 's/.*) //' /proc/{pid}/stat | awk '{{print $12 + $13}}')" for pid in pids.values())
        return (f"n=0; a=$(({ticks})); while [ $n -lt {SETTLE_EXTEND_MAX_S} ]; do sleep 1; b=$(({ticks})); "
                f"[ $((b - a)) -le {BUSY_TICKS_PER_S} ] && break; a=$b; n=$((n + 1)); done; echo \"extended $n\"")

    @staticmethod
    def parse_snapshots(out: str) -> dict[str, dict]:
        snaps: dict[str, dict] = {}
        for line in out.splitlines():
            parts = line.split(" ", 2)
            if len(parts) < 3 or parts[1] not in ("clock", "cpu", "pid", "thread", "wakes"):
                continue
            s = snaps.setdefault(parts[0], {"pids": {}, "threads": {}, "wakes": {}})
            if parts[1] == "clock":
                s["clock"] = float(parts[2])
            elif parts[1] == "cpu":
                s["busy"] = guest_busy_ticks(parts[2])
            elif parts[1] == "wakes":
                name, _, n = parts[2].partition(" ")
                if n.strip().isdigit():
                    s["wakes"][name] = s["wakes"].get(name, 0) + int(n)
            elif parts[1] == "thread":
                name, _, rest = parts[2].partition(" ")
                ticks = cpu_ticks(rest)
                if ticks is not None:  # threads of one name (the gRPC workers) are summed
                    s["threads"][name] = s["threads"].get(name, 0) + ticks
            else:
                role, _, rest = parts[2].partition(" ")
                s["pids"][role] = cpu_ticks(rest)
        return snaps

    def idle(self, pids: dict[str, int]) -> dict[str, float]:
        """CPU ms per second of each monitor process with no workload running."""
        script = "\n".join([self.snapshot_script("I0", pids), f"sleep {IDLE_WINDOW_S}",
                            self.snapshot_script("I1", pids)])
        s = self.parse_snapshots(self.vm.run(script, timeout=60, check=True).out)
        span = s["I1"]["clock"] - s["I0"]["clock"]
        return {role: (s["I1"]["pids"][role] - s["I0"]["pids"][role]) * 1000 / CLK_TCK / span for role in pids}

    def run_workload(self, workload: str, pids: dict[str, int]) -> dict:
        script = "\n".join([
            self.snapshot_script("S0", pids),
            f"{GUEST_BENCHTOOL} {self.p.argv(workload)} >/tmp/bench.out 2>/tmp/bench.err; echo \"rc $?\"",
            self.snapshot_script("S1", pids),
            # Sockets the daemon tracks as the workload ends (one status request inside the window).
            f"echo \"status $({bed.GUEST_DAEMON} status --json --server {UNIX_SOCKET} | tr -d '\\n')\""
            if "daemon" in pids else ":",
            f"sleep {self.p.settle}",
            self.extend_script(pids),
            self.snapshot_script("S2", pids),
            "echo \"out $(cat /tmp/bench.out)\"", "echo \"err $(cat /tmp/bench.err)\"",
        ])
        r = self.vm.run(script, timeout=RUN_LIMIT_S, check=True)
        fields = dict(line.split(" ", 1) for line in r.out.splitlines()
                      if line.startswith(("rc ", "out ", "err ", "status ", "extended ")))
        if fields.get("rc") != "0":
            raise bed.BedError(f"benchtool {self.p.argv(workload)} failed: rc {fields.get('rc')} {fields.get('err')}")
        out = fields["out"].split()
        res = dict(zip(out[0::2], (int(x) for x in out[1::2])))
        s = self.parse_snapshots(r.out)
        res["settle_s"] = s["S2"]["clock"] - s["S1"]["clock"]
        res["settle_extended_s"] = int(fields.get("extended", "0"))
        res["window_s"] = s["S2"]["clock"] - s["S0"]["clock"]
        res["guest_busy_ms"] = (s["S2"]["busy"] - s["S0"]["busy"]) * 1000 / CLK_TCK
        if "status" in fields:
            try:
                st = json.loads(fields["status"])
                res["tracked_sockets_at_end"] = int(field(st, "tracked_sockets", 0))
                res["tracked_flows_at_end"] = int(field(st, "tracked_flows", 0))
            except ValueError:
                pass
        res["cpu_ms"] = {}
        res["cpu_ms_during"] = {}
        for role in pids:
            a, b, c = (s[t]["pids"].get(role) for t in ("S0", "S1", "S2"))
            if a is None or c is None:
                raise bed.BedError(f"the monitor's {role} (pid {pids[role]}) exited during {workload}")
            res["cpu_ms"][role] = (c - a) * 1000 / CLK_TCK
            res["cpu_ms_during"][role] = (b - a) * 1000 / CLK_TCK
        # The daemon's CPU over the whole window per thread name (raw, idle not subtracted).
        res["daemon_threads_ms"] = {n: (t - s["S0"]["threads"].get(n, 0)) * 1000 / CLK_TCK
                                    for n, t in s["S2"]["threads"].items()}
        res["daemon_thread_wakes"] = {n: t - s["S0"]["wakes"].get(n, 0) for n, t in s["S2"]["wakes"].items()}
        if res["units"] != self.p.expected_units(workload):
            raise bed.BedError(f"benchtool {workload}: {res['units']} of {self.p.expected_units(workload)} units "
                               "got through")
        return res

    def peak_rss_kib(self, pids: dict[str, int]) -> dict[str, int]:
        out = {}
        for role, pid in pids.items():
            r = self.vm.run(f"grep VmHWM /proc/{pid}/status")
            if r.rc == 0 and r.out.split()[1:2]:
                out[role] = int(r.out.split()[1])
        return out

    def slot(self, monitor: str) -> dict:
        """One monitor's turn in a round: start, idle, the workloads, stop."""
        t0 = time.monotonic()
        pids = self.start(monitor)
        rec: dict = {"monitor": monitor, "pids": pids, "workloads": {}, "start_s": time.monotonic() - t0}
        time.sleep(STARTUP_QUIET_S)
        for w in self.p.workloads:
            before = self.status() if is_sockscope(monitor) else {}
            res = self.run_workload(w, pids)
            if is_sockscope(monitor):
                after = self.status()
                res["tracked_sockets"] = int(field(after, "tracked_sockets", 0))
                res["tracked_flows"] = int(field(after, "tracked_flows", 0))
                res["delivered"] = (sum(int(x.get("delivered", 0)) for x in after.get("subscribers", []))
                                    - sum(int(x.get("delivered", 0)) for x in before.get("subscribers", [])))
                # StreamFlows responses that carried them (several flows each when packed).
                res["responses"] = (sum(int(x.get("responses", 0)) for x in after.get("subscribers", []))
                                    - sum(int(x.get("responses", 0)) for x in before.get("subscribers", [])))
                res["subscriber_drops"] = sum(int(x.get("drops", 0)) for x in after.get("subscribers", []))
                res["ring_samples"] = (sum(int(x.get("samples", 0)) for x in after.get("cpus", []))
                                       - sum(int(x.get("samples", 0)) for x in before.get("cpus", [])))
            rec["workloads"][w] = res
        rec["idle_ms_per_s"] = self.idle(pids) if pids else {}
        rec["peak_rss_kib"] = self.peak_rss_kib(pids)
        if monitor == "softflowd":
            rec["softflowd_statistics"] = self.softflowd_stats()
        if is_sockscope(monitor):
            st = self.status()
            rec["status"] = {k: field(st, k) for k in ("tracked_sockets", "tracked_flows", "tracked_processes",
                                                        "kretprobe_misses", "decode_errors", "cpus")}
        t1 = time.monotonic()
        self.stop(monitor)
        rec["stop_s"] = time.monotonic() - t1
        rec["host_loadavg"] = os.getloadavg()  # the host is often shared: context for the spread
        rec["slot_s"] = time.monotonic() - t0
        return rec


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def params_of(res: dict) -> Params:
    """The parameters of one kernel's results."""
    kw = dict(res["params"])
    kw["workloads"] = tuple(kw.get("workloads", WORKLOADS))
    # Results of runs before the counters monitor existed measured these.
    kw["monitors"] = tuple(kw.get("monitors", ("none", "sockscope-tcp", "sockscope-unix", "softflowd")))
    return Params(**kw)


def per_thread(rounds: list[dict], m: str, w: str, key: str, factor: float) -> dict[str, float]:
    """Median over rounds of a per-thread figure of the daemon, per reporting unit."""
    runs = [rnd["slots"][m]["workloads"][w].get(key, {}) for rnd in rounds]
    return {n: median([r.get(n, 0) * factor for r in runs]) for n in sorted({n for r in runs for n in r})}


def summarize(rounds: list[dict], p: Params) -> dict:
    """Medians per workload and monitor over the rounds.

    Monitor CPU of a run is its window's CPU (workload + settle) minus the
    monitor's idle rate of that slot times the window: what the workload
    cost it. The raw figure is kept beside it.
    """
    out: dict = {}
    for w in p.workloads:
        factor, unit = p.per_unit(w)
        out[w] = {"unit": unit}
        for m in p.monitors:
            ratios, net, raw, walls, work_cpu = [], [], [], [], []
            roles: dict[str, list[float]] = {}
            rss: dict[str, list[int]] = {}
            for rnd in rounds:
                slot = rnd["slots"][m]
                base = rnd["slots"]["none"]["workloads"][w]
                res = slot["workloads"][w]
                walls.append(res["wall_ns"] / 1e6)
                ratios.append(res["wall_ns"] / base["wall_ns"])
                work_cpu.append(res["cpu_ns"] / base["cpu_ns"])
                total = 0.0
                for role, v in res["cpu_ms"].items():
                    n = v - slot["idle_ms_per_s"][role] * res["window_s"]
                    roles.setdefault(role, []).append(n * factor)
                    total += n
                net.append(total * factor)
                raw.append(sum(res["cpu_ms"].values()) * factor)
                for role, v in slot.get("peak_rss_kib", {}).items():
                    rss.setdefault(role, []).append(v)
            sock = is_sockscope(m)
            out[w][m] = {
                "wall_ratio": median(ratios), "wall_ratio_range": [min(ratios), max(ratios)], "wall_ms": median(walls), "workload_cpu_ratio": median(work_cpu),
                "monitor_cpu_ms_per_unit": median(net) if roles else None,
                "monitor_cpu_ms_per_unit_raw": median(raw) if roles else None,
                "per_role_ms_per_unit": {r: median(v) for r, v in roles.items()},
                "daemon_threads_ms_per_unit": per_thread(rounds, m, w, "daemon_threads_ms", factor),
                "daemon_thread_wakes_per_unit": per_thread(rounds, m, w, "daemon_thread_wakes", factor),
                "idle_ms_per_s": {r: median([rnd["slots"][m]["idle_ms_per_s"][r] for rnd in rounds]) for r in roles},
                "peak_rss_kib": {r: max(v) for r, v in rss.items()},
                "tracked_sockets_at_end": median([rnd["slots"][m]["workloads"][w].get("tracked_sockets_at_end", 0)
                                                  for rnd in rounds]) if sock else None,
                "delivered": median([rnd["slots"][m]["workloads"][w].get("delivered", 0)
                                     for rnd in rounds]) if sock else None,
                "responses": median([rnd["slots"][m]["workloads"][w].get("responses", 0)
                                     for rnd in rounds]) if sock else None,
            }
    return out


def _fmt(v, spec: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, spec) + suffix


def table(suite: str, release: str, summary: dict, p: Params) -> str:
    """The summary of one kernel as a text table."""
    rows = [f"{suite} ({release}): medians of {p.rounds} rounds; monitor CPU = daemon + subscriber "
            f"(or softflowd) over the workload and {p.settle:g} s after it, minus the idle rate",
            f"{'workload':<20} {'monitor':<15} {'wall':>6} {'monitor CPU':>19} {'daemon':>7} {'subscr.':>7} "
            f"{'idle ms/s':>9} {'peak RSS':>9} {'sockets':>7} {'records':>7}"]
    labels = {"churn": f"churn {p.churn} conn", "bulk": f"bulk {p.bulk_mib} MiB",
              "udp": f"udp {p.udp} x {p.udp_size} B"}
    for w in p.workloads:
        s = summary[w]
        for i, m in enumerate(p.monitors):
            e = s[m]
            roles = e["per_role_ms_per_unit"]
            rss = e["peak_rss_kib"].get("daemon", e["peak_rss_kib"].get("softflowd"))
            idle = sum(e["idle_ms_per_s"].values()) if e["idle_ms_per_s"] else None
            cpu = e["monitor_cpu_ms_per_unit"]
            rows.append(" ".join([
                f"{labels[w] if i == 0 else '':<20}", f"{m:<15}", f"{e['wall_ratio']:>5.2f}x",
                f"{_fmt(cpu, '.0f', ' ms/' + s['unit']):>19}",
                f"{_fmt(roles.get('daemon', roles.get('softflowd')), '.0f'):>7}",
                f"{_fmt(roles.get('subscriber'), '.0f'):>7}", f"{_fmt(idle, '.1f'):>9}",
                f"{_fmt(rss and rss / 1024, '.1f', ' MiB'):>9}",
                f"{_fmt(e['tracked_sockets_at_end'], '.0f'):>7}", f"{_fmt(e['delivered'], '.0f'):>7}"]))
            threads = e.get("daemon_threads_ms_per_unit") or {}
            wakes = e.get("daemon_thread_wakes_per_unit") or {}
            if threads:
                rows.append(f"{'':<20} {'':<15} daemon threads, raw ms (wakes) per {s['unit']}: "
                            + ", ".join(f"{n} {v:.0f} ({wakes.get(n, 0):.0f})"
                                        for n, v in sorted(threads.items(), key=lambda x: -x[1]))
                            + f"; records in {_fmt(e.get('responses'), '.0f')} responses")
    return "\n".join(rows)


def _ms(v: float | None) -> str:
    """Milliseconds; a net figure below zero (idle subtraction within noise) shows as ≈0."""
    return "-" if v is None else "≈0" if v < 0.5 else f"{v:.0f}"


def markdown(results: dict, p: Params) -> str:
    """All kernels of a results file as one Markdown table (for README.md)."""
    rows = ["| kernel | workload | monitor | wall time (min–max) | workload CPU | monitor CPU | daemon | "
            "subscriber | peak RSS |", "|---|---|---|---|---|---|---|---|---|"]
    labels = {"churn": f"{p.churn} TCP connections", "bulk": f"{p.bulk_mib} MiB over TCP",
              "udp": f"{p.udp} UDP datagrams"}
    for suite in kernels.SUITES:
        res = results.get(suite)
        if not res or "summary" not in res:
            continue
        release = res["uname"].replace("-cloud-amd64", "")
        for w in p.workloads:
            s = res["summary"][w]
            for m in p.monitors[1:]:
                e = s[m]
                roles = e["per_role_ms_per_unit"]
                lo, hi = e["wall_ratio_range"]
                rss = e["peak_rss_kib"].get("daemon", e["peak_rss_kib"].get("softflowd"))
                rows.append(" | ".join([
                    f"| {suite} {release}", labels[w], m, f"×{e['wall_ratio']:.2f} ({lo:.2f}–{hi:.2f})",
                    f"×{e['workload_cpu_ratio']:.2f}", _ms(e["monitor_cpu_ms_per_unit"]) + f" ms/{s['unit']}",
                    _ms(roles.get("daemon", roles.get("softflowd"))), _ms(roles.get("subscriber")),
                    _fmt(rss and rss / 1024, ".1f", " MiB")]) + " |")
    return "\n".join(rows)


def run_suite(suite: str, p: Params, files: dict[str, Path], save) -> dict:
    t0 = time.monotonic()
    vm = bed.VM(suite, extra_files=files, with_daemon=True, logdir=bed.logs_root() / f"bench-{suite}")
    result: dict = {"suite": suite, "release": vm.kernel.release, "params": dataclasses.asdict(p),
                    "binary": str(bed.daemon_binary()), "rounds": []}
    rounds = result["rounds"]
    with vm:
        result["boot_s"] = vm.boot_seconds
        result["uname"] = vm.run("uname -r", check=True).out.strip()
        b = Bench(vm, p)
        # Warm-up (not measured): page cache, first-touch costs of the tools.
        for w in p.workloads:
            b.run_workload(w, {})
        for r in range(p.rounds):
            ms = p.monitors
            order = [ms[(i + r) % len(ms)] for i in range(len(ms))]
            rnd = {"order": order, "slots": {}}
            rounds.append(rnd)
            for m in order:
                rnd["slots"][m] = b.slot(m)
                save(result)  # partial results survive an interrupted run
                sl = rnd["slots"][m]
                print(f"[bench] {suite} round {r + 1}/{p.rounds} {m:<15} {sl['slot_s']:4.0f} s: "
                      + "  ".join(f"{w} {x['wall_ns'] / 1e6:.0f} ms cpu "
                                  + "/".join(f"{v:.0f}" for v in x["cpu_ms"].values())
                                  + f" +{x['settle_extended_s']}s" for w, x in sl["workloads"].items()),
                      file=sys.stderr, flush=True)
        (vm.logdir / "sockscope.log").write_text(vm.daemon_log())
    result["summary"] = summarize(rounds, p)
    result["total_s"] = time.monotonic() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("suites", nargs="*", metavar="suite",
                    help=f"kernels: {', '.join(kernels.SUITES)} (default: all four)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of all monitors (at least 3)")
    ap.add_argument("--churn", type=int, default=500, help="TCP connections of the churn workload")
    ap.add_argument("--bulk-mib", type=int, default=40, help="MiB of the bulk transfer (at least 20)")
    ap.add_argument("--udp", type=int, default=20000, help="UDP datagrams (at least 10000)")
    ap.add_argument("--udp-size", type=int, default=64, help="UDP payload bytes")
    ap.add_argument("--settle", type=float, default=6, help="seconds measured after each workload ends")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated subset of {','.join(WORKLOADS)}")
    ap.add_argument("--monitors", default=",".join(MONITORS),
                    help=f"comma-separated subset of {','.join(MONITORS + EXTRA_MONITORS)} (none is always measured), "
                    f"and with --baseline of {','.join(BASELINE_MONITORS)}")
    ap.add_argument("--baseline", type=Path, default=None, metavar="BINARY",
                    help="another sockscope build, measured as the baseline-* monitors in the same boot")
    ap.add_argument("--out", type=Path, default=None, help="JSON output (default target/vm-bed/bench-overhead.json)")
    ap.add_argument("--report", action="store_true",
                    help="boot nothing: print the tables of the JSON output again (with --markdown: one Markdown table)")
    ap.add_argument("--markdown", action="store_true", help="with --report: Markdown for README.md")
    a = ap.parse_args(argv)
    out = a.out or bed.logs_root() / "bench-overhead.json"
    if a.report:
        results = json.loads(out.read_text())
        done = []
        for x in a.suites or kernels.SUITES:
            res = results.get(x, {})
            rp = params_of(res)
            complete = [r for r in res.get("rounds", []) if len(r["slots"]) == len(rp.monitors)]
            if not complete:
                continue
            res["summary"] = summarize(complete, rp)
            done.append(res)
        for res in done:
            rp = params_of(res)
            if not a.markdown:
                print(table(res["suite"], res["uname"], res["summary"], rp) + "\n")
        if a.markdown and done:
            print(markdown({r["suite"]: r for r in done}, params_of(done[0])))
        return 0
    if a.rounds < 3 or a.bulk_mib < 20 or a.udp < 10000 or a.churn < 1:
        ap.error("at least 3 rounds, 20 MiB bulk, 10000 datagrams")
    suites = a.suites or list(kernels.SUITES)
    unknown = [x for x in suites if x not in kernels.SUITES]
    if unknown:
        ap.error(f"unknown suite {', '.join(unknown)}; choose from {', '.join(kernels.SUITES)}")
    workloads = tuple(w for w in WORKLOADS if w in a.workloads.split(","))
    if not workloads or set(a.workloads.split(",")) - set(WORKLOADS):
        ap.error(f"--workloads: a comma-separated subset of {','.join(WORKLOADS)}")
    known = MONITORS + EXTRA_MONITORS + (BASELINE_MONITORS if a.baseline else ())
    monitors = tuple(m for m in known if m == "none" or m in a.monitors.split(","))
    if set(a.monitors.split(",")) - set(known):
        ap.error(f"--monitors: a comma-separated subset of {','.join(known)}")
    if a.baseline and not a.baseline.is_file():
        ap.error(f"--baseline {a.baseline}: no such file")
    p = Params(a.rounds, a.churn, a.bulk_mib, a.udp, a.udp_size, a.settle, workloads, monitors)
    if bed.daemon_binary() is None:
        print("no daemon binary: cargo build --release (or set SOCKSCOPE_BIN)", file=sys.stderr)
        return 2
    files = guest_files()
    if a.baseline:
        files[GUEST_BASELINE] = a.baseline.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {}
    failed = 0

    def save(res: dict) -> None:
        results[res["suite"]] = res
        out.write_text(json.dumps(results, indent=1))

    for suite in suites:
        try:
            res = run_suite(suite, p, files, save)
        except (bed.BedError, OSError) as e:
            print(f"[bench] {suite} failed: {e}", file=sys.stderr, flush=True)
            results.setdefault(suite, {"suite": suite})["error"] = str(e)[:2000]
            failed += 1
        else:
            print(table(suite, res["uname"], res["summary"], p), flush=True)
        out.write_text(json.dumps(results, indent=1))
    print(f"results in {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
