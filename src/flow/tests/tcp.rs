//! TCP: connect and accept records, embryonic handshakes, lost connects,
//! resumed connections and reused socket addresses.

use super::*;

#[test]
fn tcp_connect_v4_full_record() {
    let mut h = H::new();
    let sk = 0xffff_8888_0000_1000;
    h.create(S, 100, sk, Some(Tcp));
    h.connect(S + MS, 100, sk, "10.0.2.15:40192", "151.101.66.217:80");
    h.pkt(
        S + 2 * MS,
        Some(sk),
        Tcp,
        Out,
        ("10.0.2.15:40192", "151.101.66.217:80"),
        60,
    );
    h.pkt(
        S + 30 * MS,
        Some(sk),
        Tcp,
        In,
        ("151.101.66.217:80", "10.0.2.15:40192"),
        60,
    );
    h.pkt(
        S + 31 * MS,
        None,
        Tcp,
        Out,
        ("10.0.2.15:40192", "151.101.66.217:80"),
        52,
    );
    h.pkt(
        S + 32 * MS,
        None,
        Tcp,
        Out,
        ("10.0.2.15:40192", "151.101.66.217:80"),
        182,
    );
    h.pkt(
        S + 60 * MS,
        None,
        Tcp,
        In,
        ("151.101.66.217:80", "10.0.2.15:40192"),
        377,
    );
    h.close(S + 70 * MS, Some(100), sk);
    h.tick(S + 70 * MS + 4 * S);
    assert!(
        h.flows().is_empty(),
        "final only after the termination timeout"
    );
    h.tick(S + 70 * MS + 5 * S);
    let r = only(h.flows());
    assert!(r.is_final && r.complete);
    assert_eq!(r.direction, FlowDirection::Egress);
    assert_eq!(r.transport, Tcp);
    assert_eq!(r.local.ip.to_string(), "10.0.2.15");
    assert_eq!((r.local.port, r.remote.port), (40192, 80));
    assert_eq!(counters(&r), (3, 294, 2, 437));
    assert_eq!(r.community_id, "1:jdjL1TkdpF1v1GM0+JxRRp+V7KI=");
    assert_eq!(r.sock, sk);
    assert_eq!(r.start, wall(S + MS));
    assert_eq!(r.end, wall(S + 60 * MS));
    assert_eq!(r.network_type(), "ipv4");
    let p = r.process.expect("owner");
    assert_eq!((p.pid, p.name.as_str()), (100, "curl"));
    assert_eq!(p.creds.map(|c| c.uid), Some(1000));
    assert_eq!(h.eng.stats().sockets, 0);
    assert_eq!(h.eng.stats().flows, 0);
}

#[test]
fn tcp_accept_v6_merges_embryonic_handshake() {
    let mut h = H::new();
    let listener = 0xa000;
    let request = 0xb000;
    let child = 0xc000;
    let (srv, cli) = ("[2001:db8::1]:443", "[2001:db8::2]:55000");
    h.create(S, 200, listener, Some(Tcp));
    // Handshake before accept returns: listener, request sock, no sock.
    h.pkt(2 * S, Some(listener), Tcp, In, (cli, srv), 80);
    h.pkt(2 * S + MS, Some(request), Tcp, Out, (srv, cli), 80);
    h.pkt(2 * S + 2 * MS, None, Tcp, In, (cli, srv), 72);
    assert_eq!(h.eng.stats().embryonic, 1);
    h.accept(2 * S + 5 * MS, 200, child, srv, cli);
    assert_eq!(h.eng.stats().embryonic, 0);
    h.pkt(2 * S + 6 * MS, Some(child), Tcp, In, (cli, srv), 500);
    h.pkt(2 * S + 7 * MS, Some(child), Tcp, Out, (srv, cli), 1500);
    h.close(3 * S, Some(200), child);
    h.tick(10 * S);
    let r = only(h.flows());
    assert_eq!(r.direction, FlowDirection::Ingress);
    assert!(r.complete);
    assert_eq!(counters(&r), (2, 1580, 3, 652));
    assert_eq!(r.start, wall(2 * S), "start is the first handshake packet");
    assert_eq!(r.network_type(), "ipv6");
    assert_eq!(r.sock, child);
    assert_eq!(r.process.unwrap().name, "nginx");
    assert_eq!(h.eng.stats().embryonic_claimed, 1);
}

