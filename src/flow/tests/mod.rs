//! Event sequences → expected flow records.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::*;
use crate::enrich::process::{FakeProcSource, ProcSnapshot, ProcessTable, ProcessTableConfig};
use crate::enrich::users::UserDb;
use crate::model::{
    Creds, Event, EventKind, FlowDirection, FlowRecord, KernelTime, Loss, LossSource, Output,
    Packet, PacketDir, SockAddr, SockOp, Task, Transport,
};

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const BASE: Duration = Duration::from_secs(1_700_000_000);
const OWN_PID: u32 = 4242;
const OWN_PORT: u16 = 50051;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn wall(t: KernelTime) -> SystemTime {
    UNIX_EPOCH + BASE + Duration::from_nanos(t)
}

struct H {
    eng: Engine<OffsetClock>,
    out: Vec<Output>,
    src: FakeProcSource,
}

fn cfg() -> EngineConfig {
    EngineConfig {
        flow_inactive_timeout: Duration::from_secs(30),
        flow_termination_timeout: Duration::from_secs(5),
        socket_inactive_timeout: Duration::from_secs(60),
        flow_update_interval: Duration::from_secs(10),
        max_sockets: 1024,
        max_flows: 1024,
        max_embryonic: 64,
        max_parked_udp: 64,
        include_self: false,
        own_tcp_ports: vec![OWN_PORT],
        own_pid: OWN_PID,
    }
}

fn proc_snap(pid: u32, name: &str) -> ProcSnapshot {
    ProcSnapshot {
        pid,
        ppid: 1,
        name: name.to_string(),
        args: vec![name.to_string()],
        exe: format!("/usr/bin/{name}"),
        start: Some(UNIX_EPOCH + Duration::from_secs(1_000 + u64::from(pid))),
        creds: Some(Creds {
            uid: 1000,
            gid: 1000,
            euid: 1000,
            egid: 1000,
        }),
        cgroup: None,
    }
}

impl H {
    fn with(cfg: EngineConfig, max_processes: usize) -> H {
        H::build(cfg, max_processes, None)
    }

    fn build(
        cfg: EngineConfig,
        max_processes: usize,
        dns: Option<crate::enrich::dns::DnsTable>,
    ) -> H {
        let src = FakeProcSource::default();
        for (pid, name) in [
            (100, "curl"),
            (200, "nginx"),
            (300, "dig"),
            (OWN_PID, "sockscope"),
        ] {
            src.set(proc_snap(pid, name));
        }
        let mut procs = ProcessTable::new(
            Box::new(src.clone()),
            UserDb::empty(),
            ProcessTableConfig {
                max_processes,
                exit_grace: Duration::from_secs(5),
            },
        );
        procs.scan().unwrap();
        let mut eng = Engine::new(
            cfg,
            OffsetClock {
                base: UNIX_EPOCH + BASE,
            },
            procs,
        );
        if let Some(table) = dns {
            eng = eng.with_dns(table);
        }
        H {
            eng,
            out: Vec::new(),
            src,
        }
    }

    fn new() -> H {
        H::with(cfg(), 1024)
    }

    fn ev(&mut self, t: KernelTime, pid: Option<u32>, kind: EventKind) {
        let ev = Event {
            time: t,
            cpu: 0,
            task: pid.map(|pid| Task { pid, tid: pid }),
            kind,
        };
        self.eng.handle(&ev, &mut self.out);
    }

    fn create(&mut self, t: KernelTime, pid: u32, sock: SockAddr, tr: Option<Transport>) {
        self.ev(
            t,
            Some(pid),
            EventKind::SockCreate {
                sock,
                transport: tr,
            },
        );
    }

    fn connect(&mut self, t: KernelTime, pid: u32, sock: SockAddr, l: &str, r: &str) {
        self.ev(
            t,
            Some(pid),
            EventKind::TcpConnect {
                sock,
                local: sa(l),
                remote: sa(r),
            },
        );
    }

