//! Replays the daemon's own recordings of real kernels
//! (`tests/fixtures/recorded/<kernel>/<session>.rec`, written through
//! `socket.record_path` by `tests/vm/record_fixtures.py`) through the
//! decoder built the way the daemon builds it, and checks the decoded
//! events against what the guest's packet capture and the workload say:
//!
//! * for every 5-tuple and direction, packets and IP bytes summed from the
//!   decoded packet events equal the capture's, short by at most the
//!   packet-probe misses the kernel counted in `kprobe_profile` during the
//!   capture (one budget over the session) plus ring losses in the
//!   recording; never over it;
//! * the listener and UDP server addresses, the sockets the packets carry,
//!   and the processes (and users) of connects, accepts, sends and
//!   receives are those of the workload.
//!
//! Nothing in a recording is trusted: odd records are counted as decode
//! errors, which the check reports.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::net::SocketAddr;
use std::path::Path;

use serde_json::Value;
use sockscope::model::{Event, EventKind, PacketDir, RawSample, SockOp, Transport};
use sockscope::probe::Attach;
use sockscope::ring::recording::Replay;
use sockscope::ring::RingItem;

#[path = "fixtures/replay.rs"]
mod replay;

use replay::Decoded;

/// Kernels recorded (directories under tests/fixtures/recorded).
const KERNELS: [&str; 4] = ["5.10", "6.1", "6.12", "7.2"];
/// Sessions recorded on every kernel.
const SESSIONS: [&str; 2] = ["flows", "churn"];

/// One direction of one 5-tuple.
type Key = (Transport, SocketAddr, SocketAddr, PacketDir);

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Count {
    packets: u64,
    bytes: u64,
}

fn parse_transport(s: &str) -> Transport {
    match s {
        "tcp" => Transport::Tcp,
        "udp" => Transport::Udp,
        other => panic!("transport {other}"),
    }
}

/// The capture's totals: `proto src dst sent|received packets ip_bytes`.
fn capture_totals(path: &Path) -> HashMap<Key, Count> {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let p: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(p.len(), 6, "{}: {line}", path.display());
        let dir = match p[3] {
            "sent" => PacketDir::Egress,
            "received" => PacketDir::Ingress,
            other => panic!("{}: direction {other}", path.display()),
        };
        let key = (
            parse_transport(p[0]),
            p[1].parse().expect("src"),
            p[2].parse().expect("dst"),
            dir,
        );
        let c = Count {
            packets: p[4].parse().expect("packets"),
            bytes: p[5].parse().expect("bytes"),
        };
        assert!(
            out.insert(key, c).is_none(),
            "{}: {line} twice",
            path.display()
        );
    }
    out
}

fn addr(v: &Value) -> SocketAddr {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("endpoint {v}"))
}

fn addrs(v: &Value) -> Vec<SocketAddr> {
    v.as_array()
        .unwrap_or_else(|| panic!("endpoint list {v}"))
        .iter()
        .map(addr)
        .collect()
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("number {v}"))
}