#[test]
fn lost_connect_gives_unknown_incomplete_flow_with_owner() {
    let mut h = H::new();
    let sk = 0xc100;
    let (l, r) = ("10.0.0.1:1000", "10.0.0.2:80");
    h.create(S, 100, sk, Some(Tcp));
    // TcpConnect was lost.
    h.activity(S + MS, 100, sk, Tcp, SockOp::Send);
    h.pkt(S + 2 * MS, Some(sk), Tcp, Out, (l, r), 100);
    h.pkt(S + 3 * MS, Some(sk), Tcp, In, (r, l), 200);
    h.pkt(S + 4 * MS, None, Tcp, In, (r, l), 200);
    h.close(2 * S, None, sk);
    h.tick(10 * S);
    let rec = only(h.flows());
    assert_eq!(rec.direction, FlowDirection::Unknown);
    assert!(!rec.complete);
    assert_eq!(counters(&rec), (1, 100, 2, 400));
    assert_eq!(rec.process.unwrap().pid, 100);
}

#[test]
fn mid_flow_start_tcp_via_embryonic_promotion_and_udp_directly() {
    let mut h = H::new();
    let (l, r) = ("10.0.0.1:1000", "10.0.0.2:80");
    h.pkt(S, Some(0xd100), Tcp, In, (r, l), 1000);
    h.pkt(S + MS, Some(0xd100), Tcp, Out, (l, r), 52);
    h.pkt(
        S + 2 * MS,
        Some(0xd200),
        Udp,
        Out,
        ("10.0.0.1:3000", "10.0.0.3:3000"),
        40,
    );
    assert_eq!(
        h.eng.stats().flows,
        1,
        "UDP immediately, TCP after the embryonic wait"
    );
    h.tick(6 * S);
    assert_eq!(h.eng.stats().embryonic_promoted, 1);
    h.pkt(7 * S, Some(0xd100), Tcp, In, (r, l), 1000);
    h.tick(100 * S);
    let mut v = h.flows();
    v.sort_by_key(|r| r.sock);
    assert_eq!(v.len(), 2);
    assert!(v
        .iter()
        .all(|r| !r.complete && r.direction == FlowDirection::Unknown));
    assert!(v.iter().all(|r| r.process.is_none()));
    assert_eq!(counters(&v[0]), (1, 52, 2, 2000));
    assert_eq!(v[0].start, wall(S));
    assert_eq!(counters(&v[1]), (1, 40, 0, 0));
}

#[test]
fn unclaimed_handshake_on_listener_expires_and_is_counted() {
    let mut h = H::new();
    h.create(S, 200, 0xe100, Some(Tcp));
    h.pkt(
        2 * S,
        Some(0xe100),
        Tcp,
        In,
        ("10.0.0.9:5000", "10.0.0.1:80"),
        60,
    );
    h.tick(7 * S);
    assert!(h.flows().is_empty());
    let st = h.eng.stats();
    assert_eq!((st.embryonic, st.embryonic_expired, st.flows), (0, 1, 0));
}

#[test]
fn embryonic_table_is_bounded() {
    let mut c = cfg();
    c.max_embryonic = 2;
    let mut h = H::with(c, 1024);
    for port in 0..5u16 {
        let src = format!("10.0.0.9:{}", 5000 + port);
        h.pkt(S, None, Tcp, In, (&src, "10.0.0.1:80"), 60);
    }
    let st = h.eng.stats();
    assert_eq!((st.embryonic, st.embryonic_dropped), (2, 3));
}

#[test]
fn v4_mapped_dual_stack_socket_matches_ipv4_packets() {
    let mut h = H::new();
    let sk = 0x3100;
    h.create(S, 100, sk, Some(Tcp));
    h.connect(S, 100, sk, "[::ffff:10.0.0.1]:1000", "[::ffff:10.0.0.2]:80");
    h.pkt(S + MS, None, Tcp, Out, ("10.0.0.1:1000", "10.0.0.2:80"), 60);
    h.close(2 * S, None, sk);
    h.tick(10 * S);
    let r = only(h.flows());
    assert_eq!(r.local.packets, 1);
    assert_eq!(r.local.ip.to_string(), "10.0.0.1");
}

