"""What existed before the daemon started.

A server already blocked in ``accept()`` when the daemon starts:
The return probe on ``inet_csk_accept`` is installed while the server
sleeps inside that call, so its return is never reported: the accepted
socket's flow gets its direction and ``complete`` from the handshake the
packet probes counted (an inbound SYN to the listener), not from the
accept event. Judged like every flow scenario: against the capture, within
the kernel-measured packet-probe misses (:class:`flowlib.Scenario`), with
the right process and user.

A forking server blocked in ``accept()`` when the daemon starts: each
connection is served by a child forked for it; its flow is the child's,
whether the parent's accept began before the probes (the first
connection) or after (the second).
"""

from __future__ import annotations


import flowlib
from flowlib import CLIENT_USER, SERVER_USER, FlowStream

#: Guest port of the scenario.
TCP_PORT = 9110
#: Guest port of the established-connection scenario.
ESTABLISHED_PORT = 9111
#: Guest port of the forking-server scenario.
FORK_PORT = 9112
#: Connections to the forking server: the first accepted by the accept
#: that began before the daemon, the second by one that began after.
FORK_CONNECTIONS = 2
#: Bytes the client sends.
CLIENT_BYTES = 3000

#: x86_64 system calls a server blocked in accept sleeps in (accept, accept4).
SYS_ACCEPTS = (43, 288)


def test_server_blocked_in_accept_before_the_daemon_started(vm):
    flowlib.install_guest_tools(vm)
    server = flowlib.spawn_server(vm, SERVER_USER, f"tcp-serve 127.0.0.1 {TCP_PORT} 1")
    flowlib.wait_until(lambda: flowlib.syscall_of(vm, server) in SYS_ACCEPTS, flowlib.READY_WAIT_S,
                       f"server {server.pid} to block in accept")
    flowlib.start_daemon(vm, "btf")
    # Still inside the same accept call: the daemon never sees it begin.
    assert flowlib.syscall_of(vm, server) in SYS_ACCEPTS, "the server left accept before the probes"
    stream = FlowStream(vm)
    pb = stream.pb
    try:
        with flowlib.scenario(vm, f"tcp port {TCP_PORT}") as sc:
            client, locals_ = flowlib.run_client(vm, CLIENT_USER,
                                                 f"tcp-client 127.0.0.1 {TCP_PORT} 1 {CLIENT_BYTES}")
            assert server.wait(flowlib.WORKLOAD_WAIT_S) == 0, server.log()
            assert len(locals_) == 1, client.log()
        local = locals_[0]
        srv = ("127.0.0.1", TCP_PORT)
        got = stream.wait_finals(pb.TRANSPORT_TCP, [(local, srv), (srv, local)])
        sc.expect(got[(srv, local)], "tcp", direction=pb.DIRECTION_INGRESS, pid=server.pid, user=SERVER_USER)
        sc.expect(got[(local, srv)], "tcp", direction=pb.DIRECTION_EGRESS, pid=client.pid, user=CLIENT_USER)
        sc.verdict(stream)
    finally:
        stream.close()
    assert vm.stop_daemon("TERM") == 0


def test_forking_server_started_before_the_daemon(vm):
    """Each connection is served by a child forked for it (it reads the request, answers, exits):
    the server flow is the child's (its pid, the server as parent, the name it inherited), inbound
    and complete, equal to the capture; the client flows are the client's."""
    flowlib.install_guest_tools(vm)
    server = flowlib.spawn_server(vm, SERVER_USER, f"tcp-fork-serve 127.0.0.1 {FORK_PORT} {FORK_CONNECTIONS}")
    flowlib.wait_until(lambda: flowlib.syscall_of(vm, server) in SYS_ACCEPTS, flowlib.READY_WAIT_S,
                       f"server {server.pid} to block in accept")
    flowlib.start_daemon(vm, "btf")
    assert flowlib.syscall_of(vm, server) in SYS_ACCEPTS, "the server left accept before the probes"
    stream = FlowStream(vm)
    pb = stream.pb
    try:
        with flowlib.scenario(vm, f"tcp port {FORK_PORT}") as sc:
            client, locals_ = flowlib.run_client(
                vm, CLIENT_USER, f"tcp-client 127.0.0.1 {FORK_PORT} {FORK_CONNECTIONS} {CLIENT_BYTES}")
            assert server.wait(flowlib.WORKLOAD_WAIT_S) == 0, server.log()
        children = [int(line.split()[1]) for line in server.log().splitlines() if line.startswith("child ")]
        assert len(locals_) == FORK_CONNECTIONS, client.log()
        assert len(children) == FORK_CONNECTIONS and server.pid not in children, server.log()
        srv = ("127.0.0.1", FORK_PORT)
        pairs = [p for local in locals_ for p in ((local, srv), (srv, local))]
        got = stream.wait_finals(pb.TRANSPORT_TCP, pairs)
        problems = []
        for local, child in zip(locals_, children):
            sc.expect(got[(srv, local)], "tcp", direction=pb.DIRECTION_INGRESS, pid=child, user=SERVER_USER)
            sc.expect(got[(local, srv)], "tcp", direction=pb.DIRECTION_EGRESS, pid=client.pid, user=CLIENT_USER)
            for f in got[(srv, local)]:
                if f.process.ppid != server.pid:
                    problems.append(f"server flow of {local}: parent pid {f.process.ppid}, want {server.pid}")
        sc.verdict(stream)
        assert not problems, "\n".join(problems)
    finally:
        stream.close()
    assert vm.stop_daemon("TERM") == 0


