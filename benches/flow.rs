//! Flow engine throughput and memory, on events the real decoder produced.
//!
//! The events come from the daemon's own recordings of a real kernel
//! (`tests/fixtures/recorded/<FIXTURE_KERNEL>/`), decoded by the decoder
//! built from the recorded formats and the daemon's probe table. One
//! recorded connection's client half is the template of a flow: its events
//! exactly as decoded (TCP ingress packets carry no socket and are matched
//! by tuple, egress packets carry the sending socket; delivered UDP
//! datagrams carry their socket), with addresses, ports and socket ids
//! rewritten so that every flow is distinct.
//!
//! * `flow_update/{tcp,udp}/{1k,100k}`: the template's packet events of
//!   that many live flows, round-robin over the flows (the first packet of
//!   every flow, then the second, ...); elements/s is events per second
//!   on one core. TCP: a busybox `wget` of a 1216-byte page from `httpd`
//!   (churn recording); UDP: a connected client with echoed datagrams
//!   (flows recording).
//! * `flow_replay/churn`: the whole decoded churn recording (connections
//!   opened and closed, process events, sends and receives) through a
//!   fresh engine.
//! * `decode_and_engine/churn`: the raw samples of the churn recording
//!   decoded and handled in batches, as the reader and engine threads do,
//!   on one core (the file read beforehand).
//! * Memory per tracked socket (one TCP socket with one flow), printed
//!   before the benchmarks: from the engine's size accounting and from the
//!   growth of the resident set while 100k sockets are built.

use std::collections::HashMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, UNIX_EPOCH};

use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use sockscope::enrich::process::{FakeProcSource, ProcessTable, ProcessTableConfig};
use sockscope::enrich::users::UserDb;
use sockscope::flow::{Engine, EngineConfig, OffsetClock};
use sockscope::model::{Event, EventKind, Output, Packet, PacketDir, SockOp, Transport};

#[path = "../tests/fixtures/replay.rs"]
mod replay;

/// Kernel whose recordings the events come from.
const FIXTURE_KERNEL: &str = "6.1";
/// Samples decoded per batch handed to the engine (the reader's batch).
const DECODE_BATCH: usize = 256;
/// Sizes of the live flow sets measured.
const SIZES: [(usize, &str); 2] = [(1_000, "1k"), (100_000, "100k")];
/// Sockets built for the memory figure.
const MEMORY_SOCKETS: usize = 100_000;
/// Base of the rewritten kernel socket addresses.
const SOCK_BASE: u64 = 0xffff_8880_0000_0000;
/// Size of a fake `struct sock`, spacing the addresses.
const SOCK_STRIDE: u64 = 2048;
/// Port of the recorded churn workload's HTTP server.
const HTTP_PORT: u16 = 8081;
/// Port of the recorded UDP echo server.
const UDP_ECHO_PORT: u16 = 9212;

fn engine(flows: usize) -> Engine<OffsetClock> {
    let cfg = EngineConfig {
        flow_inactive_timeout: Duration::from_secs(30),
        flow_termination_timeout: Duration::from_secs(5),
        socket_inactive_timeout: Duration::from_secs(60),
        flow_update_interval: Duration::from_secs(10),
        max_sockets: flows * 2,
        max_flows: flows * 2,
        max_embryonic: 1024,
        max_parked_udp: 1024,
        include_self: false,
        own_pid: 1,
        own_tcp_ports: Vec::new(),
        accounting: sockscope::model::Accounting::Packets,
    };
    let procs = ProcessTable::new(
        Box::new(FakeProcSource::default()),
        UserDb::empty(),
        ProcessTableConfig {
            max_processes: 1024,
            exit_grace: Duration::from_secs(5),
        },
    );
    // Not pre-sized: the tables grow as the daemon's do.
    Engine::new(cfg, OffsetClock { base: UNIX_EPOCH }, procs)
}

