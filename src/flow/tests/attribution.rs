//! Owners from egress packets sampled in the task that sent them.

use super::*;

/// nginx (pid 200) forks its child 201 at `S + MS`.
fn forked_child(h: &mut H) {
    h.ev(
        S + MS,
        Some(200),
        EventKind::Fork {
            parent: 200,
            child: 201,
        },
    );
    h.src.set(ProcSnapshot {
        ppid: 200,
        start: Some(wall(S + MS)),
        ..proc_snap(201, "nginx")
    });
}

#[test]
fn a_forking_servers_child_takes_the_flow_by_the_packets_it_sends() {
    let mut h = H::new();
    let conn = 0x5100;
    let (cli, srv) = ("10.0.0.2:41000", "10.0.0.1:8080");
    h.accept(S, 200, conn, srv, cli);
    forked_child(&mut h);
    h.pkt(S + 2 * MS, Some(conn), Tcp, In, (cli, srv), 100);
    h.sent(S + 3 * MS, 201, conn, Tcp, (srv, cli), 300);
    h.close(S + 4 * MS, Some(201), conn);
    h.tick(100 * S);
    let r = only(h.flows());
    let p = r.process.as_ref().expect("owner");
    assert_eq!((p.pid, p.ppid), (201, 200));
    assert_eq!(counters(&r), (1, 300, 1, 100));
    assert_eq!(h.eng.stats().handed_to_children, 1);
}

#[test]
fn a_udp_socket_never_seen_is_its_senders_from_the_first_datagram() {
    let mut h = H::new();
    let sk = 0x6100;
    let (me, dns) = ("10.0.0.2:53000", "10.0.0.53:53");
    h.sent(S, 300, sk, Udp, (me, dns), 60);
    h.pkt(S + MS, Some(sk), Udp, In, (dns, me), 120);
    h.tick(100 * S);
    let r = only(h.flows());
    assert_eq!(r.process.as_ref().expect("owner").name, "dig");
    // Its creation was not seen: who spoke first on it is not known.
    assert_eq!(r.direction, FlowDirection::Unknown);
    assert_eq!(counters(&r), (1, 60, 1, 120));
}

#[test]
fn a_fin_sent_by_the_closer_after_its_close_stays_on_the_flow() {
    let mut h = H::new();
    let sk = 0x6200;
    let (me, web) = ("10.0.0.2:41000", "10.0.0.1:80");
    h.create(S, 100, sk, Some(Tcp));
    h.connect(S, 100, sk, me, web);
    h.sent(S + MS, 100, sk, Tcp, (me, web), 60);
    h.pkt(S + 2 * MS, None, Tcp, In, (web, me), 60);
    // close() releases the socket, then sends the FIN in the same task.
    h.close(S + 3 * MS, Some(100), sk);
    h.sent(S + 3 * MS, 100, sk, Tcp, (me, web), 52);
    h.pkt(S + 4 * MS, None, Tcp, In, (web, me), 52);
    h.tick(100 * S);
    let r = only(h.flows());
    assert_eq!(r.process.as_ref().expect("owner").pid, 100);
    assert_eq!(counters(&r), (2, 112, 2, 112));
}

#[test]
fn a_kernel_thread_sending_on_a_socket_does_not_take_it() {
    let mut h = H::new();
    h.src.set(ProcSnapshot {
        pid: 77,
        ppid: crate::model::KTHREADD_PID,
        name: "napi/eth0-8193".into(),
        args: Vec::new(),
        exe: String::new(),
        start: None,
        creds: None,
        cgroup: None,
    });
    let conn = 0x6300;
    let (cli, srv) = ("10.0.0.2:41000", "10.0.0.1:8080");
    h.accept(S, 200, conn, srv, cli);
    // A receive-path reply sent from a threaded NAPI poll.
    h.sent(S + MS, 77, conn, Tcp, (srv, cli), 52);
    h.close(S + 2 * MS, Some(200), conn);
    h.tick(100 * S);
    let r = only(h.flows());
    assert_eq!(r.process.as_ref().expect("owner").pid, 200);
    assert_eq!(counters(&r).0, 1);
}

#[test]
fn an_ingress_packet_never_attributes_even_with_a_task() {
    let mut h = H::new();
    let sk = 0x6400;
    let (me, peer) = ("10.0.0.1:9000", "10.0.0.2:50000");
    h.create(S, 200, sk, Some(Udp));
    let p = Packet {
        sock: Some(sk),
        dir: In,
        transport: Udp,
        src: sa(peer),
        dst: sa(me),
        ip_len: 100,
        tcp_flags: None,
        tcp_seq: None,
    };
    h.ev(S + MS, Some(100), EventKind::Packet(p));
    h.tick(100 * S);
    let r = only(h.flows());
    assert_eq!(r.process.as_ref().expect("owner").pid, 200);
}

#[test]
fn a_forked_child_that_only_closes_the_socket_takes_the_flow() {
    let mut h = H::new();
    let conn = 0x6500;
    let (cli, srv) = ("10.0.0.2:41000", "10.0.0.1:8080");
    h.accept(S, 200, conn, srv, cli);
    forked_child(&mut h);
    h.pkt(S + 2 * MS, Some(conn), Tcp, In, (cli, srv), 100);
    // Its answer left from a softirq (no task); its close is the last one.
    h.pkt(S + 3 * MS, Some(conn), Tcp, Out, (srv, cli), 300);
    h.close(S + 4 * MS, Some(201), conn);
    h.tick(100 * S);
    let r = only(h.flows());
    assert_eq!(r.process.as_ref().expect("owner").pid, 201);
}