/// Packet totals and the problems found comparing them with the capture.
fn packet_problems(
    ctx: &str,
    d: &Decoded,
    capture: &HashMap<Key, Count>,
    excluded: &HashSet<u16>,
    budget: u64,
) -> Vec<String> {
    let mut got: HashMap<Key, Count> = HashMap::new();
    let mut problems = Vec::new();
    // The processes each socket saw a syscall-context event of (these
    // recordings were made with the per-call send and receive probes too).
    let mut users: HashMap<u64, HashSet<u32>> = HashMap::new();
    for ev in &d.events {
        let sock = match &ev.kind {
            EventKind::SockCreate { sock, .. }
            | EventKind::TcpConnect { sock, .. }
            | EventKind::TcpAccept { sock, .. }
            | EventKind::SockActivity { sock, .. }
            | EventKind::UdpRecv { sock, .. }
            | EventKind::SockClose { sock } => *sock,
            _ => continue,
        };
        if let Some(t) = ev.task {
            users.entry(sock).or_default().insert(t.pid);
        }
    }
    let mut egress_with_task = 0;
    for ev in &d.events {
        let EventKind::Packet(p) = &ev.kind else {
            continue;
        };
        match (p.dir, ev.task) {
            (PacketDir::Ingress, Some(_)) => {
                problems.push(format!("ingress packet with a task: {ev:?}"))
            }
            // An egress packet sampled in a task: the kernel sent it in a
            // syscall of a process that uses the socket.
            (PacketDir::Egress, Some(t)) => {
                egress_with_task += 1;
                if !p
                    .sock
                    .is_some_and(|sk| users.get(&sk).is_some_and(|u| u.contains(&t.pid)))
                {
                    problems.push(format!(
                        "egress packet in a task that made no call on its socket: {ev:?}"
                    ));
                }
            }
            _ => {}
        }
        if p.dir == PacketDir::Ingress && p.transport == Transport::Udp && p.sock.is_none() {
            problems.push(format!("delivered datagram without its socket: {ev:?}"));
        }
        if [p.src.port(), p.dst.port()]
            .iter()
            .any(|x| excluded.contains(x))
        {
            continue;
        }
        let c = got.entry((p.transport, p.src, p.dst, p.dir)).or_default();
        c.packets += 1;
        c.bytes += u64::from(p.ip_len);
    }
    let keys: BTreeMap<String, Key> = got
        .keys()
        .chain(capture.keys())
        .map(|k| (format!("{k:?}"), *k))
        .collect();
    let mut short = 0u64;
    for (name, k) in &keys {
        let g = got.get(k).copied().unwrap_or_default();
        let w = capture.get(k).copied().unwrap_or_default();
        if g == w {
            continue;
        }
        if g.packets < w.packets && g.bytes < w.bytes {
            short += w.packets - g.packets;
            eprintln!("{ctx}: {name}: decoded {g:?}, captured {w:?} (short)");
        } else {
            problems.push(format!("{name}: decoded {g:?}, captured {w:?}"));
        }
    }
    if short > budget {
        problems.push(format!(
            "{short} packets short of the capture, more than the {budget} the kernel \
             reported missed or lost"
        ));
    }
    if egress_with_task == 0 {
        problems.push("no egress packet was sampled in a task".into());
    }
    eprintln!("{ctx}: {egress_with_task} egress packets sampled in the task that sent them");
    problems
}

