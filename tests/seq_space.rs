//! TCP sequence-space figures on the recordings of real kernels
//! (tests/fixtures/recorded/<kernel>/): none of them lost a packet sample
//! (their manifests say `packet_probe_misses: 0`), so no flow may report
//! uncounted bytes; with TCP packet samples taken out of a recording, as a
//! missed kprobe hit takes them out, the flows they belonged to report
//! exactly their payload as uncounted, and no other flow changes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, UNIX_EPOCH};

use sockscope::enrich::process::{FakeProcSource, ProcessTable, ProcessTableConfig};
use sockscope::enrich::users::UserDb;
use sockscope::flow::{Engine, EngineConfig, OffsetClock};
use sockscope::model::{
    Accounting, Event, EventKind, FlowRecord, Output, Packet, PacketDir, SeqSpace, Transport,
    TCP_FIN,
};

#[path = "fixtures/replay.rs"]
mod replay;

/// Kernels with recorded sessions.
const KERNELS: [&str; 4] = ["5.10", "6.1", "6.12", "7.2"];
/// Every how many eligible samples one is taken out.
const DROP_EVERY: usize = 7;
/// The `flows` workload's TCP server ports (IPv4 and IPv6).
const FLOWS_TCP_PORTS: [u16; 2] = [9110, 9111];
/// pcap link types of `tcpdump -i any`: Linux cooked v1 and v2, and the
/// length of their headers.
const LINKTYPE_LINUX_SLL: u32 = 113;
const LINKTYPE_LINUX_SLL2: u32 = 276;
const SLL_HEADER_LEN: usize = 16;
const SLL2_HEADER_LEN: usize = 20;
/// Lengths of the pcap file and record headers.
const PCAP_HEADER_LEN: usize = 24;
const PCAP_RECORD_HEADER_LEN: usize = 16;

/// TCP payload bytes per (source, destination) in a capture of loopback
/// traffic (each packet captured once): the oracle of the sequence-space
/// figures, read with the daemon's header parser only for the IP header.
fn captured_payload(kernel: &str, session: &str) -> HashMap<(SocketAddr, SocketAddr), u64> {
    let path = replay::recorded_dir()
        .join(kernel)
        .join(format!("{session}.pcap"));
    let data = std::fs::read(&path).expect("capture");
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    assert_eq!(
        u32_at(&data, 0),
        0xa1b2_c3d4,
        "little-endian microsecond pcap"
    );
    let hdr = match u32_at(&data, 20) & 0x0fff_ffff {
        LINKTYPE_LINUX_SLL => SLL_HEADER_LEN,
        LINKTYPE_LINUX_SLL2 => SLL2_HEADER_LEN,
        other => panic!("{}: link type {other}", path.display()),
    };
    let mut out = HashMap::new();
    let mut at = PCAP_HEADER_LEN;
    while at + PCAP_RECORD_HEADER_LEN <= data.len() {
        let caplen = u32_at(&data, at + 8) as usize;
        let frame = &data[at + PCAP_RECORD_HEADER_LEN..at + PCAP_RECORD_HEADER_LEN + caplen];
        at += PCAP_RECORD_HEADER_LEN + caplen;
        let ip = &frame[hdr..];
        let h = match ip[0] >> 4 {
            4 => sockscope::headers::parse_ipv4(ip),
            _ => sockscope::headers::parse_ipv6(ip),
        }
        .expect("IP header");
        if h.protocol != sockscope::headers::IPPROTO_TCP {
            continue;
        }
        let t = &ip[h.transport_offset..];
        let port = |i: usize| u16::from_be_bytes([t[i], t[i + 1]]);
        let payload = h.total_len - h.transport_offset - usize::from(t[12] >> 4) * 4;
        *out.entry((
            SocketAddr::new(h.src, port(0)),
            SocketAddr::new(h.dst, port(2)),
        ))
        .or_default() += payload as u64;
    }
    out
}

