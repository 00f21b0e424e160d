//! Direction from the observed handshake: event sequences with the connect
//! or accept event removed (an accept already blocked when the probes were
//! installed, a dropped probe hit, a ring loss).

use super::*;
use crate::model::{TCP_ACK, TCP_SYN};

const SYN: u8 = TCP_SYN;
const SYN_ACK: u8 = TCP_SYN | TCP_ACK;
const ACK: u8 = TCP_ACK;

/// A server whose accept returned before the daemon saw it: the handshake
/// (on the listener's request socket), then the accepted socket's data.
fn accepted_unseen(h: &mut H, with_syn: bool) -> SockAddr {
    let request = 0xb000;
    let child = 0xc000;
    let (srv, cli) = ("10.0.0.1:8080", "10.0.0.2:41000");
    if with_syn {
        h.seg(S, None, In, (cli, srv), 60, SYN);
    }
    h.seg(S + MS, Some(request), Out, (srv, cli), 60, SYN_ACK);
    h.seg(S + 2 * MS, None, In, (cli, srv), 52, ACK);
    h.seg(S + 3 * MS, None, In, (cli, srv), 200, ACK);
    // The server reads and answers on the accepted socket.
    h.activity(S + 4 * MS, 200, child, Tcp, SockOp::Recv);
    h.seg(S + 5 * MS, Some(child), Out, (srv, cli), 1500, ACK);
    h.close(2 * S, Some(200), child);
    h.tick(10 * S);
    child
}

#[test]
fn accept_unseen_with_the_syn_is_ingress_and_complete() {
    let mut h = H::new();
    let child = accepted_unseen(&mut h, true);
    let r = only(h.flows());
    assert_eq!(r.sock, child);
    assert_eq!(r.direction, FlowDirection::Ingress);
    assert!(r.complete, "the opening SYN was counted");
    assert_eq!(counters(&r), (2, 1560, 3, 312));
    assert_eq!(r.start, wall(S), "start is the SYN");
    assert_eq!(r.process.expect("owner").pid, 200);
}

#[test]
fn accept_unseen_with_only_the_syn_ack_is_ingress_but_incomplete() {
    let mut h = H::new();
    accepted_unseen(&mut h, false);
    let r = only(h.flows());
    assert_eq!(r.direction, FlowDirection::Ingress);
    assert!(!r.complete, "the start was not seen");
}

#[test]
fn connect_unseen_with_the_syn_is_egress_and_complete() {
    let mut h = H::new();
    let sk = 0xc100;
    let (l, r) = ("10.0.0.1:1000", "10.0.0.2:80");
    h.create(S, 100, sk, Some(Tcp));
    // TcpConnect was lost: the SYN carries the socket, the rest follows.
    h.seg(S + MS, Some(sk), Out, (l, r), 60, SYN);
    h.seg(S + 2 * MS, None, In, (r, l), 60, SYN_ACK);
    h.seg(S + 3 * MS, Some(sk), Out, (l, r), 52, ACK);
    h.activity(S + 4 * MS, 100, sk, Tcp, SockOp::Send);
    h.seg(S + 5 * MS, Some(sk), Out, (l, r), 300, ACK);
    h.seg(S + 6 * MS, None, In, (r, l), 900, ACK);
    h.close(2 * S, Some(100), sk);
    h.tick(10 * S);
    let rec = only(h.flows());
    assert_eq!(rec.direction, FlowDirection::Egress);
    assert!(rec.complete);
    assert_eq!(counters(&rec), (3, 412, 2, 960));
    assert_eq!(rec.process.expect("owner").pid, 100);
}

#[test]
fn a_handshake_never_overrides_the_direction_of_connect_or_accept() {
    // A simultaneous open is the one case where both ends send a SYN
    // without ACK; the syscall the socket was seen in still decides.
    let mut h = H::new();
    let sk = 0xc200;
    let (l, r) = ("10.0.0.1:1001", "10.0.0.2:81");
    h.seg(S, None, In, (r, l), 60, SYN);
    h.create(S + MS, 100, sk, Some(Tcp));
    h.connect(S + 2 * MS, 100, sk, l, r);
    h.close(2 * S, Some(100), sk);
    h.tick(10 * S);
    let rec = only(h.flows());
    assert_eq!(rec.direction, FlowDirection::Egress);
}

#[test]
fn without_flags_or_syn_the_direction_stays_unknown() {
    let mut h = H::new();
    let sk = 0xc300;
    let (l, r) = ("10.0.0.1:1002", "10.0.0.2:82");
    h.create(S, 100, sk, Some(Tcp));
    h.activity(S + MS, 100, sk, Tcp, SockOp::Send);
    h.seg(S + 2 * MS, Some(sk), Out, (l, r), 100, ACK);
    h.pkt(S + 3 * MS, None, Tcp, In, (r, l), 200);
    h.close(2 * S, None, sk);
    h.tick(10 * S);
    let rec = only(h.flows());
    assert_eq!(rec.direction, FlowDirection::Unknown);
    assert!(!rec.complete);
}
