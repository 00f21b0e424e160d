//! Socket-counter accounting: TCP flows take their counters from the
//! socket's close event, stay open while silent, and say how they were
//! counted.

use super::*;
use crate::model::{Accounting, TcpSockCounters};

fn counting() -> H {
    H::with(
        EngineConfig {
            accounting: Accounting::SocketCounters,
            ..cfg()
        },
        1024,
    )
}

/// An HTTP-like exchange as the socket counts it: 28 bytes out, 1216 in,
/// the peer's FIN received.
const CLIENT: TcpSockCounters = TcpSockCounters {
    bytes_received: 1217,
    bytes_sent: 28,
    bytes_retrans: 0,
    segs_in: 4,
    segs_out: 5,
    fin_received: true,
};

impl H {
    fn tcp_end(&mut self, t: KernelTime, sock: SockAddr, l: &str, r: &str, c: TcpSockCounters) {
        self.ev(
            t,
            None,
            EventKind::TcpClose {
                sock,
                local: sa(l),
                remote: sa(r),
                counters: c,
            },
        );
    }
}

#[test]
fn close_counters_become_the_flows_counters() {
    let mut h = counting();
    let sk = 0xa000;
    let (l, r) = ("10.0.0.1:40000", "10.0.0.2:80");
    h.create(S, 100, sk, Some(Tcp));
    h.connect(S, 100, sk, l, r);
    h.tcp_end(2 * S, sk, l, r, CLIENT);
    // Final once the released socket's termination wait is over.
    h.close(3 * S, Some(100), sk);
    h.tick(7 * S);
    assert!(h.flows().is_empty());
    h.tick(8 * S);
    let rec = only(h.flows());
    assert_eq!(rec.accounting, Accounting::SocketCounters);
    assert_eq!(rec.direction, FlowDirection::Egress);
    assert!(rec.complete);
    // Payload: the FIN's sequence number is not a byte.
    assert_eq!(counters(&rec), (5, 28, 4, 1216));
    assert_eq!(rec.process.expect("owner").pid, 100);
    assert_eq!(rec.end, wall(2 * S));
    h.tick(100 * S);
    assert!(h.flows().is_empty());
    assert_eq!(h.eng.stats().socket_counted, 1);
}

#[test]
fn retransmitted_payload_counts_once() {
    let mut h = counting();
    let sk = 0xa100;
    let (l, r) = ("10.0.0.1:40001", "10.0.0.2:80");
    h.connect(S, 100, sk, l, r);
    let c = TcpSockCounters {
        bytes_sent: 3000,
        bytes_retrans: 1000,
        fin_received: false,
        bytes_received: 10,
        ..CLIENT
    };
    h.tcp_end(2 * S, sk, l, r, c);
    h.tick(100 * S);
    let rec = only(h.flows());
    assert_eq!((rec.local.bytes, rec.remote.bytes), (2000, 10));
}

#[test]
fn a_silent_open_connection_does_not_end_by_inactivity() {
    let mut h = counting();
    let sk = 0xa200;
    let (l, r) = ("10.0.0.1:40002", "10.0.0.2:5432");
    h.accept(S, 200, sk, l, r);
    // Far beyond the flow and socket inactivity timeouts.
    h.tick(600 * S);
    assert!(h.flows().is_empty(), "still open");
    h.tcp_end(601 * S, sk, l, r, CLIENT);
    h.close(601 * S, Some(200), sk);
    h.tick(700 * S);
    let rec = only(h.flows());
    assert_eq!(rec.direction, FlowDirection::Ingress);
    assert_eq!(rec.accounting, Accounting::SocketCounters);
    assert_eq!(rec.start, wall(S));
}

#[test]
fn a_released_socket_waits_for_its_counters_then_ends_uncounted() {
    let mut h = counting();
    let sk = 0xa300;
    let (l, r) = ("10.0.0.1:40003", "10.0.0.2:80");
    h.connect(S, 100, sk, l, r);
    h.close(2 * S, Some(100), sk);
    // Past the termination timeout, the connection may still be closing.
    h.tick(10 * S);
    assert!(h.flows().is_empty());
    // Past the socket inactivity timeout after the release: given up.
    h.tick(70 * S);
    let rec = only(h.flows());
    assert_eq!(rec.accounting, Accounting::Uncounted);
    assert_eq!(counters(&rec), (0, 0, 0, 0));
    assert_eq!(h.eng.stats().uncounted_flows, 1);
}

#[test]
fn a_connection_whose_open_was_not_seen_gets_a_flow_of_unknown_direction() {
    let mut h = counting();
    let sk = 0xa400;
    let (l, r) = ("10.0.0.1:40004", "10.0.0.2:80");
    h.tcp_end(S, sk, l, r, CLIENT);
    h.tick(100 * S);
    let rec = only(h.flows());
    assert_eq!(rec.direction, FlowDirection::Unknown);
    assert!(!rec.complete);
    assert_eq!(counters(&rec), (5, 28, 4, 1216));
}

#[test]
fn listeners_and_unused_sockets_make_no_flow() {
    let mut h = counting();
    h.tcp_end(S, 0xa500, "0.0.0.0:80", "0.0.0.0:0", CLIENT);
    h.tcp_end(
        S,
        0xa600,
        "10.0.0.1:40005",
        "10.0.0.2:80",
        TcpSockCounters::default(),
    );
    h.tick(100 * S);
    assert!(h.flows().is_empty());
    assert_eq!(h.eng.stats().ignored_events, 2);
}

#[test]
fn udp_flows_stay_per_packet() {
    let mut h = counting();
    let sk = 0xa700;
    let (l, r) = ("10.0.0.1:5000", "10.0.0.2:53");
    h.pkt(S, Some(sk), Udp, Out, (l, r), 60);
    h.close(2 * S, Some(100), sk);
    h.tick(100 * S);
    let rec = only(h.flows());
    assert_eq!(rec.accounting, Accounting::Packets);
    assert_eq!(counters(&rec), (1, 60, 0, 0));
}

#[test]
fn per_packet_accounting_ends_silent_flows_as_before() {
    let mut h = H::new();
    let sk = 0xa800;
    h.accept(S, 200, sk, "10.0.0.1:40006", "10.0.0.2:5432");
    h.tick(600 * S);
    let rec = only(h.flows());
    assert_eq!(rec.accounting, Accounting::Packets);
}