/// Checks of the workload's processes and endpoints against the events.
fn workload_problems(d: &Decoded, procs: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let ev = &d.events;
    let pid_of = |e: &Event| e.task.map(|t| t.pid);
    let packets = |src: Option<SocketAddr>, dst: Option<SocketAddr>, dir: PacketDir| {
        ev.iter().filter_map(move |e| match &e.kind {
            EventKind::Packet(p)
                if p.dir == dir
                    && src.is_none_or(|s| p.src == s)
                    && dst.is_none_or(|x| p.dst == x) =>
            {
                Some(*p)
            }
            _ => None,
        })
    };
    let creds_of = |pid: u32, uid: u32| {
        ev.iter().any(|e| {
            pid_of(e) == Some(pid) && matches!(e.kind, EventKind::Creds(c) if c.uid == uid)
        })
    };
    // Clients' local endpoints by server address, for the accept checks.
    let mut clients_of: HashMap<SocketAddr, Vec<SocketAddr>> = HashMap::new();
    for p in procs {
        if p["role"] == "tcp_client" {
            clients_of
                .entry(addr(&p["remote"]))
                .or_default()
                .extend(addrs(&p["locals"]));
        }
    }
    for p in procs {
        let role = p["role"].as_str().unwrap_or("?");
        let pid = u32::try_from(num(&p["pid"])).expect("pid");
        let uid = u32::try_from(num(&p["uid"])).expect("uid");
        let mut bad = |what: String| problems.push(format!("{role} pid {pid}: {what}"));
        if uid != 0 && !creds_of(pid, uid) {
            bad(format!("no credentials change to uid {uid}"));
        }
        match role {
            "tcp_client" => {
                let remote = addr(&p["remote"]);
                for local in addrs(&p["locals"]) {
                    let found = ev.iter().any(|e| {
                        pid_of(e) == Some(pid)
                            && matches!(e.kind, EventKind::TcpConnect { local: l, remote: r, .. }
                                if l == local && r == remote)
                    });
                    if !found {
                        bad(format!("no connect {local} -> {remote}"));
                    }
                }
            }
            "tcp_server" => {
                let listen = addr(&p["local"]);
                let clients = clients_of.get(&listen).cloned().unwrap_or_default();
                if clients.is_empty() {
                    bad(format!("no client of {listen} in the manifest"));
                }
                for c in clients {
                    let found = ev.iter().any(|e| {
                        pid_of(e) == Some(pid)
                            && matches!(e.kind, EventKind::TcpAccept { local, remote, .. }
                                if local == listen && remote == c)
                    });
                    if !found {
                        bad(format!("no accept on {listen} from {c}"));
                    }
                }
            }
            "udp_server" => {
                let local = addr(&p["local"]);
                let socks: HashSet<u64> = ev
                    .iter()
                    .filter_map(|e| match e.kind {
                        EventKind::UdpRecv { sock, local: l } if pid_of(e) == Some(pid) => {
                            (l == local).then_some(sock)
                        }
                        _ => None,
                    })
                    .collect();
                if socks.len() != 1 {
                    bad(format!("receives bound to {local} on sockets {socks:x?}"));
                    continue;
                }
                let delivered: Vec<_> = packets(None, Some(local), PacketDir::Ingress).collect();
                if delivered.is_empty() {
                    bad(format!("no datagram delivered to {local}"));
                }
                for pk in delivered
                    .iter()
                    .filter(|pk| !pk.sock.is_some_and(|s| socks.contains(&s)))
                {
                    bad(format!("datagram to {local} on another socket: {pk:?}"));
                }
                let sent: Vec<_> = packets(Some(local), None, PacketDir::Egress).collect();
                if p["receive_only"] == true && !sent.is_empty() {
                    bad(format!(
                        "a receive-only server sent {} datagrams",
                        sent.len()
                    ));
                }
                for pk in sent
                    .iter()
                    .filter(|pk| !pk.sock.is_some_and(|s| socks.contains(&s)))
                {
                    bad(format!("datagram from {local} on another socket: {pk:?}"));
                }
            }
            "udp_client" => {
                let remote = addr(&p["remote"]);
                let sendto = p["mode"] == "sendto";
                let socks: HashSet<u64> = ev
                    .iter()
                    .filter_map(|e| match e.kind {
                        EventKind::SockActivity {
                            sock,
                            transport: Transport::Udp,
                            op: SockOp::Send,
                            peer,
                        } if pid_of(e) == Some(pid) => {
                            (peer == sendto.then_some(remote)).then_some(sock)
                        }
                        _ => None,
                    })
                    .collect();
                if socks.len() != 1 {
                    bad(format!(
                        "sends (to {remote}, sendto {sendto}) on sockets {socks:x?}"
                    ));
                    continue;
                }
                for local in addrs(&p["locals"]) {
                    let sent: Vec<_> =
                        packets(Some(local), Some(remote), PacketDir::Egress).collect();
                    if sent.is_empty() {
                        bad(format!("no datagram {local} -> {remote}"));
                    }
                    for pk in sent
                        .iter()
                        .filter(|pk| !pk.sock.is_some_and(|s| socks.contains(&s)))
                    {
                        bad(format!("datagram from another socket: {pk:?}"));
                    }
                    for pk in packets(Some(remote), Some(local), PacketDir::Ingress)
                        .filter(|pk| !pk.sock.is_some_and(|s| socks.contains(&s)))
                    {
                        bad(format!("reply delivered to another socket: {pk:?}"));
                    }
                }
            }
            "http_server" => {
                let listen = addr(&p["local"]);
                let accepts: Vec<&Event> = ev
                    .iter()
                    .filter(
                        |e| matches!(e.kind, EventKind::TcpAccept { local, .. } if local == listen),
                    )
                    .collect();
                let want = procs
                    .iter()
                    .find(|c| c["role"] == "churn_client")
                    .map_or(0, |c| num(&c["connections"]));
                if accepts.len() as u64 != want {
                    bad(format!(
                        "{} accepts on {listen}, want {want}",
                        accepts.len()
                    ));
                }
                if let Some(e) = accepts.iter().find(|e| pid_of(e) != Some(pid)) {
                    bad(format!("accept by another task: {e:?}"));
                }
            }
            "churn_client" => {
                let remote = addr(&p["remote"]);
                let want = num(&p["connections"]);
                let children: HashSet<u32> = ev
                    .iter()
                    .filter_map(|e| match e.kind {
                        EventKind::Fork { parent, child } if parent == pid => Some(child),
                        _ => None,
                    })
                    .collect();
                let connects: Vec<(&Event, SocketAddr)> = ev
                    .iter()
                    .filter_map(|e| match e.kind {
                        EventKind::TcpConnect {
                            local, remote: r, ..
                        } if r == remote => Some((e, local)),
                        _ => None,
                    })
                    .collect();
                let distinct: HashSet<SocketAddr> = connects.iter().map(|c| c.1).collect();
                if connects.len() as u64 != want || distinct.len() as u64 != want {
                    bad(format!(
                        "{} connects to {remote} from {} ports, want {want}",
                        connects.len(),
                        distinct.len()
                    ));
                }
                for (e, _) in &connects {
                    if !e.task.is_some_and(|t| children.contains(&t.pid)) {
                        bad(format!("connect not by a child of the loop: {e:?}"));
                    }
                }
                // Each child is busybox's shell re-executing itself as the
                // `wget` applet: the exec probe read its arguments from the
                // new image's stack, right before the exec event.
                let connectors: HashSet<u32> =
                    connects.iter().filter_map(|(e, _)| pid_of(e)).collect();
                for &child in &connectors {
                    let execs: Vec<&EventKind> = ev
                        .iter()
                        .filter(|e| match &e.kind {
                            EventKind::ExecArgs { pid, .. } | EventKind::Exec { pid, .. } => {
                                *pid == child
                            }
                            _ => false,
                        })
                        .map(|e| &e.kind)
                        .collect();
                    let ok = matches!(
                        execs.as_slice(),
                        [EventKind::ExecArgs { argc, args, .. }, EventKind::Exec { filename, .. }]
                            if args.first().map(String::as_str) == Some("wget")
                                && *argc as usize >= args.len()
                                && args.len() >= 2
                                && filename.starts_with("/proc/")
                    );
                    if !ok {
                        bad(format!("child {child}: exec events {execs:?}"));
                    }
                }
            }
            other => bad(format!("unknown role {other}")),
        }
    }
    problems
}

