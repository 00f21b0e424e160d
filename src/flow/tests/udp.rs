//! UDP: flows per peer, ingress lookup through the local endpoint indices,
//! and datagrams parked until their socket is known.

use super::*;

#[test]
fn udp_unconnected_socket_has_one_flow_per_peer() {
    let mut h = H::new();
    let sk = 0x5000;
    h.create(S, 300, sk, Some(Udp));
    h.pkt(
        S + MS,
        Some(sk),
        Udp,
        Out,
        ("10.0.0.1:5353", "10.0.0.53:53"),
        70,
    );
    h.pkt(
        S + 2 * MS,
        Some(sk),
        Udp,
        Out,
        ("10.0.0.1:5353", "8.8.8.8:53"),
        71,
    );
    h.pkt(
        S + 3 * MS,
        Some(sk),
        Udp,
        In,
        ("10.0.0.53:53", "10.0.0.1:5353"),
        120,
    );
    h.pkt(
        S + 4 * MS,
        Some(sk),
        Udp,
        In,
        ("9.9.9.9:53", "10.0.0.1:5353"),
        130,
    );
    h.pkt(
        S + 5 * MS,
        Some(sk),
        Udp,
        Out,
        ("10.0.0.1:5353", "10.0.0.53:53"),
        70,
    );
    assert_eq!(h.eng.stats().flows, 3);
    h.tick(S + 5 * MS + 30 * S);
    let mut v = h.flows();
    v.sort_by_key(|r| r.remote.ip.to_string());
    let got: Vec<_> = v
        .iter()
        .map(|r| {
            (
                r.remote.ip.to_string(),
                r.direction,
                counters(r),
                r.complete,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "10.0.0.53".into(),
                FlowDirection::Egress,
                (2, 140, 1, 120),
                true
            ),
            ("8.8.8.8".into(), FlowDirection::Egress, (1, 71, 0, 0), true),
            (
                "9.9.9.9".into(),
                FlowDirection::Ingress,
                (0, 0, 1, 130),
                true
            ),
        ]
    );
    assert!(v.iter().all(|r| r.process.as_ref().unwrap().name == "dig"));
}

#[test]
fn udp_ingress_without_sock_matches_local_then_port_index() {
    let mut h = H::new();
    let sk = 0x6000;
    h.create(S, 300, sk, Some(Udp));
    // First packet is received: ingress flow; registers the local endpoint.
    h.pkt(
        S + MS,
        Some(sk),
        Udp,
        In,
        ("10.0.0.9:4000", "10.0.0.1:53"),
        100,
    );
    // Same local endpoint, no sock.
    h.pkt(
        S + 2 * MS,
        None,
        Udp,
        In,
        ("10.0.0.9:4000", "10.0.0.1:53"),
        100,
    );
    // Another local address of a wildcard-bound socket: by port.
    h.pkt(
        S + 3 * MS,
        None,
        Udp,
        In,
        ("10.0.0.7:4001", "192.168.1.1:53"),
        90,
    );
    // Nothing listens on 54.
    h.pkt(
        S + 4 * MS,
        None,
        Udp,
        In,
        ("10.0.0.7:4001", "192.168.1.1:54"),
        90,
    );
    // Parked for a socket that may still show up; counted when none did.
    assert_eq!(h.eng.stats().parked_udp, 1);
    h.tick(100 * S);
    assert_eq!(h.eng.stats().unmatched_packets, 1);
    let mut v = h.flows();
    v.sort_by_key(|r| r.remote.port);
    assert_eq!(v.len(), 2);
    assert_eq!(v[0].direction, FlowDirection::Ingress);
    assert_eq!(counters(&v[0]), (0, 0, 2, 200));
    assert_eq!(v[1].local.ip.to_string(), "192.168.1.1");
    assert_eq!(counters(&v[1]), (0, 0, 1, 90));
    assert!(v.iter().all(|r| r.sock == sk));
}