fn engine() -> Engine<OffsetClock> {
    let cfg = EngineConfig {
        flow_inactive_timeout: Duration::from_secs(30),
        flow_termination_timeout: Duration::from_secs(5),
        socket_inactive_timeout: Duration::from_secs(60),
        flow_update_interval: Duration::from_secs(10),
        max_sockets: 4096,
        max_flows: 4096,
        max_embryonic: 1024,
        max_parked_udp: 1024,
        include_self: true,
        own_pid: 1,
        own_tcp_ports: Vec::new(),
        accounting: Accounting::Packets,
    };
    let procs = ProcessTable::new(
        Box::new(FakeProcSource::default()),
        UserDb::empty(),
        ProcessTableConfig {
            max_processes: 1024,
            exit_grace: Duration::from_secs(5),
        },
    );
    Engine::new(cfg, OffsetClock { base: UNIX_EPOCH }, procs)
}

/// The decoded events of a recording, each with the index of its sample.
fn events(kernel: &str, session: &str) -> Vec<Event> {
    let path = replay::recorded_dir()
        .join(kernel)
        .join(format!("{session}.rec"));
    let (dec, samples) = replay::raw_samples(&path).unwrap_or_else(|e| panic!("{e}"));
    samples
        .iter()
        .filter_map(|s| dec.decode(&s.raw()).expect("recordings decode"))
        .collect()
}

/// Final records by (local, remote) end; a tuple used twice sums.
type Flows = HashMap<(SocketAddr, SocketAddr), Vec<FlowRecord>>;

fn run(events: &[Event]) -> Flows {
    let mut e = engine();
    let mut out = Vec::new();
    e.handle_batch(events, &mut out);
    e.flush(&mut out);
    let mut flows = Flows::new();
    for o in out {
        if let Output::Flow(r) = o {
            if r.is_final {
                let key = (
                    SocketAddr::new(r.local.ip, r.local.port),
                    SocketAddr::new(r.remote.ip, r.remote.port),
                );
                flows.entry(key).or_default().push((*r).clone());
            }
        }
    }
    flows
}

fn tcp(ev: &Event) -> Option<&Packet> {
    match &ev.kind {
        EventKind::Packet(p) if p.transport == Transport::Tcp => Some(p),
        _ => None,
    }
}

/// The flow a packet is counted in, and whether it is that flow's local
/// (sent) side.
fn flow_side(p: &Packet) -> ((SocketAddr, SocketAddr), bool) {
    match p.dir {
        PacketDir::Egress => ((p.src, p.dst), true),
        PacketDir::Ingress => ((p.dst, p.src), false),
    }
}

fn sides(r: &FlowRecord) -> [Option<SeqSpace>; 2] {
    [r.local.sequence, r.remote.sequence]
}

#[test]
fn recordings_without_lost_samples_report_no_shortfall() {
    for kernel in KERNELS {
        for session in ["churn", "flows"] {
            let flows = run(&events(kernel, session));
            let mut tcp_flows = 0;
            for (key, recs) in &flows {
                for r in recs {
                    if r.transport != Transport::Tcp {
                        assert_eq!(sides(r), [None, None], "{kernel}/{session}: {key:?}");
                        continue;
                    }
                    tcp_flows += 1;
                    for s in sides(r).into_iter().flatten() {
                        assert_eq!(s.uncounted_bytes, 0, "{kernel}/{session}: {key:?}: {s:?}");
                    }
                }
            }
            assert!(tcp_flows >= 4, "{kernel}/{session}: {tcp_flows} TCP flows");
        }
    }
}