fn recording(session: &str) -> replay::Decoded {
    let path = replay::recorded_dir()
        .join(FIXTURE_KERNEL)
        .join(format!("{session}.rec"));
    let d = replay::replay(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        d.errors.is_empty(),
        "{}: decode errors {:?}",
        path.display(),
        d.errors
    );
    d
}

/// One recorded connection's client half: the socket's own events from
/// its creation to (not including) its close, and the packets of its
/// tuple in both directions.
struct Template {
    /// Events before the first packet (socket creation, connect).
    setup: Vec<Event>,
    /// Every packet event and the socket events after the first packet
    /// (sends, receives), in recorded order.
    stream: Vec<Event>,
    local: SocketAddr,
    remote: SocketAddr,
}

fn sock_of(kind: &EventKind) -> Option<u64> {
    match *kind {
        EventKind::SockCreate { sock, .. }
        | EventKind::TcpConnect { sock, .. }
        | EventKind::TcpAccept { sock, .. }
        | EventKind::SockActivity { sock, .. }
        | EventKind::UdpRecv { sock, .. }
        | EventKind::SockClose { sock } => Some(sock),
        _ => None,
    }
}

/// The client half of the connection whose first event is `events[at]`
/// (on socket `sock`, between `local` and `remote`).
fn template(
    events: &[Event],
    at: usize,
    sock: u64,
    local: SocketAddr,
    remote: SocketAddr,
) -> Template {
    let start = events[..at]
        .iter()
        .rposition(|e| matches!(e.kind, EventKind::SockCreate { sock: s, .. } if s == sock))
        .expect("the socket's creation is recorded");
    let end = events[at..]
        .iter()
        .position(|e| matches!(e.kind, EventKind::SockClose { sock: s } if s == sock))
        .map_or(events.len(), |i| at + i);
    let mut t = Template {
        setup: Vec::new(),
        stream: Vec::new(),
        local,
        remote,
    };
    for e in &events[start..end] {
        let mine = match &e.kind {
            EventKind::Packet(p) => match p.dir {
                PacketDir::Egress => p.src == local && p.dst == remote,
                PacketDir::Ingress => p.src == remote && p.dst == local,
            },
            k => sock_of(k) == Some(sock),
        };
        if !mine {
            continue;
        }
        if t.stream.is_empty() && !matches!(e.kind, EventKind::Packet(_)) {
            t.setup.push(e.clone());
        } else {
            t.stream.push(e.clone());
        }
    }
    t
}

/// The first recorded TCP connection to the churn workload's HTTP server.
fn tcp_template() -> Template {
    let d = recording("churn");
    let (at, sock, local, remote) = d
        .events
        .iter()
        .enumerate()
        .find_map(|(i, e)| match e.kind {
            EventKind::TcpConnect {
                sock,
                local,
                remote,
            } if remote.port() == HTTP_PORT => Some((i, sock, local, remote)),
            _ => None,
        })
        .expect("a connection to the HTTP server");
    template(&d.events, at, sock, local, remote)
}

/// The first recorded connected IPv4 UDP client of the echo server: its
/// first send without a destination address.
fn udp_template() -> Template {
    let d = recording("flows");
    let (at, sock) = d
        .events
        .iter()
        .enumerate()
        .find_map(|(i, e)| match e.kind {
            EventKind::SockActivity {
                sock,
                transport: Transport::Udp,
                op: SockOp::Send,
                peer: None,
            } => d.events[i..].iter().find_map(|p| match &p.kind {
                EventKind::Packet(pk)
                    if pk.sock == Some(sock)
                        && pk.dir == PacketDir::Egress
                        && pk.dst.port() == UDP_ECHO_PORT
                        && pk.dst.is_ipv4() =>
                {
                    Some((i, sock))
                }
                _ => None,
            }),
            _ => None,
        })
        .expect("a connected UDP client of the echo server");
    let first = d.events[at..]
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::Packet(p) if p.sock == Some(sock) => Some(*p),
            _ => None,
        })
        .expect("its first datagram");
    template(&d.events, at, sock, first.src, first.dst)
}