#[test]
fn receive_only_udp_socket_is_found_through_its_recv_bound_address() {
    let mut h = H::new();
    let (specific, wildcard) = (0x7000, 0x7100);
    h.create(S, 200, specific, Some(Udp));
    h.create(S, 200, wildcard, Some(Udp));
    // Blocking receives: the bound addresses are known before any packet.
    for (sk, local) in [(specific, "127.0.0.1:9201"), (wildcard, "0.0.0.0:9301")] {
        h.ev(
            S + MS,
            Some(200),
            EventKind::UdpRecv {
                sock: sk,
                local: sa(local),
            },
        );
    }
    // Ingress packets carry no socket; the receivers never send.
    for (i, (src, dst)) in [
        ("127.0.0.1:50000", "127.0.0.1:9201"),
        ("127.0.0.1:50000", "127.0.0.1:9201"),
        ("10.0.0.5:50001", "10.0.0.1:9301"),
    ]
    .into_iter()
    .enumerate()
    {
        h.pkt(S + (2 + i as u64) * MS, None, Udp, In, (src, dst), 228);
    }
    assert_eq!(h.eng.stats().unmatched_packets, 0);
    h.tick(100 * S);
    let mut v = h.flows();
    v.sort_by_key(|r| r.local.port);
    assert_eq!(v.len(), 2, "{v:#?}");
    assert_eq!((v[0].sock, v[1].sock), (specific, wildcard));
    assert_eq!(counters(&v[0]), (0, 0, 2, 456));
    assert_eq!(counters(&v[1]), (0, 0, 1, 228));
    assert_eq!(v[1].local.ip.to_string(), "10.0.0.1");
    for r in &v {
        assert_eq!(r.direction, FlowDirection::Ingress);
        assert!(r.complete);
        assert_eq!(r.process.as_ref().map(|p| p.pid), Some(200));
    }
}

#[test]
fn udp_recv_with_unbound_port_registers_nothing() {
    let mut h = H::new();
    h.create(S, 200, 0x7200, Some(Udp));
    h.ev(
        S + MS,
        Some(200),
        EventKind::UdpRecv {
            sock: 0x7200,
            local: sa("0.0.0.0:0"),
        },
    );
    h.pkt(
        S + 2 * MS,
        None,
        Udp,
        In,
        ("127.0.0.1:1", "127.0.0.1:9"),
        30,
    );
    // Parked, waiting for a socket that receives on port 9; none shows up.
    assert_eq!(h.eng.stats().parked_udp, 1);
    h.tick(S + 2 * MS + 29 * S);
    assert_eq!(h.eng.stats().unmatched_packets, 0);
    h.tick(S + 2 * MS + 30 * S);
    let st = h.eng.stats();
    assert_eq!((st.parked_udp, st.unmatched_packets), (0, 1));
    assert!(h.flows().is_empty());
}

