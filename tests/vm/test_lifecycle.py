"""Daemon lifecycle: probes are removed on every way out, instances coexist.

After SIGTERM, SIGINT and a panic (engine thread and main thread, through
the daemon's fault-injection variable) ``kprobe_events`` holds no sockscope
line; after SIGKILL the probes stay until the next start removes them; two
instances run side by side, both deliver flows, and stopping one leaves the
other's probes intact.
"""

from __future__ import annotations

import json
import re
import time

import grpc

import bed
import grpc_client

HTTP_PORT = 8080
#: Short timeouts so flows become final quickly.
FLOW_ARGS = ["-E", "socket.flow_inactive_timeout=2s", "-E", "socket.flow_termination_timeout=1s"]
#: Second instance: its own TCP port (guest only) and Unix socket.
SECOND_PORT = 50061
SECOND_ARGS = ["-E", f"server.listen=127.0.0.1:{SECOND_PORT}", "-E", "server.unix_socket=/run/s2.sock"]
#: How long to wait for a flow to become final and show up.
FLOW_WAIT_S = 60
#: How long a daemon may take to exit after a signal or an injected panic.
EXIT_WAIT_S = 60
#: Fault injection: panic this long after start (long enough to be serving).
PANIC_AFTER = "4s"
#: Rust's exit status for a panic that unwinds out of main.
RUST_PANIC_STATUS = 101
#: Line of kprobe_events: `p:GROUP/EVENT ...` or `r16:GROUP/EVENT ...`.
KPROBE_LINE = re.compile(r"^[pr]\d*:(sockscope_\d+)/(\S+)")


def sockscope_groups(vm) -> dict[str, set[str]]:
    """Our groups in kprobe_events with their event names."""
    text = vm.run("cat /sys/kernel/tracing/kprobe_events", check=True).out
    groups: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = KPROBE_LINE.match(line)
        if m:
            groups.setdefault(m.group(1), set()).add(m.group(2))
    return groups


def assert_no_probes(vm, when: str) -> None:
    text = vm.run("cat /sys/kernel/tracing/kprobe_events", check=True).out
    left = [line for line in text.splitlines() if "sockscope" in line]
    assert not left, f"{when}: kprobe_events still holds sockscope probes:\n" + "\n".join(left)


def start(vm, args: list[str] | None = None, env: dict[str, str] | None = None) -> bed.Spawned:
    """Start the daemon (optionally with environment variables) and wait until serving."""
    if not env:
        return vm.start_daemon(FLOW_ARGS + list(args or []))
    argv = [bed.GUEST_DAEMON, "serve", "-E", f"server.listen=0.0.0.0:{bed.GUEST_GRPC_PORT}",
            "-E", "server.insecure_listen=true"] + FLOW_ARGS + list(args or [])
    exports = "; ".join(f"export {k}='{v}'" for k, v in env.items())
    cmd = " ".join(f"'{a}'" for a in argv)
    vm.daemon = vm.spawn(f"{exports}; exec {cmd} >{bed.GUEST_DAEMON_LOG} 2>&1")
    vm.wait_grpc_serving()
    return vm.daemon


def group_of(pid: int) -> str:
    return f"sockscope_{pid}"


def http_get(vm) -> int:
    """One wget over loopback; returns the client port seen in the capture."""
    vm.run(f"netstat -ltn | grep -q ':{HTTP_PORT} ' || httpd -p {HTTP_PORT} -h /www", check=True)
    with vm.capture(f"tcp port {HTTP_PORT}") as cap:
        vm.run(f"wget -q -O /dev/null http://127.0.0.1:{HTTP_PORT}/index.html", check=True)
    clients = [k[1][1] for k in cap.totals.sent if k[0] == "tcp" and k[2] == ("127.0.0.1", HTTP_PORT)]
    assert len(clients) == 1, f"expected one wget connection in the capture, got {clients}"
    return clients[0]


def host_has_final_flow(vm, client_port: int) -> bool:
    """Whether the daemon on the forwarded port replays a final flow of the wget."""
    pb, rpc = grpc_client.load_stubs()
    deadline = time.monotonic() + FLOW_WAIT_S
    while time.monotonic() < deadline:
        with grpc.insecure_channel(f"127.0.0.1:{vm.grpc_port}") as ch:
            for resp in rpc.FlowServiceStub(ch).StreamFlows(pb.StreamFlowsRequest(number=1000), timeout=30):
                f = resp.flow
                if (resp.WhichOneof("event") == "flow" and f.final and f.local.port == client_port
                        and f.remote.port == HTTP_PORT):
                    return True
        time.sleep(1)
    return False


