//! Records and ownership: which process a flow is attributed to, and which
//! flows are the daemon's own.

use super::*;

#[test]
fn loopback_pair_gives_two_flows_each_with_its_process() {
    let mut h = H::new();
    let (cs, ls, asock) = (0x1000, 0x2000, 0x3000);
    let (c, s) = ("127.0.0.1:41000", "127.0.0.1:8080");
    h.create(S, 200, ls, Some(Tcp));
    h.create(S, 100, cs, Some(Tcp));
    h.connect(S + MS, 100, cs, c, s);
    // Every loopback packet is seen leaving one socket and entering the other.
    h.pkt(S + 2 * MS, Some(cs), Tcp, Out, (c, s), 60); // SYN
    h.pkt(S + 2 * MS, Some(ls), Tcp, In, (c, s), 60);
    h.pkt(S + 3 * MS, Some(0x4000), Tcp, Out, (s, c), 60); // SYN-ACK, request sock
    h.pkt(S + 3 * MS, Some(cs), Tcp, In, (s, c), 60);
    h.pkt(S + 4 * MS, Some(cs), Tcp, Out, (c, s), 52); // ACK
    h.pkt(S + 4 * MS, None, Tcp, In, (c, s), 52);
    h.accept(S + 5 * MS, 200, asock, s, c);
    h.pkt(S + 6 * MS, Some(cs), Tcp, Out, (c, s), 100);
    h.pkt(S + 6 * MS, Some(asock), Tcp, In, (c, s), 100);
    h.close(S + 7 * MS, Some(100), cs);
    h.close(S + 7 * MS, Some(200), asock);
    h.tick(20 * S);
    let mut v = h.flows();
    v.sort_by_key(|r| r.sock);
    assert_eq!(v.len(), 2);
    let (client, server) = (&v[0], &v[1]);
    assert_eq!(client.sock, cs);
    assert_eq!(client.direction, FlowDirection::Egress);
    assert_eq!(client.process.as_ref().unwrap().pid, 100);
    assert_eq!(counters(client), (3, 212, 1, 60));
    assert_eq!(server.sock, asock);
    assert_eq!(server.direction, FlowDirection::Ingress);
    assert_eq!(server.process.as_ref().unwrap().pid, 200);
    assert_eq!(counters(server), (1, 60, 3, 212));
    assert_eq!(client.community_id, server.community_id);
    assert_ne!(client.id, server.id);
}

#[test]
fn own_traffic_is_excluded_unless_included() {
    for include in [false, true] {
        let mut c = cfg();
        c.include_self = include;
        let mut h = H::with(c, 1024);
        h.create(S, OWN_PID, 0x1, Some(Udp));
        h.pkt(S, Some(0x1), Udp, Out, ("127.0.0.1:1", "127.0.0.1:2"), 10);
        h.create(S, 100, 0x2, Some(Udp));
        h.pkt(S, Some(0x2), Udp, Out, ("127.0.0.1:3", "127.0.0.1:4"), 10);
        h.tick(100 * S);
        let v = h.flows();
        let pids: Vec<u32> = v.iter().map(|r| r.process.as_ref().unwrap().pid).collect();
        if include {
            assert_eq!(v.len(), 2);
            assert!(pids.contains(&OWN_PID));
        } else {
            assert_eq!(pids, vec![100]);
            assert_eq!(h.eng.stats().self_suppressed, 1);
        }
    }
}

#[test]
fn attribution_ignores_packet_tasks_and_keeps_first_owner_per_flow() {
    let mut h = H::new();
    let sk = 0x2100;
    h.create(S, 300, sk, Some(Udp));
    // A packet whose sample hit another task (softirq): must not attribute.
    h.ev(
        S + MS,
        Some(200),
        EventKind::Packet(Packet {
            sock: Some(sk),
            dir: In,
            transport: Udp,
            src: sa("10.0.0.2:53"),
            dst: sa("10.0.0.1:999"),
            ip_len: 90,
            tcp_flags: None,
            tcp_seq: None,
        }),
    );
    // Another process sends on the socket (e.g. after fd passing).
    h.activity(2 * S, 100, sk, Udp, SockOp::Send);
    h.pkt(
        2 * S,
        Some(sk),
        Udp,
        Out,
        ("10.0.0.1:999", "10.0.0.2:53"),
        50,
    );
    h.pkt(
        2 * S,
        Some(sk),
        Udp,
        Out,
        ("10.0.0.1:999", "10.0.0.5:53"),
        50,
    );
    h.tick(100 * S);
    let mut v = h.flows();
    v.sort_by_key(|r| r.remote.ip.to_string());
    assert_eq!(
        v[0].process.as_ref().unwrap().name,
        "dig",
        "first owner kept"
    );
    assert_eq!(
        v[1].process.as_ref().unwrap().name,
        "curl",
        "new flows take the latest"
    );
}

