//! Flows of what existed before the daemon started: owners and directions
//! from the start-up socket snapshot.

use super::*;
use crate::enrich::sockets::{SnapSocket, SocketSnapshot, TCP_ESTABLISHED, TCP_LISTEN};
use crate::model::{TCP_ACK, TCP_SYN};

fn snap(socks: &[(&str, &str, u8, Option<u32>)]) -> SocketSnapshot {
    SocketSnapshot {
        sockets: socks
            .iter()
            .map(|&(l, r, state, pid)| SnapSocket {
                local: sa(l),
                remote: sa(r),
                state,
                inode: 1,
                pid,
            })
            .collect(),
        stats: Default::default(),
    }
}

/// A database listener (pid 200) with an established connection from a
/// local client (pid 100), both open before the start.
fn seeded() -> H {
    let mut h = H::new();
    h.eng.seed_sockets(&snap(&[
        ("0.0.0.0:5432", "0.0.0.0:0", TCP_LISTEN, Some(200)),
        (
            "127.0.0.1:5432",
            "127.0.0.1:40000",
            TCP_ESTABLISHED,
            Some(200),
        ),
        (
            "127.0.0.1:40000",
            "127.0.0.1:5432",
            TCP_ESTABLISHED,
            Some(100),
        ),
    ]));
    h
}

#[test]
fn an_established_connection_gets_its_owners_and_directions() {
    let mut h = seeded();
    let (cli, srv) = ("127.0.0.1:40000", "127.0.0.1:5432");
    let (csk, ssk) = (0xd000, 0xd100);
    // Used after the start: a query and its answer, nothing else seen.
    h.seg(S, Some(csk), Out, (cli, srv), 100, TCP_ACK);
    h.seg(S, None, In, (cli, srv), 100, TCP_ACK);
    h.seg(S + MS, Some(ssk), Out, (srv, cli), 300, TCP_ACK);
    h.seg(S + MS, None, In, (srv, cli), 300, TCP_ACK);
    h.tick(100 * S);
    let mut v = h.flows();
    v.sort_by_key(|r| r.local.port);
    assert_eq!(v.len(), 2, "{v:#?}");
    let (server, client) = (&v[0], &v[1]);
    assert_eq!(server.local.port, 5432);
    assert_eq!(server.direction, FlowDirection::Ingress);
    assert_eq!(server.process.as_ref().expect("owner").pid, 200);
    assert_eq!(client.direction, FlowDirection::Egress);
    assert_eq!(client.process.as_ref().expect("owner").pid, 100);
    for r in &v {
        assert!(!r.complete, "the start was not seen");
    }
    assert_eq!(counters(client), (1, 100, 1, 300));
    assert_eq!(h.eng.stats().seeded_owners, 2);
}

#[test]
fn a_send_gives_the_owner_and_the_snapshot_still_gives_the_direction() {
    let mut h = seeded();
    let (cli, srv) = ("127.0.0.1:40000", "127.0.0.1:5432");
    let csk = 0xd000;
    h.activity(S, 100, csk, Tcp, SockOp::Send);
    h.seg(S, Some(csk), Out, (cli, srv), 100, TCP_ACK);
    h.tick(100 * S);
    let r = only(h.flows());
    assert_eq!(r.direction, FlowDirection::Egress);
    assert_eq!(r.process.expect("owner").pid, 100);
    assert!(!r.complete);
}

#[test]
fn a_connection_accepted_by_a_blocked_accept_gets_the_listeners_owner() {
    let mut h = seeded();
    let (cli, srv) = ("10.0.0.2:41000", "10.0.0.1:5432");
    let (request, child) = (0xb000, 0xc000);
    h.seg(S, None, In, (cli, srv), 60, TCP_SYN);
    h.seg(
        S + MS,
        Some(request),
        Out,
        (srv, cli),
        60,
        TCP_SYN | TCP_ACK,
    );
    h.seg(S + 2 * MS, None, In, (cli, srv), 52, TCP_ACK);
    h.seg(S + 3 * MS, None, In, (cli, srv), 200, TCP_ACK);
    // Its accept returned unreported; the server answers on the socket.
    h.seg(S + 4 * MS, Some(child), Out, (srv, cli), 500, TCP_ACK);
    h.close(2 * S, Some(200), child);
    h.tick(100 * S);
    let r = only(h.flows());
    assert_eq!(r.direction, FlowDirection::Ingress);
    assert!(r.complete, "the SYN was counted");
    assert_eq!(r.process.expect("owner").pid, 200);
}

#[test]
fn an_outbound_connection_on_a_listeners_port_is_not_the_listeners() {
    let mut h = seeded();
    let sk = 0xe000;
    // Our SYN from local port 5432 (SO_REUSEADDR): we initiated.
    let (l, r) = ("10.0.0.1:5432", "10.0.0.9:80");
    h.seg(S, Some(sk), Out, (l, r), 60, TCP_SYN);
    h.tick(100 * S);
    let r = only(h.flows());
    assert!(r.process.is_none(), "{r:?}");
}

#[test]
fn without_a_snapshot_nothing_is_guessed() {
    let mut h = H::new();
    let (cli, srv) = ("127.0.0.1:40000", "127.0.0.1:5432");
    h.seg(S, Some(0xd000), Out, (cli, srv), 100, TCP_ACK);
    h.tick(100 * S);
    let r = only(h.flows());
    assert!(r.process.is_none());
    assert_eq!(r.direction, FlowDirection::Unknown);
}

#[test]
fn a_forking_servers_child_takes_the_connection_its_blocked_accept_returned() {
    let mut h = seeded();
    let (cli, srv) = ("10.0.0.2:41000", "10.0.0.1:5432");
    let (request, conn) = (0xb000, 0xc000);
    h.seg(S, None, In, (cli, srv), 60, TCP_SYN);
    h.seg(
        S + MS,
        Some(request),
        Out,
        (srv, cli),
        60,
        TCP_SYN | TCP_ACK,
    );
    h.seg(S + 2 * MS, None, In, (cli, srv), 52, TCP_ACK);
    // The request, on the accepted socket, whose accept returned
    // unreported: the socket is not known yet, the packet waits with the
    // handshake.
    h.seg(S + 3 * MS, Some(conn), In, (cli, srv), 200, TCP_ACK);
    // The server forks a child for the connection; the child answers,
    // closes and exits.
    h.ev(
        S + 4 * MS,
        Some(200),
        EventKind::Fork {
            parent: 200,
            child: 201,
        },
    );
    h.activity(S + 5 * MS, 201, conn, Tcp, SockOp::Send);
    h.seg(S + 5 * MS, Some(conn), Out, (srv, cli), 500, TCP_ACK);
    h.close(S + 6 * MS, Some(201), conn);
    h.ev(S + 7 * MS, None, EventKind::Exit { tid: 201, pid: 201 });
    h.tick(100 * S);
    let r = only(h.flows());
    assert_eq!(r.direction, FlowDirection::Ingress);
    assert!(r.complete, "the SYN was counted");
    let p = r.process.as_ref().expect("owner");
    assert_eq!((p.pid, p.ppid, p.name.as_str()), (201, 200, "nginx"));
    assert_eq!(counters(&r), (2, 560, 3, 312));
    // The child's send made the socket known: the flow starts as the
    // child's, neither the listener's owner nor a hand-over is needed.
    assert_eq!(h.eng.stats().seeded_owners, 0);
    assert_eq!(h.eng.stats().handed_to_children, 0);
}
