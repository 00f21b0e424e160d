//! DNS names on flows: claims from port-53 packets, lookups at flow
//! creation and at the first record, process tree, exits, release.

use std::collections::HashMap;
use std::net::IpAddr;

use super::*;
use crate::enrich::dns::{Address, DnsName, DnsResponse, DnsTable, TableLimits};

/// The resolver's client endpoint used by most tests.
const CLIENT: &str = "127.0.0.1:40000";
/// The DNS server.
const SERVER: &str = "127.0.0.53:53";

fn dns_h() -> H {
    H::build(cfg(), 1024, Some(DnsTable::new(TableLimits::default())))
}

fn response(client: &str, name: &str, ips: &[&str]) -> DnsResponse {
    DnsResponse {
        client: sa(client),
        server: sa(SERVER),
        id: 1,
        rcode: 0,
        qtype: 1,
        name: Arc::new(DnsName::new(vec![name.to_string()])),
        addresses: ips
            .iter()
            .map(|ip| Address {
                ip: ip.parse::<IpAddr>().unwrap(),
                ttl: 300,
            })
            .collect(),
        truncated: false,
    }
}

impl H {
    /// `pid` sends a query from `client` on UDP socket `sk` (socket
    /// creation, the send syscall, the egress packet).
    fn query(&mut self, t: KernelTime, pid: u32, sk: SockAddr, client: &str) {
        self.create(t, pid, sk, Some(Udp));
        self.activity(t + 1, pid, sk, Udp, SockOp::Send);
        self.pkt(t + 2, Some(sk), Udp, Out, (client, SERVER), 60);
    }

    fn observe(&mut self, t: KernelTime, r: &DnsResponse) {
        self.eng.observe_dns(t, r);
    }

    /// A TCP connection of `pid` from `local` to `remote`, closed at once.
    fn tcp_flow(&mut self, t: KernelTime, pid: u32, sk: SockAddr, local: &str, remote: &str) {
        self.create(t, pid, sk, Some(Tcp));
        self.connect(t + 1, pid, sk, local, remote);
        self.pkt(t + 2, Some(sk), Tcp, Out, (local, remote), 60);
        self.pkt(t + 3, Some(sk), Tcp, In, (remote, local), 60);
        self.close(t + 4, Some(pid), sk);
    }

    /// The final records emitted so far, by local port (one per port).
    fn finals(&mut self) -> HashMap<u16, FlowRecord> {
        let mut m = HashMap::new();
        for r in self.flows().into_iter().filter(|r| r.is_final) {
            let port = r.local.port;
            assert!(
                m.insert(port, r).is_none(),
                "two final records for port {port}"
            );
        }
        m
    }

    /// The remote domain of the final record of local port `port`.
    fn domain_of(finals: &HashMap<u16, FlowRecord>, port: u16) -> Option<&str> {
        finals
            .get(&port)
            .unwrap_or_else(|| panic!("no final record for port {port}: {finals:#?}"))
            .remote
            .domain
            .as_deref()
    }
}

#[test]
fn resolved_tcp_v4_and_v6_flows_carry_the_name() {
    let mut h = dns_h();
    h.query(S, 100, 0x10, CLIENT);
    h.observe(
        S + MS,
        &response(CLIENT, "web.example", &["192.0.2.7", "2001:db8::7"]),
    );
    h.close(S + 2 * MS, Some(100), 0x10);
    h.tcp_flow(2 * S, 100, 0x20, "192.0.2.1:50000", "192.0.2.7:80");
    h.tcp_flow(2 * S, 100, 0x30, "[2001:db8::1]:50001", "[2001:db8::7]:80");
    h.tick(20 * S);
    let finals = h.finals();
    assert_eq!(H::domain_of(&finals, 50000), Some("web.example"));
    assert_eq!(H::domain_of(&finals, 50001), Some("web.example"));
    assert_eq!(finals[&50001].remote.ip.to_string(), "2001:db8::7");
    assert_eq!(
        finals[&50000].local.domain, None,
        "only the remote side is named"
    );
    let dns = h.eng.dns_stats().expect("table attached");
    assert_eq!(dns.claimed_on_arrival, 1);
    assert_eq!(dns.lookups_process, 2);
}

#[test]
fn response_parked_before_the_claim_is_used() {
    let mut h = dns_h();
    // The capture saw the response before the engine saw the query packet.
    h.observe(S, &response(CLIENT, "early.example", &["192.0.2.8"]));
    h.query(S + MS, 100, 0x10, CLIENT);
    h.tcp_flow(2 * S, 100, 0x20, "192.0.2.1:50000", "192.0.2.8:443");
    h.tick(20 * S);
    assert_eq!(H::domain_of(&h.finals(), 50000), Some("early.example"));
    assert_eq!(h.eng.dns_stats().unwrap().claimed_later, 1);
}