#[test]
fn datagrams_queued_before_the_first_receive_land_on_the_socket() {
    let mut h = H::new();
    let (specific, wildcard) = (0x7300, 0x7400);
    h.create(S, 200, specific, Some(Udp));
    h.create(S, 201, wildcard, Some(Udp));
    // Datagrams arrive before either socket called recvfrom.
    h.pkt(
        2 * S,
        None,
        Udp,
        In,
        ("10.0.0.5:5000", "10.0.0.1:9401"),
        100,
    );
    h.pkt(
        2 * S + MS,
        None,
        Udp,
        In,
        ("10.0.0.5:5000", "10.0.0.1:9401"),
        100,
    );
    h.pkt(
        2 * S + 2 * MS,
        None,
        Udp,
        In,
        ("10.0.0.6:5000", "10.0.0.1:9401"),
        50,
    );
    h.pkt(
        2 * S + 3 * MS,
        None,
        Udp,
        In,
        ("10.0.0.7:5000", "10.0.0.2:9501"),
        70,
    );
    h.pkt(
        2 * S + 4 * MS,
        None,
        Udp,
        In,
        ("10.0.0.7:5000", "10.0.0.3:9501"),
        70,
    );
    // Same port, another local address: not the specific socket's.
    h.pkt(
        2 * S + 5 * MS,
        None,
        Udp,
        In,
        ("10.0.0.8:5000", "10.0.0.9:9401"),
        10,
    );
    let st = h.eng.stats();
    assert_eq!((st.parked_udp, st.unmatched_packets), (5, 0));
    for (sk, pid, local) in [
        (specific, 200, "10.0.0.1:9401"),
        (wildcard, 201, "0.0.0.0:9501"),
    ] {
        h.ev(
            5 * S,
            Some(pid),
            EventKind::UdpRecv {
                sock: sk,
                local: sa(local),
            },
        );
    }
    let st = h.eng.stats();
    assert_eq!((st.parked_udp, st.parked_udp_claimed), (1, 4));
    h.tick(100 * S);
    let mut v = h.flows();
    v.sort_by_key(|r| (r.local.port, r.local.ip, r.remote.ip));
    type Row = (SockAddr, String, String, (u64, u64, u64, u64));
    let got: Vec<Row> = v
        .iter()
        .map(|r| {
            assert_eq!(r.direction, FlowDirection::Ingress);
            assert!(r.complete);
            (
                r.sock,
                format!("{}:{}", r.local.ip, r.local.port),
                r.remote.ip.to_string(),
                counters(r),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                specific,
                "10.0.0.1:9401".into(),
                "10.0.0.5".into(),
                (0, 0, 2, 200)
            ),
            (
                specific,
                "10.0.0.1:9401".into(),
                "10.0.0.6".into(),
                (0, 0, 1, 50)
            ),
            // One flow per remote endpoint of an unconnected socket, with
            // the local address it was first reached at.
            (
                wildcard,
                "10.0.0.2:9501".into(),
                "10.0.0.7".into(),
                (0, 0, 2, 140)
            ),
        ]
    );
    // Each flow starts at its first parked datagram.
    let starts: Vec<SystemTime> = v.iter().map(|r| r.start).collect();
    assert_eq!(
        starts,
        vec![wall(2 * S), wall(2 * S + 2 * MS), wall(2 * S + 3 * MS),]
    );
    assert_eq!(v[0].process.as_ref().map(|p| p.pid), Some(200));
    assert_eq!(v[2].process.as_ref().map(|p| p.pid), Some(201));
    // The other address's datagram expired unclaimed.
    assert_eq!(h.eng.stats().unmatched_packets, 1);
}

#[test]
fn a_reply_from_the_socket_claims_the_request_parked_before_it() {
    let mut h = H::new();
    h.create(S, 200, 0x7500, Some(Udp));
    h.pkt(2 * S, None, Udp, In, ("10.0.0.5:5000", "10.0.0.1:53"), 80);
    h.pkt(
        2 * S + MS,
        Some(0x7500),
        Udp,
        Out,
        ("10.0.0.1:53", "10.0.0.5:5000"),
        120,
    );
    h.tick(100 * S);
    let v = h.flows();
    assert_eq!(v.len(), 1, "{v:#?}");
    assert_eq!(counters(&v[0]), (1, 120, 1, 80));
    assert_eq!(v[0].start, wall(2 * S));
    assert_eq!(h.eng.stats().unmatched_packets, 0);
}

#[test]
fn parked_udp_table_is_bounded() {
    let mut c = cfg();
    c.max_parked_udp = 2;
    let mut h = H::with(c, 1024);
    for port in 1..=4u16 {
        h.pkt(
            S,
            None,
            Udp,
            In,
            ("10.0.0.5:5000", &format!("10.0.0.1:{port}")),
            40,
        );
    }
    let st = h.eng.stats();
    assert_eq!((st.parked_udp, st.unmatched_packets), (2, 2));
    h.tick(100 * S);
    let st = h.eng.stats();
    assert_eq!((st.parked_udp, st.unmatched_packets), (0, 4));
}