def guest_has_final_flow(vm, server: str, client_port: int) -> bool:
    """Same, asked from inside the guest with `sockscope watch` (for a guest-only instance)."""
    deadline = time.monotonic() + FLOW_WAIT_S
    last = ""
    while time.monotonic() < deadline:
        r = vm.run(f"{bed.GUEST_DAEMON} watch --server {server} --number 1000 --format json", timeout=30)
        assert r.rc == 0, f"sockscope watch --server {server} failed ({r.rc}): {r.err}"
        last = r.out
        for line in r.out.splitlines():
            flow = json.loads(line).get("flow")
            if (flow and flow.get("final") and flow.get("local", {}).get("port") == client_port
                    and flow.get("remote", {}).get("port") == HTTP_PORT):
                return True
        time.sleep(1)
    print(f"last watch output from {server}:\n{last}")
    return False


def wait_guest_serving(vm, server: str) -> None:
    deadline = time.monotonic() + bed.DAEMON_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if vm.run(f"{bed.GUEST_DAEMON} status --server {server}", timeout=30).rc == 0:
            return
        time.sleep(1)
    raise AssertionError(f"second daemon at {server} never answered status")


def test_sigterm_and_sigint_remove_probes(vm):
    for sig in ("TERM", "INT"):
        d = start(vm)
        groups = sockscope_groups(vm)
        assert group_of(d.pid) in groups, f"daemon {d.pid} has no probe group: {groups}"
        assert vm.stop_daemon(sig, timeout=EXIT_WAIT_S) == 0, f"exit status after SIG{sig}"
        assert_no_probes(vm, f"after SIG{sig}")


def test_engine_panic_removes_probes_and_exits_nonzero(vm):
    d = start(vm, env={"FAULT_SOCKSCOPE_PANIC_AFTER": PANIC_AFTER})
    assert group_of(d.pid) in sockscope_groups(vm)
    rc = d.wait(EXIT_WAIT_S)
    vm.daemon = None
    log = vm.fetch(bed.GUEST_DAEMON_LOG).decode(errors="replace")
    assert rc != 0, f"daemon exited 0 after an engine panic:\n{log}"
    assert "fault injection: engine thread panic" in log, log
    assert_no_probes(vm, "after an engine panic")


def test_main_thread_panic_removes_probes_and_exits_nonzero(vm):
    d = start(vm, env={"FAULT_SOCKSCOPE_PANIC_AFTER": PANIC_AFTER, "FAULT_SOCKSCOPE_PANIC_THREAD": "main"})
    assert group_of(d.pid) in sockscope_groups(vm)
    rc = d.wait(EXIT_WAIT_S)
    vm.daemon = None
    log = vm.fetch(bed.GUEST_DAEMON_LOG).decode(errors="replace")
    assert rc == RUST_PANIC_STATUS, f"exit status {rc} after a main-thread panic:\n{log}"
    assert "fault injection: main thread panic" in log, log
    assert_no_probes(vm, "after a main-thread panic")


def test_sigkill_leftovers_removed_by_next_start(vm):
    first = start(vm)
    installed = sockscope_groups(vm)[group_of(first.pid)]
    assert vm.stop_daemon("KILL") == 128 + 9
    left = sockscope_groups(vm)
    assert left.get(group_of(first.pid)) == installed, \
        f"SIGKILL cannot clean up, the probes must still be there: {left}"
    second = start(vm)
    groups = sockscope_groups(vm)
    assert set(groups) == {group_of(second.pid)}, f"stale group not removed at start: {groups}"
    assert "removed probes of dead instances" in vm.daemon_log()
    assert vm.stop_daemon("TERM") == 0
    assert_no_probes(vm, "after SIGTERM of the restarted daemon")


def test_two_instances_side_by_side(vm):
    first = start(vm)
    second = vm.spawn(f"exec {bed.GUEST_DAEMON} serve {' '.join(FLOW_ARGS + SECOND_ARGS)} "
                      f">/var/log/sockscope2.log 2>&1")
    try:
        wait_guest_serving(vm, f"127.0.0.1:{SECOND_PORT}")
        groups = sockscope_groups(vm)
        g1, g2 = group_of(first.pid), group_of(second.pid)
        assert set(groups) == {g1, g2}, f"expected both instances' groups: {groups}"
        assert groups[g1] == groups[g2], "both instances install the same probe set"

        port = http_get(vm)
        assert host_has_final_flow(vm, port), "first instance did not report the wget flow"
        assert guest_has_final_flow(vm, f"127.0.0.1:{SECOND_PORT}", port), \
            "second instance did not report the wget flow"
        assert guest_has_final_flow(vm, "/run/s2.sock", port), \
            "second instance's Unix socket did not serve the wget flow"

        # Stopping the first leaves the second's probes alone and it keeps working.
        assert vm.stop_daemon("TERM") == 0
        after = sockscope_groups(vm)
        assert after == {g2: groups[g2]}, f"after stopping {g1}: {after}"
        port = http_get(vm)
        assert guest_has_final_flow(vm, f"127.0.0.1:{SECOND_PORT}", port), \
            "second instance stopped delivering flows after the first stopped"
        assert second.stop("TERM", timeout=EXIT_WAIT_S) == 0
        assert_no_probes(vm, "after stopping both instances")
    finally:
        if second.alive():
            print(vm.fetch("/var/log/sockscope2.log").decode(errors="replace"))
            second.stop("KILL")