#[test]
fn response_after_the_connect_names_the_first_record() {
    let mut h = dns_h();
    h.query(S, 100, 0x10, CLIENT);
    h.tcp_flow(S + MS, 100, 0x20, "192.0.2.1:50000", "192.0.2.9:80");
    // The response reaches the engine only after the connection's events.
    h.observe(
        S + 2 * MS,
        &response(CLIENT, "late.example", &["192.0.2.9"]),
    );
    h.tick(20 * S);
    assert_eq!(H::domain_of(&h.finals(), 50000), Some("late.example"));
}

#[test]
fn another_process_without_a_query_gets_no_name() {
    let mut h = dns_h();
    h.query(S, 100, 0x10, CLIENT);
    h.observe(S + MS, &response(CLIENT, "web.example", &["192.0.2.7"]));
    h.tcp_flow(2 * S, 200, 0x20, "192.0.2.1:50000", "192.0.2.7:80");
    h.tcp_flow(2 * S, 100, 0x30, "192.0.2.1:50001", "192.0.2.7:80");
    h.tick(20 * S);
    let finals = h.finals();
    assert_eq!(H::domain_of(&finals, 50000), None);
    assert_eq!(H::domain_of(&finals, 50001), Some("web.example"));
    let dns = h.eng.dns_stats().unwrap();
    assert_eq!(
        dns.lookups_host, 2,
        "the host-wide answer exists (found at creation and at the final record) but is not used"
    );
}

#[test]
fn udp_flow_to_a_resolved_address_is_named() {
    let mut h = dns_h();
    h.query(S, 100, 0x10, CLIENT);
    h.observe(S + MS, &response(CLIENT, "udp.example", &["2001:db8::9"]));
    h.create(2 * S, 100, 0x20, Some(Udp));
    h.activity(2 * S + 1, 100, 0x20, Udp, SockOp::Send);
    h.pkt(
        2 * S + 2,
        Some(0x20),
        Udp,
        Out,
        ("[2001:db8::1]:50000", "[2001:db8::9]:9001"),
        100,
    );
    h.tick(100 * S);
    let r = h.finals().remove(&50000).expect("final UDP record");
    assert_eq!(r.transport, Udp);
    assert_eq!(r.remote.domain.as_deref(), Some("udp.example"));
}

#[test]
fn child_inherits_answers_and_exit_drops_them_after_the_grace() {
    let mut h = dns_h();
    h.query(S, 100, 0x10, CLIENT);
    h.observe(S + MS, &response(CLIENT, "web.example", &["192.0.2.7"]));
    h.ev(
        2 * S,
        Some(100),
        EventKind::Fork {
            parent: 100,
            child: 300,
        },
    );
    h.tcp_flow(3 * S, 300, 0x20, "192.0.2.1:50000", "192.0.2.7:80");
    h.ev(4 * S, Some(100), EventKind::Exit { tid: 100, pid: 100 });
    // Within the grace period the exited process's answers still name its
    // flows (a flow created now, e.g. from a late packet, included).
    let grace_end = 4 * S + ns(cfg().flow_termination_timeout) + ns(DNS_EXIT_SLACK);
    h.tick(grace_end - MS);
    h.tcp_flow(grace_end - MS, 100, 0x30, "192.0.2.1:50001", "192.0.2.7:80");
    h.tick(20 * S);
    let finals = h.finals();
    assert_eq!(
        H::domain_of(&finals, 50000),
        Some("web.example"),
        "inherited by the child"
    );
    assert_eq!(
        H::domain_of(&finals, 50001),
        Some("web.example"),
        "kept during the grace period"
    );
    // Past the grace period pid 100's answers are gone.
    h.tcp_flow(21 * S, 100, 0x40, "192.0.2.1:50002", "192.0.2.7:80");
    h.tick(40 * S);
    assert_eq!(H::domain_of(&h.finals(), 50002), None);
}

#[test]
fn pid_reused_by_a_fork_does_not_inherit_the_old_answers() {
    let mut h = dns_h();
    h.query(S, 100, 0x10, CLIENT);
    h.observe(S + MS, &response(CLIENT, "web.example", &["192.0.2.7"]));
    h.ev(2 * S, Some(100), EventKind::Exit { tid: 100, pid: 100 });
    // Still within the grace period, pid 100 is reused by a child of 1.
    h.ev(
        3 * S,
        Some(1),
        EventKind::Fork {
            parent: 1,
            child: 100,
        },
    );
    h.tcp_flow(3 * S + MS, 100, 0x20, "192.0.2.1:50000", "192.0.2.7:80");
    h.tick(30 * S);
    assert_eq!(H::domain_of(&h.finals(), 50000), None);
}