/// Local and remote endpoint of flow `i`: distinct for every flow.
fn endpoints(i: usize) -> (SocketAddr, SocketAddr) {
    let i = u32::try_from(i).expect("flow count fits u32");
    let local = SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        10_000 + (i % 50_000) as u16,
    );
    let remote = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + i / 50_000)), 443);
    (local, remote)
}

/// What the rewrite must keep of a decoded event: everything but
/// addresses, ports, socket ids and time.
fn shape(e: &Event) -> String {
    match &e.kind {
        EventKind::Packet(p) => format!(
            "packet {:?} {:?} sock:{} len {} task {:?} cpu {}",
            p.dir,
            p.transport,
            p.sock.is_some(),
            p.ip_len,
            e.task,
            e.cpu
        ),
        k => {
            let name = format!("{k:?}");
            format!(
                "{} task {:?} cpu {}",
                name.split([' ', '{', '(']).next().unwrap_or(""),
                e.task,
                e.cpu
            )
        }
    }
}

/// Rewrites a template event for flow `i`: its endpoints become
/// [`endpoints`]`(i)`, each recorded socket id a distinct new one.
struct Rewrite<'a> {
    t: &'a Template,
    socks: HashMap<u64, u64>,
}

impl<'a> Rewrite<'a> {
    fn new(t: &'a Template) -> Self {
        let mut socks = HashMap::new();
        for e in t.setup.iter().chain(&t.stream) {
            let s = match &e.kind {
                EventKind::Packet(p) => p.sock,
                k => sock_of(k),
            };
            if let Some(s) = s {
                let n = socks.len() as u64;
                socks.entry(s).or_insert(n);
            }
        }
        Rewrite { t, socks }
    }

    fn apply(&self, e: &Event, i: usize, time: u64) -> Event {
        let (local, remote) = endpoints(i);
        let addr = |a: SocketAddr| {
            if a == self.t.local {
                local
            } else if a == self.t.remote {
                remote
            } else {
                panic!("address {a} of neither end of the template")
            }
        };
        let sock = |s: u64| {
            SOCK_BASE + (i as u64 * self.socks.len() as u64 + self.socks[&s]) * SOCK_STRIDE
        };
        let kind = match &e.kind {
            EventKind::Packet(p) => EventKind::Packet(Packet {
                sock: p.sock.map(sock),
                src: addr(p.src),
                dst: addr(p.dst),
                ..*p
            }),
            EventKind::SockCreate { sock: s, transport } => EventKind::SockCreate {
                sock: sock(*s),
                transport: *transport,
            },
            EventKind::TcpConnect {
                sock: s,
                local: l,
                remote: r,
            } => EventKind::TcpConnect {
                sock: sock(*s),
                local: addr(*l),
                remote: addr(*r),
            },
            EventKind::SockActivity {
                sock: s,
                transport,
                op,
                peer,
            } => EventKind::SockActivity {
                sock: sock(*s),
                transport: *transport,
                op: *op,
                peer: peer.map(addr),
            },
            EventKind::UdpRecv { sock: s, local: l } => EventKind::UdpRecv {
                sock: sock(*s),
                local: if l.ip().is_unspecified() {
                    SocketAddr::new(l.ip(), local.port())
                } else {
                    addr(*l)
                },
            },
            other => panic!("unexpected template event {other:?}"),
        };
        let out = Event {
            time,
            cpu: e.cpu,
            task: e.task,
            kind,
        };
        assert_eq!(shape(&out), shape(e), "the rewrite keeps the decoded shape");
        out
    }
}