#[test]
fn a_forking_servers_child_takes_the_flow_its_parent_accepted() {
    let mut h = H::new();
    let (ls, conn) = (0x5000, 0x5100);
    let (cli, srv) = ("10.0.0.2:41000", "10.0.0.1:8080");
    h.create(S, 200, ls, Some(Tcp));
    h.pkt(S + MS, None, Tcp, In, (cli, srv), 60);
    h.pkt(S + MS, Some(0x5200), Tcp, Out, (srv, cli), 60);
    h.pkt(S + 2 * MS, None, Tcp, In, (cli, srv), 52);
    h.accept(S + 3 * MS, 200, conn, srv, cli);
    h.ev(
        S + 4 * MS,
        Some(200),
        EventKind::Fork {
            parent: 200,
            child: 201,
        },
    );
    h.pkt(S + 5 * MS, Some(conn), Tcp, In, (cli, srv), 100);
    // The child answers; it exec'd another program first (as inetd's
    // children do): still the child's.
    h.src.set(ProcSnapshot {
        ppid: 200,
        start: Some(wall(S + 4 * MS)),
        ..proc_snap(201, "echod")
    });
    h.ev(
        S + 5 * MS,
        Some(201),
        EventKind::Exec {
            pid: 201,
            filename: "/usr/bin/echod".into(),
        },
    );
    h.activity(S + 6 * MS, 201, conn, Tcp, SockOp::Send);
    h.pkt(S + 6 * MS, Some(conn), Tcp, Out, (srv, cli), 300);
    // The parent closing its descriptor releases nothing; the child's does.
    h.close(S + 7 * MS, Some(201), conn);
    h.tick(100 * S);
    let r = only(h.flows());
    assert_eq!(r.direction, FlowDirection::Ingress);
    let p = r.process.as_ref().expect("owner");
    assert_eq!((p.pid, p.ppid, p.name.as_str()), (201, 200, "echod"));
    assert_eq!(counters(&r), (2, 360, 3, 212));
}

#[test]
fn an_applet_that_exits_before_proc_is_read_is_named_from_its_exec_events() {
    let mut h = H::new();
    h.src.set(ProcSnapshot {
        exe: "/bin/busybox".into(),
        ..proc_snap(310, "sh")
    });
    h.ev(
        S,
        Some(310),
        EventKind::Fork {
            parent: 310,
            child: 311,
        },
    );
    // busybox's shell re-executes itself as the applet; the applet is gone
    // before anything reads /proc/311.
    h.ev(
        S + MS,
        Some(311),
        EventKind::ExecArgs {
            pid: 311,
            argc: 3,
            args: vec!["wget".into(), "-q".into(), "http://10.0.0.1/".into()],
        },
    );
    h.ev(
        S + MS,
        Some(311),
        EventKind::Exec {
            pid: 311,
            filename: "/proc/self/exe".into(),
        },
    );
    let sk = 0x5310;
    h.create(S + 2 * MS, 311, sk, Some(Tcp));
    h.connect(S + 2 * MS, 311, sk, "10.0.0.2:40000", "10.0.0.1:80");
    h.pkt(
        S + 3 * MS,
        Some(sk),
        Tcp,
        Out,
        ("10.0.0.2:40000", "10.0.0.1:80"),
        60,
    );
    h.close(S + 4 * MS, Some(311), sk);
    h.tick(100 * S);
    let r = only(h.flows());
    let p = r.process.as_ref().expect("owner");
    assert_eq!(
        (p.pid, p.ppid, p.name.as_str(), p.executable.as_str()),
        (311, 310, "wget", "/bin/busybox")
    );
    assert_eq!(p.args, ["wget", "-q", "http://10.0.0.1/"]);
}

#[test]
fn a_process_that_did_not_fork_the_owner_takes_no_flow_over() {
    let mut h = H::new();
    let conn = 0x5100;
    let (cli, srv) = ("10.0.0.2:41000", "10.0.0.1:8080");
    h.accept(S, 200, conn, srv, cli);
    h.pkt(S + MS, Some(conn), Tcp, In, (cli, srv), 100);
    // The parent of the owner (or any unrelated process) sends on it.
    h.src.set(ProcSnapshot {
        ppid: 1,
        ..proc_snap(199, "supervisor")
    });
    h.activity(S + 2 * MS, 199, conn, Tcp, SockOp::Send);
    h.pkt(S + 2 * MS, Some(conn), Tcp, Out, (srv, cli), 300);
    h.close(S + 3 * MS, Some(199), conn);
    h.tick(100 * S);
    let r = only(h.flows());
    assert_eq!(r.process.expect("owner").pid, 200);
    assert_eq!(h.eng.stats().handed_to_children, 0);
}

#[test]
fn socket_without_owner_gets_one_from_later_syscall_event() {
    let mut h = H::new();
    let sk = 0x2200;
    h.pkt(S, Some(sk), Udp, Out, ("10.0.0.1:999", "10.0.0.2:53"), 50);
    h.activity(S + MS, 300, sk, Udp, SockOp::Recv);
    h.tick(100 * S);
    assert_eq!(only(h.flows()).process.unwrap().pid, 300);
}