#[test]
fn tcp_connection_resuming_after_inactivity_is_one_new_flow() {
    let mut h = H::new();
    let sk = 0x4100;
    let (l, r) = ("10.0.0.1:1000", "10.0.0.2:22");
    h.create(0, 100, sk, Some(Tcp));
    h.connect(0, 100, sk, l, r);
    h.pkt(S, Some(sk), Tcp, Out, (l, r), 60);
    h.tick(31 * S);
    let first = only(h.flows());
    assert!(first.is_final && first.complete);
    h.pkt(50 * S, Some(sk), Tcp, In, (r, l), 80);
    h.pkt(51 * S, None, Tcp, Out, (l, r), 60);
    h.pkt(52 * S, Some(sk), Tcp, Out, (l, r), 60);
    assert_eq!(h.eng.stats().flows, 1);
    h.close(53 * S, Some(100), sk);
    h.tick(60 * S);
    let second = only(h.flows());
    assert_ne!(second.id, first.id);
    assert_eq!(counters(&second), (2, 120, 1, 80));
    assert_eq!(second.direction, FlowDirection::Egress);
    assert!(!second.complete);
}

#[test]
fn late_ack_after_the_closed_socket_was_reused_counts_on_the_old_flow() {
    // The server closes first; the kernel turns its socket into a TIME_WAIT
    // mini-socket and reuses the memory for a new socket; the peer's FIN
    // and the ACK answering it (sent with the per-CPU control socket) come
    // afterwards and belong to the old connection.
    let mut h = H::new();
    let (sk, ctl) = (0x8100, 0x8200);
    let (l, r) = ("127.0.0.1:9120", "127.0.0.1:51206");
    h.create(S, 100, sk, Some(Tcp));
    h.accept(S, 100, sk, l, r);
    h.pkt(S + MS, Some(sk), Tcp, Out, (l, r), 1000);
    h.close(2 * S, Some(100), sk);
    h.pkt(2 * S + MS, Some(sk), Tcp, Out, (l, r), 52); // FIN
    h.create(2 * S + 2 * MS, 300, sk, Some(Tcp)); // reused
    h.connect(2 * S + 2 * MS, 300, sk, "127.0.0.1:40000", "127.0.0.1:22");
    h.pkt(2 * S + 3 * MS, None, Tcp, In, (r, l), 52); // peer's FIN
    h.pkt(2 * S + 4 * MS, Some(ctl), Tcp, Out, (l, r), 52); // last ACK
    h.pkt(
        2 * S + 5 * MS,
        Some(sk),
        Tcp,
        Out,
        ("127.0.0.1:40000", "127.0.0.1:22"),
        60,
    );
    h.tick(6 * S);
    assert!(h.flows().is_empty());
    h.tick(7 * S + 2 * MS);
    let old = only(h.flows());
    assert_eq!((old.local.port, old.remote.port), (9120, 51206));
    assert_eq!(counters(&old), (3, 1104, 1, 52));
    assert_eq!(old.process.as_ref().unwrap().pid, 100);
    assert!(old.complete);
    h.close(8 * S, Some(300), sk);
    h.tick(100 * S);
    let new = only(h.flows());
    assert_eq!((new.local.port, new.remote.port), (40000, 22));
    assert_eq!(counters(&new), (1, 60, 0, 0));
    assert_eq!(new.process.as_ref().unwrap().pid, 300);
    let st = h.eng.stats();
    assert_eq!(
        (st.socket_reuses, st.sockets, st.flows, st.embryonic),
        (1, 0, 0, 0)
    );
}

#[test]
fn packet_of_a_new_connection_at_a_closed_sockets_address_waits_for_accept() {
    // A socket seen only sending (no connect, e.g. opened before the daemon
    // started) closes; the kernel reuses its memory for the child socket of
    // a new connection, which ACKs the peer's early FIN before `accept`
    // returns. That ACK belongs to the accepted connection, not to the
    // closed socket.
    let mut h = H::new();
    let sk = 0x8300;
    h.activity(S, 100, sk, Tcp, SockOp::Send);
    h.close(2 * S, Some(100), sk);
    let (l, r) = ("127.0.0.1:9120", "127.0.0.1:54234");
    h.pkt(3 * S, None, Tcp, In, (r, l), 60); // SYN
    h.pkt(3 * S + 1, None, Tcp, In, (r, l), 52); // FIN
    h.pkt(3 * S + 2, Some(sk), Tcp, Out, (l, r), 52); // ACK from the child
    h.accept(3 * S + 3, 200, sk, l, r);
    h.close(4 * S, Some(200), sk);
    h.tick(100 * S);
    let v = h.flows();
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!((v[0].local.port, v[0].remote.port), (9120, 54234));
    assert_eq!(counters(&v[0]), (1, 52, 2, 112));
    assert_eq!(v[0].process.as_ref().unwrap().pid, 200);
    assert_eq!(v[0].direction, FlowDirection::Ingress);
}