/// Builds `n` live flows from the template of `transport`; returns the
/// engine and one round of packet events over them.
fn setup(n: usize, transport: Transport) -> (Engine<OffsetClock>, Vec<Event>) {
    let t = match transport {
        Transport::Tcp => tcp_template(),
        Transport::Udp => udp_template(),
    };
    let rw = Rewrite::new(&t);
    let packets: Vec<&Event> = t
        .stream
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Packet(_)))
        .collect();
    let egress = packets
        .iter()
        .filter(|e| matches!(&e.kind, EventKind::Packet(p) if p.dir == PacketDir::Egress))
        .count();
    assert!(
        egress > 0 && egress < packets.len(),
        "the template has packets both ways"
    );
    let mut e = engine(n);
    let mut out = Vec::new();
    let mut time = 0u64;
    for i in 0..n {
        for ev in &t.setup {
            time += 1;
            e.handle(&rw.apply(ev, i, time), &mut out);
        }
    }
    // The packets of every flow, round-robin; the socket events between
    // them (sends, receives) are applied once here, not measured.
    let mut events = Vec::with_capacity(packets.len() * n);
    for ev in &t.stream {
        for i in 0..n {
            time += 1;
            let r = rw.apply(ev, i, time);
            if matches!(ev.kind, EventKind::Packet(_)) {
                events.push(r);
            } else {
                e.handle(&r, &mut out);
            }
        }
    }
    // Warm: creates the flows, so the measured loop only updates.
    for ev in &events {
        e.handle(ev, &mut out);
    }
    assert_eq!(e.stats().flows, n, "every flow live: {:?}", e.stats());
    assert!(out.is_empty(), "no record while warming: {out:?}");
    (e, events)
}

fn bench_updates(c: &mut Criterion) {
    for transport in [Transport::Tcp, Transport::Udp] {
        let mut g = c.benchmark_group(format!("flow_update/{}", transport.as_str()));
        for (n, label) in SIZES {
            let (mut e, events) = setup(n, transport);
            let mut out = Vec::new();
            g.throughput(Throughput::Elements(events.len() as u64));
            g.bench_function(label, |b| {
                b.iter(|| {
                    for ev in &events {
                        e.handle(black_box(ev), &mut out);
                    }
                    assert!(out.is_empty());
                })
            });
            g.bench_function(format!("{label}/batch"), |b| {
                b.iter(|| {
                    e.handle_batch(black_box(&events), &mut out);
                    assert!(out.is_empty());
                })
            });
            black_box(e.stats());
        }
        g.finish();
    }
}

