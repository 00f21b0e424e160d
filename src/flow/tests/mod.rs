//! Event sequences → expected flow records: the harness shared by the
//! tests of each part of the engine.

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
use PacketDir::{Egress as Out, Ingress as In};
use Transport::{Tcp, Udp};

mod attribution;
mod expiry;
mod handshake;
mod naming;
mod preexisting;
mod records;
mod seq;
mod socket_counters;
mod table;
mod tcp;
mod udp;

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
        accounting: crate::model::Accounting::Packets,
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

    /// A packet of `len` IP bytes from `src` to `dst`.
    fn pkt(
        &mut self,
        t: KernelTime,
        sock: Option<SockAddr>,
        tr: Transport,
        dir: PacketDir,
        (src, dst): (&str, &str),
        len: u32,
    ) {
        let p = Packet {
            sock,
            dir,
            transport: tr,
            src: sa(src),
            dst: sa(dst),
            ip_len: len,
            tcp_flags: None,
            tcp_seq: None,
        };
        self.ev(t, None, EventKind::Packet(p));
    }

    /// An egress packet of `len` IP bytes from `src` to `dst`, sampled in
    /// the task `pid` that sent it.
    fn sent(
        &mut self,
        t: KernelTime,
        pid: u32,
        sock: SockAddr,
        tr: Transport,
        (src, dst): (&str, &str),
        len: u32,
    ) {
        let p = Packet {
            sock: Some(sock),
            dir: Out,
            transport: tr,
            src: sa(src),
            dst: sa(dst),
            ip_len: len,
            tcp_flags: None,
            tcp_seq: None,
        };
        self.ev(t, Some(pid), EventKind::Packet(p));
    }

    /// A TCP segment with these flags, `len` IP bytes from `src` to `dst`.
    fn seg(
        &mut self,
        t: KernelTime,
        sock: Option<SockAddr>,
        dir: PacketDir,
        (src, dst): (&str, &str),
        len: u32,
        flags: u8,
    ) {
        let p = Packet {
            sock,
            dir,
            transport: Tcp,
            src: sa(src),
            dst: sa(dst),
            ip_len: len,
            tcp_flags: Some(flags),
            tcp_seq: None,
        };
        self.ev(t, None, EventKind::Packet(p));
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