fn check_session(kernel: &str, session: &str) -> Vec<String> {
    let dir = replay::recorded_dir().join(kernel);
    let ctx = format!("{kernel}/{session}");
    let manifest: Value = serde_json::from_str(
        &fs::read_to_string(dir.join(format!("{session}.json")))
            .unwrap_or_else(|e| panic!("{ctx}: manifest: {e}")),
    )
    .unwrap_or_else(|e| panic!("{ctx}: manifest: {e}"));
    let release = fs::read_to_string(dir.join("kernel.txt")).expect("kernel.txt");
    assert_eq!(
        manifest["kernel_release"].as_str(),
        Some(release.trim()),
        "{ctx}: manifest of another kernel"
    );
    assert!(
        release.starts_with(&format!("{kernel}.")),
        "{ctx}: kernel {release}"
    );
    let d = replay::replay(&dir.join(format!("{session}.rec")))
        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
    // Every probe the daemon installs by default was recorded (IPv6 is
    // monitored).
    for p in replay::per_packet_probes() {
        assert!(
            d.installed.iter().any(|e| match p.attach {
                Attach::Tracepoint { system, event } => e.system == system && e.name == event,
                Attach::Kprobe(_) | Attach::Kretprobe(_) => e.name == p.name,
            }),
            "{ctx}: probe {} not recorded",
            p.name
        );
    }
    assert_eq!(
        (d.samples, d.ring_lost),
        (
            num(&manifest["recording"]["samples"]),
            num(&manifest["recording"]["lost_samples"])
        ),
        "{ctx}: the recording is not the one the manifest describes"
    );
    let capture = capture_totals(&dir.join(format!("{session}.totals.txt")));
    assert!(!capture.is_empty(), "{ctx}: empty capture");
    let excluded: HashSet<u16> = manifest["excluded_ports"]
        .as_array()
        .expect("excluded_ports")
        .iter()
        .map(|p| u16::try_from(num(p)).expect("port"))
        .collect();
    let misses = num(&manifest["packet_probe_misses"]);
    let budget = misses + d.ring_lost;
    let procs = manifest["processes"].as_array().expect("processes").clone();
    assert!(!procs.is_empty(), "{ctx}: no workload in the manifest");
    // The capture has the workload's traffic, and each of its endpoints.
    for p in &procs {
        for v in [&p["local"], &p["remote"]] {
            if let Some(s) = v.as_str() {
                let a: SocketAddr = s.parse().expect("endpoint");
                assert!(
                    capture.keys().any(|k| k.1 == a || k.2 == a),
                    "{ctx}: the capture has no packet of {a}"
                );
            }
        }
    }
    let mut problems: Vec<String> = Vec::new();
    if !d.errors.is_empty() {
        problems.push(format!("decode errors {:?}", d.errors));
    }
    problems.extend(packet_problems(&ctx, &d, &capture, &excluded, budget));
    problems.extend(workload_problems(&d, &procs));
    eprintln!(
        "{ctx}: {} events ({} ignored, {} ring-lost) of {} probes, {} captured tuple directions, \
         packet-probe misses {misses}: {} problems",
        d.events.len(),
        d.ignored,
        d.ring_lost,
        d.installed.len(),
        capture.len(),
        problems.len()
    );
    problems
        .into_iter()
        .map(|p| format!("{ctx}: {p}"))
        .collect()
}