#[test]
fn thread_exit_keeps_the_process_answers() {
    let mut h = dns_h();
    h.query(S, 100, 0x10, CLIENT);
    h.observe(S + MS, &response(CLIENT, "web.example", &["192.0.2.7"]));
    // A thread 101 of process 100 is created and exits.
    h.ev(
        2 * S,
        Some(100),
        EventKind::Fork {
            parent: 100,
            child: 101,
        },
    );
    h.ev(3 * S, Some(100), EventKind::Exit { tid: 101, pid: 100 });
    h.tcp_flow(4 * S, 100, 0x20, "192.0.2.1:50000", "192.0.2.7:80");
    h.tick(30 * S);
    assert_eq!(H::domain_of(&h.finals(), 50000), Some("web.example"));
    assert_eq!(
        h.eng.dns_stats().unwrap().processes,
        1,
        "the thread's copy went with it"
    );
}

#[test]
fn ended_socket_releases_its_claim() {
    let mut h = dns_h();
    h.query(S, 100, 0x10, CLIENT);
    h.close(S + MS, Some(100), 0x10);
    // The socket ends after the termination timeout.
    h.tick(10 * S);
    assert_eq!(h.eng.dns_stats().unwrap().claims, 0);
    // A response to the same endpoint now is not pid 100's.
    h.observe(11 * S, &response(CLIENT, "web.example", &["192.0.2.7"]));
    h.tcp_flow(11 * S + MS, 100, 0x20, "192.0.2.1:50000", "192.0.2.7:80");
    h.tick(30 * S);
    assert_eq!(H::domain_of(&h.finals(), 50000), None);
}

#[test]
fn response_to_a_closed_but_not_ended_socket_is_still_attributed() {
    let mut h = dns_h();
    h.query(S, 100, 0x10, CLIENT);
    h.close(S + MS, Some(100), 0x10);
    h.observe(S + 2 * MS, &response(CLIENT, "web.example", &["192.0.2.7"]));
    h.tcp_flow(S + 3 * MS, 100, 0x20, "192.0.2.1:50000", "192.0.2.7:80");
    h.tick(30 * S);
    assert_eq!(H::domain_of(&h.finals(), 50000), Some("web.example"));
}

#[test]
fn without_a_table_nothing_is_named() {
    let mut h = H::new();
    h.query(S, 100, 0x10, CLIENT);
    h.observe(S + MS, &response(CLIENT, "web.example", &["192.0.2.7"]));
    h.tcp_flow(2 * S, 100, 0x20, "192.0.2.1:50000", "192.0.2.7:80");
    h.tick(30 * S);
    assert_eq!(H::domain_of(&h.finals(), 50000), None);
    assert!(h.eng.dns_stats().is_none());
}

#[test]
fn name_is_kept_on_interim_and_final_records() {
    let mut h = dns_h();
    h.query(S, 100, 0x10, CLIENT);
    h.observe(S + MS, &response(CLIENT, "long.example", &["192.0.2.7"]));
    let (local, remote) = ("192.0.2.1:50000", "192.0.2.7:80");
    h.create(2 * S, 100, 0x20, Some(Tcp));
    h.connect(2 * S + 1, 100, 0x20, local, remote);
    // Traffic every second for 25 s: interim records every 10 s.
    for i in 0..25 {
        h.pkt(3 * S + i * S, Some(0x20), Tcp, Out, (local, remote), 100);
        if i == 2 {
            // The process's answers go meanwhile; the flow keeps its name.
            h.ev(5 * S + 2, Some(100), EventKind::Exit { tid: 100, pid: 100 });
        }
        h.tick(3 * S + i * S + 3);
    }
    assert_eq!(h.eng.dns_stats().unwrap().processes, 0);
    h.close(28 * S, Some(100), 0x20);
    h.tick(60 * S);
    let v: Vec<FlowRecord> = h
        .flows()
        .into_iter()
        .filter(|r| r.local.port == 50000)
        .collect();
    assert!(v.len() >= 3, "interim records and a final: {v:#?}");
    assert!(v.last().unwrap().is_final);
    for r in &v {
        assert_eq!(r.remote.domain.as_deref(), Some("long.example"));
    }
}