#[test]
fn the_flows_workload_covers_what_the_capture_carried() {
    for kernel in KERNELS {
        let capture = captured_payload(kernel, "flows");
        let flows = run(&events(kernel, "flows"));
        let mut seen = 0;
        for ((local, remote), recs) in &flows {
            let [r] = &recs[..] else {
                panic!("{kernel}: {local} -> {remote}: {} records", recs.len());
            };
            let client = FLOWS_TCP_PORTS.contains(&remote.port());
            let server = FLOWS_TCP_PORTS.contains(&local.port());
            if r.transport != Transport::Tcp || !(client || server) {
                continue;
            }
            seen += 1;
            let want = |from, to| {
                Some(SeqSpace {
                    payload_bytes: capture[&(from, to)],
                    uncounted_bytes: 0,
                    from_syn: true,
                })
            };
            assert_eq!(
                (r.local.sequence, r.remote.sequence),
                (want(*local, *remote), want(*remote, *local)),
                "{kernel}: {local} -> {remote}"
            );
            assert!(capture[&(*local, *remote)] > 0 && capture[&(*remote, *local)] > 0);
        }
        // Two connections over 127.0.0.1 and two over ::1, a client and a
        // server flow each.
        assert_eq!(seen, 8, "{kernel}: TCP flows of the workload");
    }
}

#[test]
fn removed_packet_samples_are_the_shortfall_to_the_byte() {
    for kernel in KERNELS {
        let all = events(kernel, "churn");
        let intact = run(&all);
        // Samples whose loss the sequence numbers can tell: a payload
        // carrier followed by a later packet of the same side further on
        // that carries payload or a FIN (a bare ACK moves nothing).
        let eligible: Vec<usize> = (0..all.len())
            .filter(|&i| {
                let Some(p) = tcp(&all[i]) else { return false };
                let Some(s) = p.tcp_seq.filter(|s| s.payload > 0) else {
                    return false;
                };
                let end = s.seq.wrapping_add(s.payload);
                all[i + 1..].iter().filter_map(tcp).any(|q| {
                    let fin = q.tcp_flags.is_some_and(|f| f & TCP_FIN != 0);
                    q.dir == p.dir
                        && (q.src, q.dst) == (p.src, p.dst)
                        && q.tcp_seq.is_some_and(|t| {
                            (t.payload > 0 || fin) && t.seq.wrapping_sub(end) as i32 >= 0
                        })
                })
            })
            .collect();
        let dropped: Vec<usize> = eligible.iter().copied().step_by(DROP_EVERY).collect();
        assert!(dropped.len() >= 20, "{kernel}: {} dropped", dropped.len());
        let mut want: HashMap<((SocketAddr, SocketAddr), bool), u64> = HashMap::new();
        for &i in &dropped {
            let p = tcp(&all[i]).expect("tcp");
            *want.entry(flow_side(p)).or_default() += u64::from(p.tcp_seq.expect("seq").payload);
        }
        let kept: Vec<Event> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| dropped.binary_search(i).is_err())
            .map(|(_, e)| e.clone())
            .collect();
        let short = run(&kept);
        assert_eq!(short.len(), intact.len(), "{kernel}: the same flows");
        for (key, recs) in &short {
            let [r] = &recs[..] else {
                continue; // a reused tuple: the sums below are per record
            };
            let before = &intact[key][0];
            for (local, (got, was)) in [
                (true, (r.local.sequence, before.local.sequence)),
                (false, (r.remote.sequence, before.remote.sequence)),
            ] {
                let missing = want.get(&(*key, local)).copied().unwrap_or(0);
                let (Some(got), Some(was)) = (got, was) else {
                    assert_eq!(got, was, "{kernel}: {key:?}");
                    continue;
                };
                assert_eq!(
                    (got.payload_bytes, got.uncounted_bytes),
                    (was.payload_bytes, missing),
                    "{kernel}: {key:?} local={local}"
                );
            }
        }
        let detected: u64 = short
            .values()
            .flatten()
            .flat_map(sides)
            .flatten()
            .map(|s| s.uncounted_bytes)
            .sum();
        assert_eq!(detected, want.values().sum::<u64>(), "{kernel}: total");
    }
}