#[test]
fn recordings_decode_to_the_captured_traffic() {
    let mut problems = Vec::new();
    for k in KERNELS {
        for s in SESSIONS {
            problems.extend(check_session(k, s));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// Samples of a real recording, cut short, zeroed or with flipped bytes,
/// decode to counted errors or ignored samples, never a panic.
#[test]
fn mangled_samples_are_counted_not_fatal() {
    let path = replay::recorded_dir().join("6.1/flows.rec");
    let mut r = Replay::open(&path).expect("recording");
    let installed = replay::installed_events(r.header()).expect("probe table");
    let dec = replay::decoder_for(&installed).expect("decoder");
    let (mut tried, mut results) = (0u64, 0u64);
    r.for_each(|item| {
        let RingItem::Sample(s) = item else {
            return;
        };
        let n = s.data.len();
        let mut variants: Vec<Vec<u8>> = vec![
            s.data[..n / 2].to_vec(),
            s.data[..n.saturating_sub(1)].to_vec(),
            vec![0; n],
            s.data.iter().map(|b| !b).collect(),
        ];
        // The record's type kept, one payload byte flipped at a time.
        for i in (8..n).step_by(7) {
            let mut v = s.data.to_vec();
            v[i] ^= 0xa5;
            variants.push(v);
        }
        for v in &variants {
            tried += 1;
            let m = RawSample { data: v, ..s };
            if dec.decode(&m).is_ok() {
                results += 1;
            }
        }
    })
    .expect("replay");
    let errors: u64 = dec.error_counts().iter().map(|(_, n)| n).sum();
    assert!(tried > 10_000, "only {tried} variants");
    assert_eq!(results + errors, tried, "every failure is counted");
    assert!(
        errors > tried / 10,
        "mangling is noticed: {errors} errors of {tried}"
    );
}