fn bench_replay(c: &mut Criterion) {
    let d = recording("churn");
    let mut g = c.benchmark_group("flow_replay");
    g.throughput(Throughput::Elements(d.events.len() as u64));
    g.bench_function("churn", |b| {
        b.iter_batched(
            || (engine(1024), Vec::<Output>::with_capacity(1024)),
            |(mut e, mut out)| {
                e.handle_batch(black_box(&d.events), &mut out);
                e.flush(&mut out);
                (e.stats().flows_created, out.len())
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
    let mut e = engine(1024);
    let mut out = Vec::new();
    e.handle_batch(&d.events, &mut out);
    e.flush(&mut out);
    println!(
        "replay of {FIXTURE_KERNEL}/churn: {} events, {} flows created, {} records",
        d.events.len(),
        e.stats().flows_created,
        out.len()
    );
}

/// Decode + flow engine on the raw samples of the churn recording, as the
/// reader and engine threads do it (decoding into batches of events, the
/// engine handling each batch), without reading the file.
fn bench_decode_and_engine(c: &mut Criterion) {
    let path = replay::recorded_dir()
        .join(FIXTURE_KERNEL)
        .join("churn.rec");
    let (dec, samples) = replay::raw_samples(&path).unwrap_or_else(|e| panic!("{e}"));
    let mut g = c.benchmark_group("decode_and_engine");
    g.throughput(Throughput::Elements(samples.len() as u64));
    g.bench_function("churn", |b| {
        b.iter_batched(
            || (engine(1024), Vec::<Output>::with_capacity(1024)),
            |(mut e, mut out)| {
                let mut batch: Vec<Event> = Vec::with_capacity(DECODE_BATCH);
                for chunk in samples.chunks(DECODE_BATCH) {
                    batch.clear();
                    for s in chunk {
                        if let Ok(Some(ev)) = dec.decode(&s.raw()) {
                            batch.push(ev);
                        }
                    }
                    e.handle_batch(&batch, &mut out);
                }
                e.flush(&mut out);
                (e.stats().flows_created, out.len())
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn memory_report() {
    let before = rss_kib();
    let (e, events) = setup(MEMORY_SOCKETS, Transport::Tcp);
    let after = rss_kib();
    let events_kib = (events.capacity() * std::mem::size_of::<Event>() / 1024) as u64;
    let per_sock_est = e.memory_bytes() / MEMORY_SOCKETS;
    let per_sock_rss =
        (after.saturating_sub(before).saturating_sub(events_kib)) * 1024 / MEMORY_SOCKETS as u64;
    let parts: Vec<String> = e
        .memory_parts()
        .iter()
        .filter(|(_, b)| b / MEMORY_SOCKETS > 0)
        .map(|(name, b)| format!("{name} {}", b / MEMORY_SOCKETS))
        .collect();
    println!(
        "memory per tracked TCP socket with one flow ({MEMORY_SOCKETS} sockets): \
         {per_sock_est} B by size accounting ({}), {per_sock_rss} B by RSS growth",
        parts.join(", ")
    );
}

/// Thread CPU time in seconds.
fn cpu_seconds() -> f64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .expect("clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec() as f64 + ts.tv_nsec() as f64 * 1e-9
}

/// CPU seconds spent per size in the per-core figure.
const CPU_BUDGET_SECONDS: f64 = 1.0;

/// Events per CPU-second of this thread: unlike wall-clock criterion
/// figures, not inflated when other processes share the cores.
fn cpu_throughput_report() {
    for transport in [Transport::Tcp, Transport::Udp] {
        for (n, label) in SIZES {
            let (mut e, events) = setup(n, transport);
            let created = e.stats().flows_created;
            let mut out = Vec::new();
            for batch in [false, true] {
                let start = cpu_seconds();
                let mut handled = 0u64;
                while cpu_seconds() - start < CPU_BUDGET_SECONDS {
                    if batch {
                        e.handle_batch(black_box(&events), &mut out);
                    } else {
                        for ev in &events {
                            e.handle(black_box(ev), &mut out);
                        }
                    }
                    handled += events.len() as u64;
                }
                let rate = handled as f64 / (cpu_seconds() - start);
                let st = e.stats();
                assert_eq!(
                    (st.flows, st.flows_created),
                    (n, created),
                    "the measured loop only updates live flows: {st:?}"
                );
                assert!(out.is_empty(), "no record while measuring");
                println!(
                    "per-core throughput {}/{label}{}: {:.1} M events per CPU-second",
                    transport.as_str(),
                    if batch { "/batch" } else { "" },
                    rate / 1e6
                );
            }
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench_updates, bench_replay, bench_decode_and_engine
}

/// Prints what one flow of each template is made of.
fn template_report() {
    for (transport, t) in [
        (Transport::Tcp, tcp_template()),
        (Transport::Udp, udp_template()),
    ] {
        let mut kinds: Vec<String> = t
            .stream
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::Packet(p) => Some(format!(
                    "{:?} {}",
                    p.dir,
                    if p.sock.is_some() {
                        "with socket"
                    } else {
                        "by tuple"
                    }
                )),
                _ => None,
            })
            .collect();
        kinds.sort();
        kinds.dedup_by(|a, b| a == b);
        let packets = t
            .stream
            .iter()
            .filter(|e| matches!(e.kind, EventKind::Packet(_)))
            .count();
        println!(
            "{} flow template ({FIXTURE_KERNEL}, {} -> {}): {} setup events, {packets} packets ({})",
            transport.as_str(),
            t.local,
            t.remote,
            t.setup.len(),
            kinds.join(", ")
        );
    }
}

fn main() {
    assert!(
        replay::recorded_dir().join(FIXTURE_KERNEL).is_dir(),
        "recorded fixtures of {FIXTURE_KERNEL} are missing"
    );
    template_report();
    memory_report();
    cpu_throughput_report();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