#[test]
fn pid_reuse_never_mislabels() {
    let mut h = H::new();
    h.create(S, 100, 0x1, Some(Udp));
    h.pkt(S, Some(0x1), Udp, Out, ("10.0.0.1:1", "10.0.0.2:1"), 10);
    h.ev(2 * S, None, EventKind::Exit { tid: 100, pid: 100 });
    h.tick(10 * S); // grace over: pid 100 forgotten
                    // pid 100 is reused by a new program.
    h.src.set(proc_snap(100, "newprog"));
    h.ev(
        11 * S,
        Some(1),
        EventKind::Fork {
            parent: 1,
            child: 100,
        },
    );
    h.ev(
        11 * S,
        Some(100),
        EventKind::Exec {
            pid: 100,
            filename: "/usr/bin/newprog".into(),
        },
    );
    h.create(12 * S, 100, 0x2, Some(Udp));
    h.pkt(
        12 * S,
        Some(0x2),
        Udp,
        Out,
        ("10.0.0.1:2", "10.0.0.2:2"),
        10,
    );
    h.tick(100 * S);
    let mut v = h.flows();
    v.sort_by_key(|r| r.sock);
    let old = v[0].process.as_ref().unwrap();
    let new = v[1].process.as_ref().unwrap();
    assert_eq!((old.pid, old.name.as_str()), (100, "curl"));
    assert_eq!((new.pid, new.name.as_str()), (100, "newprog"));
    assert_ne!(old.created, new.created);
    assert_eq!(
        new.created,
        Some(wall(11 * S)),
        "start time from the fork event"
    );
}

#[test]
fn exec_and_creds_events_shape_later_attributions() {
    let mut h = H::new();
    h.create(S, 100, 0x1, Some(Udp));
    h.pkt(S, Some(0x1), Udp, Out, ("10.0.0.1:1", "10.0.0.2:1"), 10);
    // pid 100 drops privileges and execs something else (/proc is gone).
    h.src.remove(100);
    let creds = Creds {
        uid: 65534,
        gid: 65534,
        euid: 65534,
        egid: 65534,
    };
    h.ev(2 * S, Some(100), EventKind::Creds(creds));
    h.ev(
        2 * S,
        Some(100),
        EventKind::Exec {
            pid: 100,
            filename: "/usr/sbin/worker".into(),
        },
    );
    h.create(3 * S, 100, 0x2, Some(Udp));
    h.pkt(3 * S, Some(0x2), Udp, Out, ("10.0.0.1:2", "10.0.0.2:2"), 10);
    h.tick(100 * S);
    let mut v = h.flows();
    v.sort_by_key(|r| r.sock);
    let (before, after) = (
        v[0].process.as_ref().unwrap(),
        v[1].process.as_ref().unwrap(),
    );
    assert_eq!(
        (before.name.as_str(), before.creds.unwrap().uid),
        ("curl", 1000)
    );
    assert_eq!(
        (after.name.as_str(), after.executable.as_str()),
        ("worker", "/usr/sbin/worker")
    );
    assert_eq!(after.creds, Some(creds));
    assert_eq!(after.created, before.created, "same process across exec");
}

#[test]
fn unowned_tcp_flow_on_the_daemons_listening_port_is_its_own() {
    for include in [false, true] {
        let mut c = cfg();
        c.include_self = include;
        let mut h = H::with(c, 1024);
        // Connections whose sockets were never seen by a syscall event: the
        // handshake's embryonic entries become flows at expiry, unowned.
        for (sock, port) in [(0x7001, OWN_PORT), (0x7002, OWN_PORT + 1)] {
            let local = format!("10.0.2.15:{port}");
            h.pkt(S, None, Tcp, In, ("10.0.2.2:40000", &local), 60);
            h.pkt(S + 1, Some(sock), Tcp, Out, (&local, "10.0.2.2:40000"), 60);
        }
        h.tick(100 * S);
        let ports: Vec<u16> = h.flows().iter().map(|r| r.local.port).collect();
        if include {
            assert_eq!(ports.len(), 2, "{ports:?}");
        } else {
            assert_eq!(ports, vec![OWN_PORT + 1]);
            assert_eq!(h.eng.stats().self_suppressed, 1);
        }
    }
    // Another process's flow on that port is reported.
    let mut h = H::new();
    h.create(S, 100, 0x7003, Some(Tcp));
    h.accept(S, 100, 0x7003, "10.0.2.15:50051", "10.0.2.2:40001");
    h.pkt(
        S + 1,
        Some(0x7003),
        Tcp,
        Out,
        ("10.0.2.15:50051", "10.0.2.2:40001"),
        60,
    );
    h.tick(100 * S);
    let v = h.flows();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].process.as_ref().map(|p| p.pid), Some(100));
}