def test_connection_established_before_the_daemon_started(vm):
    flowlib.install_guest_tools(vm)
    server = flowlib.spawn_server(vm, SERVER_USER, f"tcp-serve 127.0.0.1 {ESTABLISHED_PORT} 1")
    client = vm.spawn(f"exec {flowlib.FLOWTOOL} -u {CLIENT_USER[1]}:{CLIENT_USER[2]} "
                      f"tcp-client-wait 127.0.0.1 {ESTABLISHED_PORT} 1 {CLIENT_BYTES}")
    flowlib.wait_until(lambda: "local " in client.log(), flowlib.READY_WAIT_S, "the client to connect")
    parts = next(line.split() for line in client.log().splitlines() if line.startswith("local "))
    local = (parts[1], int(parts[2]))
    flowlib.start_daemon(vm, "btf")
    stream = FlowStream(vm)
    pb = stream.pb
    try:
        with flowlib.scenario(vm, f"tcp port {ESTABLISHED_PORT}") as sc:
            vm.run(f"kill -USR1 {client.pid}", check=True)
            assert client.wait(flowlib.WORKLOAD_WAIT_S) == 0, client.log()
            assert server.wait(flowlib.WORKLOAD_WAIT_S) == 0, server.log()
        srv = ("127.0.0.1", ESTABLISHED_PORT)
        got = stream.wait_finals(pb.TRANSPORT_TCP, [(local, srv), (srv, local)])
        sc.expect(got[(srv, local)], "tcp", direction=pb.DIRECTION_INGRESS, pid=server.pid, user=SERVER_USER,
                  complete=False)
        sc.expect(got[(local, srv)], "tcp", direction=pb.DIRECTION_EGRESS, pid=client.pid, user=CLIENT_USER,
                  complete=False)
        sc.verdict(stream)
    finally:
        stream.close()
    assert vm.stop_daemon("TERM") == 0


#: Port of busybox httpd in the applet scenario.
APPLET_HTTP_PORT = 8091


def test_busybox_applets_are_named_as_a_person_would(vm):
    """busybox's shell starts applets by re-executing ``/proc/self/exe``, so their command name is
    ``exe``. A running applet (``httpd``, whose child forked per connection serves it) is named by
    its ``argv[0]``, with busybox as executable.
    One that is gone before the daemon reads ``/proc`` (``wget``, done in a few milliseconds) is
    named the same way from what the exec itself carries: its file name and the arguments the exec
    probe reads from the new image's stack. Never ``exe``, never a ``/proc/*/exe`` path."""
    flowlib.install_guest_tools(vm)
    flowlib.start_daemon(vm, "btf")
    busybox = vm.run("readlink -f /proc/self/exe", check=True).out.strip()
    stream = FlowStream(vm)
    pb = stream.pb
    server = vm.spawn(f"exec sh -c 'exec httpd -f -p {APPLET_HTTP_PORT} -h /www'")
    try:
        flowlib.wait_until(lambda: vm.run(f"netstat -ltn | grep -q ':{APPLET_HTTP_PORT} '").rc == 0,
                           flowlib.READY_WAIT_S, "httpd to listen")
        comm = vm.run(f"cat /proc/{server.pid}/comm", check=True).out.strip()
        with flowlib.scenario(vm, f"tcp port {APPLET_HTTP_PORT}") as sc:
            out = vm.run(f"sh -c 'echo $$; exec wget -q -O /dev/null "
                         f"http://127.0.0.1:{APPLET_HTTP_PORT}/index.html'", check=True).out
        wget_pid = int(out.split()[0])
        client = next(k for k in sc.totals.sent if k[0] == "tcp" and k[2] == ("127.0.0.1", APPLET_HTTP_PORT))
        local, srv = client[1], ("127.0.0.1", APPLET_HTTP_PORT)
        got = stream.wait_finals(pb.TRANSPORT_TCP, [(local, srv), (srv, local)])
        c, s = got[(local, srv)][0], got[(srv, local)][0]
        problems = []
        # httpd serves each connection in a child it forks: the flow is that child's.
        if (s.process.pid == server.pid or (s.process.ppid, s.process.name, s.process.executable)
                != (server.pid, "httpd", busybox)):
            problems.append(f"httpd: process {s.process.pid} (parent {s.process.ppid}) {s.process.name!r} "
                            f"{s.process.executable!r}, want a child of {server.pid} 'httpd' {busybox!r}")
        # Gone in milliseconds: named from the exec's own events whether or not /proc was read.
        # Its executable is the shell's before the re-exec: /proc/<pid>/exe (busybox) when the
        # shell was read in time, else the file name its own exec was given (/bin/sh, a link)
        # resolved in its parent's root: busybox either way.
        want_args = ["wget", "-q", "-O", "/dev/null"]
        exe = c.process.executable
        if ((c.process.pid, c.process.name, exe) != (wget_pid, "wget", busybox)
                or list(c.process.args[:len(want_args)]) != want_args):
            problems.append(f"wget: process {c.process.pid} {c.process.name!r} {exe!r} "
                            f"args {list(c.process.args)!r}, want {wget_pid} 'wget' {busybox!r} "
                            f"args starting {want_args!r}")
        assert not problems, f"(httpd's command name in the guest: {comm!r})\n" + "\n".join(problems)
    finally:
        server.stop("TERM")
        stream.close()
    assert vm.stop_daemon("TERM") == 0