    fn accept(&mut self, t: KernelTime, pid: u32, sock: SockAddr, l: &str, r: &str) {
        self.ev(
            t,
            Some(pid),
            EventKind::TcpAccept {
                sock,
                local: sa(l),
                remote: sa(r),
            },
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn pkt(
        &mut self,
        t: KernelTime,
        sock: Option<SockAddr>,
        tr: Transport,
        dir: PacketDir,
        src: &str,
        dst: &str,
        len: u32,
    ) {
        self.ev(
            t,
            None,
            EventKind::Packet(Packet {
                sock,
                dir,
                transport: tr,
                src: sa(src),
                dst: sa(dst),
                ip_len: len,
            }),
        );
    }

    fn close(&mut self, t: KernelTime, pid: Option<u32>, sock: SockAddr) {
        self.ev(t, pid, EventKind::SockClose { sock });
    }

    fn activity(&mut self, t: KernelTime, pid: u32, sock: SockAddr, tr: Transport, op: SockOp) {
        self.ev(
            t,
            Some(pid),
            EventKind::SockActivity {
                sock,
                transport: tr,
                op,
                peer: None,
            },
        );
    }

    fn tick(&mut self, t: KernelTime) {
        self.eng.tick(t, &mut self.out);
    }

    fn flows(&mut self) -> Vec<FlowRecord> {
        let mut v = Vec::new();
        self.out.retain(|o| match o {
            Output::Flow(f) => {
                v.push((**f).clone());
                false
            }
            Output::Loss(_) => true,
        });
        v
    }

    fn losses(&mut self) -> Vec<Loss> {
        let mut v = Vec::new();
        self.out.retain(|o| match o {
            Output::Loss(l) => {
                v.push(l.clone());
                false
            }
            Output::Flow(_) => true,
        });
        v
    }
}

fn only(mut v: Vec<FlowRecord>) -> FlowRecord {
    assert_eq!(v.len(), 1, "expected exactly one record: {v:#?}");
    v.remove(0)
}

fn counters(r: &FlowRecord) -> (u64, u64, u64, u64) {
    (
        r.local.packets,
        r.local.bytes,
        r.remote.packets,
        r.remote.bytes,
    )
}

use PacketDir::{Egress as Out, Ingress as In};
use Transport::{Tcp, Udp};

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
        "10.0.2.15:40192",
        "151.101.66.217:80",
        60,
    );
    h.pkt(
        S + 30 * MS,
        Some(sk),
        Tcp,
        In,
        "151.101.66.217:80",
        "10.0.2.15:40192",
        60,
    );
    h.pkt(
        S + 31 * MS,
        None,
        Tcp,
        Out,
        "10.0.2.15:40192",
        "151.101.66.217:80",
        52,
    );
    h.pkt(
        S + 32 * MS,
        None,
        Tcp,
        Out,
        "10.0.2.15:40192",
        "151.101.66.217:80",
        182,
    );
    h.pkt(
        S + 60 * MS,
        None,
        Tcp,
        In,
        "151.101.66.217:80",
        "10.0.2.15:40192",
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
    h.pkt(2 * S, Some(listener), Tcp, In, cli, srv, 80);
    h.pkt(2 * S + MS, Some(request), Tcp, Out, srv, cli, 80);
    h.pkt(2 * S + 2 * MS, None, Tcp, In, cli, srv, 72);
    assert_eq!(h.eng.stats().embryonic, 1);
    h.accept(2 * S + 5 * MS, 200, child, srv, cli);
    assert_eq!(h.eng.stats().embryonic, 0);
    h.pkt(2 * S + 6 * MS, Some(child), Tcp, In, cli, srv, 500);
    h.pkt(2 * S + 7 * MS, Some(child), Tcp, Out, srv, cli, 1500);
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
fn loopback_pair_gives_two_flows_each_with_its_process() {
    let mut h = H::new();
    let (cs, ls, asock) = (0x1000, 0x2000, 0x3000);
    let (c, s) = ("127.0.0.1:41000", "127.0.0.1:8080");
    h.create(S, 200, ls, Some(Tcp));
    h.create(S, 100, cs, Some(Tcp));
    h.connect(S + MS, 100, cs, c, s);
    // Every loopback packet is seen leaving one socket and entering the other.
    h.pkt(S + 2 * MS, Some(cs), Tcp, Out, c, s, 60); // SYN
    h.pkt(S + 2 * MS, Some(ls), Tcp, In, c, s, 60);
    h.pkt(S + 3 * MS, Some(0x4000), Tcp, Out, s, c, 60); // SYN-ACK, request sock
    h.pkt(S + 3 * MS, Some(cs), Tcp, In, s, c, 60);
    h.pkt(S + 4 * MS, Some(cs), Tcp, Out, c, s, 52); // ACK
    h.pkt(S + 4 * MS, None, Tcp, In, c, s, 52);
    h.accept(S + 5 * MS, 200, asock, s, c);
    h.pkt(S + 6 * MS, Some(cs), Tcp, Out, c, s, 100);
    h.pkt(S + 6 * MS, Some(asock), Tcp, In, c, s, 100);
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
fn udp_unconnected_socket_has_one_flow_per_peer() {
    let mut h = H::new();
    let sk = 0x5000;
    h.create(S, 300, sk, Some(Udp));
    h.pkt(
        S + MS,
        Some(sk),
        Udp,
        Out,
        "10.0.0.1:5353",
        "10.0.0.53:53",
        70,
    );
    h.pkt(
        S + 2 * MS,
        Some(sk),
        Udp,
        Out,
        "10.0.0.1:5353",
        "8.8.8.8:53",
        71,
    );
    h.pkt(
        S + 3 * MS,
        Some(sk),
        Udp,
        In,
        "10.0.0.53:53",
        "10.0.0.1:5353",
        120,
    );
    h.pkt(
        S + 4 * MS,
        Some(sk),
        Udp,
        In,
        "9.9.9.9:53",
        "10.0.0.1:5353",
        130,
    );
    h.pkt(
        S + 5 * MS,
        Some(sk),
        Udp,
        Out,
        "10.0.0.1:5353",
        "10.0.0.53:53",
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
        "10.0.0.9:4000",
        "10.0.0.1:53",
        100,
    );
    // Same local endpoint, no sock.
    h.pkt(
        S + 2 * MS,
        None,
        Udp,
        In,
        "10.0.0.9:4000",
        "10.0.0.1:53",
        100,
    );
    // Another local address of a wildcard-bound socket: by port.
    h.pkt(
        S + 3 * MS,
        None,
        Udp,
        In,
        "10.0.0.7:4001",
        "192.168.1.1:53",
        90,
    );
    // Nothing listens on 54.
    h.pkt(
        S + 4 * MS,
        None,
        Udp,
        In,
        "10.0.0.7:4001",
        "192.168.1.1:54",
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
        "10.0.0.1:1000",
        "10.0.0.2:80",
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
        "10.0.0.3:2000",
        "10.0.0.1:80",
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
fn late_packets_count_within_termination_timeout_only() {
    let mut h = H::new();
    let sk = 0x8000;
    let (l, r) = ("10.0.0.1:1000", "10.0.0.2:80");
    h.create(S, 100, sk, Some(Tcp));
    h.connect(S, 100, sk, l, r);
    h.pkt(S + MS, Some(sk), Tcp, Out, l, r, 60);
    h.close(2 * S, Some(100), sk);
    h.pkt(2 * S + 100 * MS, None, Tcp, In, r, l, 40); // late FIN-ACK, counted
    h.tick(6 * S);
    assert!(h.flows().is_empty());
    h.tick(7 * S);
    let rec = only(h.flows());
    assert_eq!(counters(&rec), (1, 60, 1, 40));
    assert_eq!(rec.end, wall(2 * S + 100 * MS));
    // After the termination timeout: not part of the finished flow.
    h.pkt(8 * S, Some(sk), Tcp, In, r, l, 40);
    assert_eq!(h.eng.stats().embryonic, 1);
    h.tick(14 * S);
    assert!(h.flows().is_empty());
    h.tick(38 * S);
    // Like the reference implementation, a packet that late shows up as
    // a separate, incomplete flow of the (no longer tracked) socket.
    let extra = only(h.flows());
    assert_ne!(extra.id, rec.id);
    assert!(!extra.complete);
    assert_eq!(extra.direction, FlowDirection::Unknown);
    assert!(extra.is_final);
    assert_eq!(counters(&extra), (0, 0, 1, 40));
}

#[test]
fn inactive_flow_becomes_final_after_timeout_exactly() {
    let mut h = H::new();
    let sk = 0x9000;
    h.create(S, 100, sk, Some(Udp));
    h.pkt(
        2 * S,
        Some(sk),
        Udp,
        Out,
        "10.0.0.1:5000",
        "10.0.0.2:6000",
        50,
    );
    h.tick(2 * S + 30 * S - 1);
    assert!(h.flows().is_empty());
    h.tick(2 * S + 30 * S);
    let r = only(h.flows());
    assert!(r.is_final);
    assert_eq!(counters(&r), (1, 50, 0, 0));
    // The socket outlives its flow; a new packet starts a new flow.
    h.pkt(
        40 * S,
        Some(sk),
        Udp,
        Out,
        "10.0.0.1:5000",
        "10.0.0.2:6000",
        50,
    );
    h.tick(80 * S);
    let r2 = only(h.flows());
    assert_ne!(r2.id, r.id);
}

#[test]
fn interim_updates_are_cumulative_and_share_the_id() {
    let mut h = H::new();
    let sk = 0xa100;
    let (l, r) = ("10.0.0.1:1000", "10.0.0.2:80");
    h.create(0, 100, sk, Some(Tcp));
    h.connect(0, 100, sk, l, r);
    for i in 0..25u64 {
        h.pkt(i * S, Some(sk), Tcp, Out, l, r, 100);
        h.tick(i * S);
    }
    let v = h.flows();
    assert_eq!(v.len(), 2, "interim at 10 s and 20 s: {v:#?}");
    assert!(v.iter().all(|r| !r.is_final && r.id == v[0].id));
    assert_eq!(v[0].local.packets, 11);
    assert_eq!(v[1].local.packets, 21);
    // Active during 20..30 s: one more interim record.
    h.tick(30 * S);
    assert_eq!(only(h.flows()).local.packets, 25);
    // Idle: no interim record without change, then the final one.
    h.tick(40 * S);
    assert!(h.flows().is_empty());
    h.tick(24 * S + 30 * S);
    let fin = only(h.flows());
    assert!(fin.is_final);
    assert_eq!(fin.id, v[0].id);
    assert_eq!(fin.local.packets, 25);
    assert_eq!(h.eng.stats().interim_records, 3);
}

#[test]
fn idle_socket_is_dropped_after_socket_inactive_timeout() {
    let mut h = H::new();
    h.create(S, 100, 0xb100, Some(Udp));
    h.create(S, 100, 0xb200, Some(Udp));
    h.pkt(
        50 * S,
        Some(0xb200),
        Udp,
        Out,
        "10.0.0.1:1",
        "10.0.0.2:2",
        30,
    );
    h.tick(61 * S);
    let st = h.eng.stats();
    assert_eq!((st.sockets, st.sockets_expired), (1, 1));
    // The active one lives on until its flow and itself go idle.
    h.tick(80 * S);
    assert_eq!(only(h.flows()).local.packets, 1);
    assert_eq!(h.eng.stats().sockets, 1);
    h.tick(110 * S);
    assert_eq!(h.eng.stats().sockets, 0);
}

#[test]
fn lost_connect_gives_unknown_incomplete_flow_with_owner() {
    let mut h = H::new();
    let sk = 0xc100;
    let (l, r) = ("10.0.0.1:1000", "10.0.0.2:80");
    h.create(S, 100, sk, Some(Tcp));
    // TcpConnect was lost.
    h.activity(S + MS, 100, sk, Tcp, SockOp::Send);
    h.pkt(S + 2 * MS, Some(sk), Tcp, Out, l, r, 100);
    h.pkt(S + 3 * MS, Some(sk), Tcp, In, r, l, 200);
    h.pkt(S + 4 * MS, None, Tcp, In, r, l, 200);
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
    h.pkt(S, Some(0xd100), Tcp, In, r, l, 1000);
    h.pkt(S + MS, Some(0xd100), Tcp, Out, l, r, 52);
    h.pkt(
        S + 2 * MS,
        Some(0xd200),
        Udp,
        Out,
        "10.0.0.1:3000",
        "10.0.0.3:3000",
        40,
    );
    assert_eq!(
        h.eng.stats().flows,
        1,
        "UDP immediately, TCP after the embryonic wait"
    );
    h.tick(6 * S);
    assert_eq!(h.eng.stats().embryonic_promoted, 1);
    h.pkt(7 * S, Some(0xd100), Tcp, In, r, l, 1000);
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
        "10.0.0.9:5000",
        "10.0.0.1:80",
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
        h.pkt(S, None, Tcp, In, &src, "10.0.0.1:80", 60);
    }
    let st = h.eng.stats();
    assert_eq!((st.embryonic, st.embryonic_dropped), (2, 3));
}

#[test]
fn full_flow_table_evicts_with_final_record_and_loss() {
    let mut c = cfg();
    c.max_flows = 2;
    let mut h = H::with(c, 1024);
    let sk = 0xf100;
    h.create(S, 300, sk, Some(Udp));
    h.pkt(S, Some(sk), Udp, Out, "10.0.0.1:1", "10.0.0.2:1", 10);
    h.pkt(2 * S, Some(sk), Udp, Out, "10.0.0.1:1", "10.0.0.3:1", 10);
    h.pkt(3 * S, Some(sk), Udp, Out, "10.0.0.1:1", "10.0.0.2:1", 10); // keeps .2 active
    h.pkt(4 * S, Some(sk), Udp, Out, "10.0.0.1:1", "10.0.0.4:1", 10);
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
    h.pkt(S, Some(0x1), Udp, Out, "10.0.0.1:1", "10.0.0.2:1", 10);
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
fn own_traffic_is_excluded_unless_included() {
    for include in [false, true] {
        let mut c = cfg();
        c.include_self = include;
        let mut h = H::with(c, 1024);
        h.create(S, OWN_PID, 0x1, Some(Udp));
        h.pkt(S, Some(0x1), Udp, Out, "127.0.0.1:1", "127.0.0.1:2", 10);
        h.create(S, 100, 0x2, Some(Udp));
        h.pkt(S, Some(0x2), Udp, Out, "127.0.0.1:3", "127.0.0.1:4", 10);
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
        }),
    );
    // Another process sends on the socket (e.g. after fd passing).
    h.activity(2 * S, 100, sk, Udp, SockOp::Send);
    h.pkt(2 * S, Some(sk), Udp, Out, "10.0.0.1:999", "10.0.0.2:53", 50);
    h.pkt(2 * S, Some(sk), Udp, Out, "10.0.0.1:999", "10.0.0.5:53", 50);
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
fn socket_without_owner_gets_one_from_later_syscall_event() {
    let mut h = H::new();
    let sk = 0x2200;
    h.pkt(S, Some(sk), Udp, Out, "10.0.0.1:999", "10.0.0.2:53", 50);
    h.activity(S + MS, 300, sk, Udp, SockOp::Recv);
    h.tick(100 * S);
    assert_eq!(only(h.flows()).process.unwrap().pid, 300);
}

#[test]
fn pid_reuse_never_mislabels() {
    let mut h = H::new();
    h.create(S, 100, 0x1, Some(Udp));
    h.pkt(S, Some(0x1), Udp, Out, "10.0.0.1:1", "10.0.0.2:1", 10);
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
    h.pkt(12 * S, Some(0x2), Udp, Out, "10.0.0.1:2", "10.0.0.2:2", 10);
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
fn flush_emits_everything_final() {
    let mut h = H::new();
    h.create(S, 100, 0x1, Some(Udp));
    h.pkt(S, Some(0x1), Udp, Out, "10.0.0.1:1", "10.0.0.2:1", 10);
    h.pkt(S, Some(0x1), Udp, Out, "10.0.0.1:1", "10.0.0.3:1", 10);
    h.eng.flush(&mut h.out);
    let v = h.flows();
    assert_eq!(v.len(), 2);
    assert!(v.iter().all(|r| r.is_final));
    assert_eq!(h.eng.stats().sockets + h.eng.stats().flows, 0);
}

#[test]
fn v4_mapped_dual_stack_socket_matches_ipv4_packets() {
    let mut h = H::new();
    let sk = 0x3100;
    h.create(S, 100, sk, Some(Tcp));
    h.connect(S, 100, sk, "[::ffff:10.0.0.1]:1000", "[::ffff:10.0.0.2]:80");
    h.pkt(S + MS, None, Tcp, Out, "10.0.0.1:1000", "10.0.0.2:80", 60);
    h.close(2 * S, None, sk);
    h.tick(10 * S);
    let r = only(h.flows());
    assert_eq!(r.local.packets, 1);
    assert_eq!(r.local.ip.to_string(), "10.0.0.1");
}

#[test]
fn table_entries_stay_small() {
    // Memory per tracked flow is dominated by these; keep them in check.
    assert!(
        std::mem::size_of::<Tuple>() <= 36,
        "{}",
        std::mem::size_of::<Tuple>()
    );
    assert!(
        std::mem::size_of::<Option<Flow>>() <= 160,
        "{}",
        std::mem::size_of::<Option<Flow>>()
    );
    assert!(
        std::mem::size_of::<Option<Socket>>() <= 160,
        "{}",
        std::mem::size_of::<Option<Socket>>()
    );
}

#[test]
fn tcp_connection_resuming_after_inactivity_is_one_new_flow() {
    let mut h = H::new();
    let sk = 0x4100;
    let (l, r) = ("10.0.0.1:1000", "10.0.0.2:22");
    h.create(0, 100, sk, Some(Tcp));
    h.connect(0, 100, sk, l, r);
    h.pkt(S, Some(sk), Tcp, Out, l, r, 60);
    h.tick(31 * S);
    let first = only(h.flows());
    assert!(first.is_final && first.complete);
    h.pkt(50 * S, Some(sk), Tcp, In, r, l, 80);
    h.pkt(51 * S, None, Tcp, Out, l, r, 60);
    h.pkt(52 * S, Some(sk), Tcp, Out, l, r, 60);
    assert_eq!(h.eng.stats().flows, 1);
    h.close(53 * S, Some(100), sk);
    h.tick(60 * S);
    let second = only(h.flows());
    assert_ne!(second.id, first.id);
    assert_eq!(counters(&second), (2, 120, 1, 80));
    assert_eq!(second.direction, FlowDirection::Egress);
    assert!(!second.complete);
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

#[test]
fn timer_heaps_stay_proportional_to_live_items_under_churn() {
    let mut h = H::new();
    // 50k short connections closed and reused quickly: each leaves stale
    // timer entries behind that compaction must reclaim.
    for i in 0..50_000u64 {
        let t = i * MS;
        let sk = 0x10_0000 + (i % 64) * 0x100;
        let l = format!("10.0.0.1:{}", 10_000 + i % 50_000);
        h.create(t, 100, sk, Some(Tcp));
        h.connect(t, 100, sk, &l, "10.0.0.2:80");
        h.close(t, Some(100), sk);
        h.out.clear();
    }
    let st = h.eng.stats();
    // Closed sockets whose address was reused are retired until their
    // termination wait ends (no tick here): the socket table's bound holds.
    assert!(st.sockets <= cfg().max_sockets, "{st:?}");
    assert!(
        st.timers <= 3 * (st.sockets + st.flows) + 3 * 4096 + 64,
        "{st:?}"
    );
}

#[test]
fn exec_and_creds_events_shape_later_attributions() {
    let mut h = H::new();
    h.create(S, 100, 0x1, Some(Udp));
    h.pkt(S, Some(0x1), Udp, Out, "10.0.0.1:1", "10.0.0.2:1", 10);
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
    h.pkt(3 * S, Some(0x2), Udp, Out, "10.0.0.1:2", "10.0.0.2:2", 10);
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
        h.pkt(S + (2 + i as u64) * MS, None, Udp, In, src, dst, 228);
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
    h.pkt(S + 2 * MS, None, Udp, In, "127.0.0.1:1", "127.0.0.1:9", 30);
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
    h.pkt(2 * S, None, Udp, In, "10.0.0.5:5000", "10.0.0.1:9401", 100);
    h.pkt(
        2 * S + MS,
        None,
        Udp,
        In,
        "10.0.0.5:5000",
        "10.0.0.1:9401",
        100,
    );
    h.pkt(
        2 * S + 2 * MS,
        None,
        Udp,
        In,
        "10.0.0.6:5000",
        "10.0.0.1:9401",
        50,
    );
    h.pkt(
        2 * S + 3 * MS,
        None,
        Udp,
        In,
        "10.0.0.7:5000",
        "10.0.0.2:9501",
        70,
    );
    h.pkt(
        2 * S + 4 * MS,
        None,
        Udp,
        In,
        "10.0.0.7:5000",
        "10.0.0.3:9501",
        70,
    );
    // Same port, another local address: not the specific socket's.
    h.pkt(
        2 * S + 5 * MS,
        None,
        Udp,
        In,
        "10.0.0.8:5000",
        "10.0.0.9:9401",
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
    h.pkt(2 * S, None, Udp, In, "10.0.0.5:5000", "10.0.0.1:53", 80);
    h.pkt(
        2 * S + MS,
        Some(0x7500),
        Udp,
        Out,
        "10.0.0.1:53",
        "10.0.0.5:5000",
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
            "10.0.0.5:5000",
            &format!("10.0.0.1:{port}"),
            40,
        );
    }
    let st = h.eng.stats();
    assert_eq!((st.parked_udp, st.unmatched_packets), (2, 2));
    h.tick(100 * S);
    let st = h.eng.stats();
    assert_eq!((st.parked_udp, st.unmatched_packets), (0, 4));
}

mod dns;

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
            h.pkt(S, None, Tcp, In, "10.0.2.2:40000", &local, 60);
            h.pkt(S + 1, Some(sock), Tcp, Out, &local, "10.0.2.2:40000", 60);
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
        "10.0.2.15:50051",
        "10.0.2.2:40001",
        60,
    );
    h.tick(100 * S);
    let v = h.flows();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].process.as_ref().map(|p| p.pid), Some(100));
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
    h.pkt(S + MS, Some(sk), Tcp, Out, l, r, 1000);
    h.close(2 * S, Some(100), sk);
    h.pkt(2 * S + MS, Some(sk), Tcp, Out, l, r, 52); // FIN
    h.create(2 * S + 2 * MS, 300, sk, Some(Tcp)); // reused
    h.connect(2 * S + 2 * MS, 300, sk, "127.0.0.1:40000", "127.0.0.1:22");
    h.pkt(2 * S + 3 * MS, None, Tcp, In, r, l, 52); // peer's FIN
    h.pkt(2 * S + 4 * MS, Some(ctl), Tcp, Out, l, r, 52); // last ACK
    h.pkt(
        2 * S + 5 * MS,
        Some(sk),
        Tcp,
        Out,
        "127.0.0.1:40000",
        "127.0.0.1:22",
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
    h.pkt(3 * S, None, Tcp, In, r, l, 60); // SYN
    h.pkt(3 * S + 1, None, Tcp, In, r, l, 52); // FIN
    h.pkt(3 * S + 2, Some(sk), Tcp, Out, l, r, 52); // ACK from the child
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
