//! The socket and flow tables: address reuse, bounded tables with their
//! evictions and losses, entry sizes, and consistency under mixed events.

use super::*;

#[test]
fn sock_address_reuse_ends_old_socket_never_merges() {
    let mut h = H::new();
    let sk = 0x7000;
    h.create(S, 100, sk, Some(Tcp));
    h.connect(S, 100, sk, "10.0.0.1:1000", "10.0.0.2:80");
    h.pkt(
        S + MS,
        Some(sk),
        Tcp,
        Out,
        ("10.0.0.1:1000", "10.0.0.2:80"),
        60,
    );
    h.close(2 * S, Some(100), sk);
    // Reallocated before the termination timeout ran out: the old socket is
    // retired, its flow waits for late packets of its own tuple.
    h.create(3 * S, 200, sk, Some(Tcp));
    assert!(h.flows().is_empty());
    h.accept(3 * S, 200, sk, "10.0.0.1:80", "10.0.0.3:2000");
    h.pkt(
        3 * S + MS,
        Some(sk),
        Tcp,
        In,
        ("10.0.0.3:2000", "10.0.0.1:80"),
        70,
    );
    // A connect on an already connected address: reuse without close.
    h.connect(4 * S, 100, sk, "10.0.0.1:1001", "10.0.0.2:80");
    let second = only(h.flows());
    assert_eq!(second.direction, FlowDirection::Ingress);
    assert_eq!(counters(&second), (0, 0, 1, 70));
    assert_eq!(second.process.unwrap().pid, 200);
    assert_eq!(h.eng.stats().socket_reuses, 2);
    h.tick(100 * S);
    let mut v = h.flows();
    assert_eq!(v.len(), 2, "{v:#?}");
    v.sort_by_key(|r| r.id);
    let third = v.pop().unwrap();
    let old = v.pop().unwrap();
    assert!(old.is_final);
    assert_eq!(old.local.port, 1000);
    assert_eq!(old.process.as_ref().unwrap().pid, 100);
    assert_eq!(counters(&old), (1, 60, 0, 0));
    assert_ne!(second.id, old.id);
    assert_eq!(third.direction, FlowDirection::Egress);
    assert_eq!(third.local.port, 1001);
    assert_eq!(counters(&third), (0, 0, 0, 0));
}

#[test]
fn full_flow_table_evicts_with_final_record_and_loss() {
    let mut c = cfg();
    c.max_flows = 2;
    let mut h = H::with(c, 1024);
    let sk = 0xf100;
    h.create(S, 300, sk, Some(Udp));
    h.pkt(S, Some(sk), Udp, Out, ("10.0.0.1:1", "10.0.0.2:1"), 10);
    h.pkt(2 * S, Some(sk), Udp, Out, ("10.0.0.1:1", "10.0.0.3:1"), 10);
    h.pkt(3 * S, Some(sk), Udp, Out, ("10.0.0.1:1", "10.0.0.2:1"), 10); // keeps .2 active
    h.pkt(4 * S, Some(sk), Udp, Out, ("10.0.0.1:1", "10.0.0.4:1"), 10);
    let ev = only(h.flows());
    assert!(ev.is_final);
    assert_eq!(
        ev.remote.ip.to_string(),
        "10.0.0.3",
        "least recently active goes"
    );
    assert_eq!(h.eng.stats().flows, 2);
    h.tick(4 * S);
    let l = h.losses();
    assert_eq!(l.len(), 1);
    assert_eq!(
        (l[0].source, l[0].count),
        (LossSource::FlowTableEviction, 1)
    );
    assert_eq!(l[0].first, wall(4 * S));
    h.tick(5 * S);
    assert!(h.losses().is_empty(), "a loss is reported once");
}

#[test]
fn full_socket_table_evicts_and_reports() {
    let mut c = cfg();
    c.max_sockets = 2;
    let mut h = H::with(c, 1024);
    h.create(S, 100, 0x1, Some(Udp));
    h.pkt(S, Some(0x1), Udp, Out, ("10.0.0.1:1", "10.0.0.2:1"), 10);
    h.create(2 * S, 100, 0x2, Some(Udp));
    h.create(3 * S, 100, 0x3, Some(Udp));
    let r = only(h.flows());
    assert_eq!(r.sock, 0x1, "the oldest socket's flow is emitted");
    h.tick(3 * S);
    let l = h.losses();
    assert_eq!(
        (l[0].source, l[0].count),
        (LossSource::SocketTableEviction, 1)
    );
    assert_eq!(h.eng.stats().sockets, 2);
}

#[test]
fn full_process_table_reports_loss() {
    // Four processes scanned into a table of four; a new pid evicts.
    let mut h = H::with(cfg(), 4);
    h.src.set(proc_snap(500, "new"));
    h.create(S, 500, 0x1, Some(Udp));
    h.tick(S);
    let l = h.losses();
    assert_eq!(l.len(), 1);
    assert_eq!(
        (l[0].source, l[0].count),
        (LossSource::ProcessTableEviction, 1)
    );
    assert_eq!(h.eng.stats().process_evictions, 1);
}

#[test]
fn table_entries_stay_small() {
    // Memory per tracked flow is dominated by these; keep them in check.
    assert!(
        std::mem::size_of::<Tuple>() <= 36,
        "{}",
        std::mem::size_of::<Tuple>()
    );
    // 152 bytes of counters and links, 80 of the two endpoints'
    // sequence spaces (see `seq`).
    assert!(
        std::mem::size_of::<Option<Flow>>() <= 232,
        "{}",
        std::mem::size_of::<Option<Flow>>()
    );
    assert!(
        std::mem::size_of::<Option<Socket>>() <= 128,
        "{}",
        std::mem::size_of::<Option<Socket>>()
    );
}

/// A deterministic mix of socket events and packets over a few reused
/// socket addresses and endpoints.
fn mixed_events(n: usize) -> Vec<Event> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let r = next();
        let sock = 0x1000 + (r % 12) * 0x100;
        let port = 1000 + ((r >> 8) % 6) as u16;
        let peer = 80 + ((r >> 16) % 3) as u16;
        let l = SocketAddr::from(([10, 0, 0, 1], port));
        let rem = SocketAddr::from(([10, 0, 0, 2], peer));
        let tr = if (r >> 20) % 2 == 0 { Tcp } else { Udp };
        let task = Some(Task {
            pid: 100 + ((r >> 24) % 3) as u32 * 100,
            tid: 1,
        });
        let (task, kind) = match (r >> 32) % 16 {
            0 => (
                task,
                EventKind::SockCreate {
                    sock,
                    transport: Some(tr),
                },
            ),
            1 => (
                task,
                EventKind::TcpConnect {
                    sock,
                    local: l,
                    remote: rem,
                },
            ),
            2 => (
                task,
                EventKind::TcpAccept {
                    sock,
                    local: l,
                    remote: rem,
                },
            ),
            3 => (task, EventKind::SockClose { sock }),
            4 => (
                task,
                EventKind::SockActivity {
                    sock,
                    transport: tr,
                    op: SockOp::Send,
                    peer: None,
                },
            ),
            k => {
                let dir = if k % 2 == 0 { Out } else { In };
                let (src, dst) = if dir == Out { (l, rem) } else { (rem, l) };
                let sock = if k == 15 { None } else { Some(sock) };
                (
                    None,
                    EventKind::Packet(Packet {
                        sock,
                        dir,
                        transport: tr,
                        src,
                        dst,
                        ip_len: 40 + (k as u32),
                        tcp_flags: None,
                        tcp_seq: None,
                    }),
                )
            }
        };
        v.push(Event {
            time: i as u64 * 50 * MS,
            cpu: 0,
            task,
            kind,
        });
    }
    v
}

#[test]
fn handle_batch_matches_handle() {
    let evs = mixed_events(5_000);
    let mut a = H::new();
    let mut b = H::new();
    for (i, chunk) in evs.chunks(37).enumerate() {
        for ev in chunk {
            a.eng.handle(ev, &mut a.out);
        }
        b.eng.handle_batch(chunk, &mut b.out);
        let now = chunk.last().unwrap().time;
        if i % 3 == 0 {
            a.tick(now);
            b.tick(now);
        }
    }
    a.eng.flush(&mut a.out);
    b.eng.flush(&mut b.out);
    let (fa, fb) = (a.flows(), b.flows());
    assert!(fa.len() > 100, "the mix produces many flows: {}", fa.len());
    assert_eq!(fa, fb);
    assert_eq!(a.eng.stats(), b.eng.stats());
}

#[test]
fn mixed_sequence_keeps_tables_consistent_and_bounded() {
    let mut c = cfg();
    c.max_flows = 8;
    c.max_sockets = 6;
    let mut h = H::with(c, 1024);
    let evs = mixed_events(20_000);
    for ev in &evs {
        h.eng.handle(ev, &mut h.out);
        let st = h.eng.stats();
        assert!(st.flows <= 8 && st.sockets <= 6, "{st:?}");
        if ev.time % (5 * S) == 0 {
            h.tick(ev.time);
        }
    }
    h.eng.flush(&mut h.out);
    let recs = h.flows();
    let st = h.eng.stats();
    assert_eq!((st.flows, st.sockets), (0, 0));
    // Every flow created ends in exactly one final record.
    let finals = recs.iter().filter(|r| r.is_final).count() as u64;
    assert_eq!(finals + st.self_suppressed, st.flows_created);
    let mut ids: Vec<u64> = recs.iter().filter(|r| r.is_final).map(|r| r.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len() as u64, finals, "final ids are unique");
    assert!(st.flow_evictions > 0 && st.socket_evictions > 0);
}
