//! Flow engine throughput and memory.
//!
//! * `flow_update/{tcp,udp}/{1k,100k}`: packet events round-robin over
//!   that many live flows (each flow its own socket), alternating egress and
//!   ingress; elements/s is events per second on one core.
//! * Memory per tracked socket (one TCP socket with one flow), printed
//!   before the benchmarks: from the engine's size accounting and from the
//!   growth of the resident set while 100k sockets are built.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, UNIX_EPOCH};

use criterion::{criterion_group, Criterion, Throughput};
use sockscope::enrich::process::{FakeProcSource, ProcessTable, ProcessTableConfig};
use sockscope::enrich::users::UserDb;
use sockscope::flow::{Engine, EngineConfig, OffsetClock};
use sockscope::model::{Event, EventKind, Output, Packet, PacketDir, Task, Transport};

/// Sizes of the live flow sets measured.
const SIZES: [(usize, &str); 2] = [(1_000, "1k"), (100_000, "100k")];
/// Sockets built for the memory figure.
const MEMORY_SOCKETS: usize = 100_000;
/// Base of the fake kernel socket addresses.
const SOCK_BASE: u64 = 0xffff_8880_0000_0000;
/// Size of a fake `struct sock`, spacing the addresses.
const SOCK_STRIDE: u64 = 2048;

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
    };
    let procs = ProcessTable::new(
        Box::new(FakeProcSource::default()),
        UserDb::empty(),
        ProcessTableConfig {
            max_processes: 1024,
            exit_grace: Duration::from_secs(5),
        },
    );
    let mut e = Engine::new(cfg, OffsetClock { base: UNIX_EPOCH }, procs);
    e.reserve(flows);
    e
}

fn endpoints(i: usize) -> (SocketAddr, SocketAddr) {
    let i = u32::try_from(i).expect("flow count fits u32");
    let local = SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        10_000 + (i % 50_000) as u16,
    );
    let remote = SocketAddr::new(IpAddr::V4(Ipv4Addr::from(0x0a01_0000 + i / 50_000)), 443);
    (local, remote)
}

fn sock(i: usize) -> u64 {
    SOCK_BASE + i as u64 * SOCK_STRIDE
}

/// Builds `n` live flows of `transport`; returns the engine and one
/// round of packet events over them.
fn setup(n: usize, transport: Transport) -> (Engine<OffsetClock>, Vec<Event>) {
    let mut e = engine(n);
    let mut out = Vec::new();
    let task = Some(Task {
        pid: 4000,
        tid: 4000,
    });
    let mut events = Vec::with_capacity(2 * n);
    for i in 0..n {
        let (local, remote) = endpoints(i);
        let t = i as u64;
        e.handle(
            &Event {
                time: t,
                cpu: 0,
                task,
                kind: EventKind::SockCreate {
                    sock: sock(i),
                    transport: Some(transport),
                },
            },
            &mut out,
        );
        if transport == Transport::Tcp {
            e.handle(
                &Event {
                    time: t,
                    cpu: 0,
                    task,
                    kind: EventKind::TcpConnect {
                        sock: sock(i),
                        local,
                        remote,
                    },
                },
                &mut out,
            );
        }
    }
    let t0 = n as u64;
    for round in 0..2 {
        for i in 0..n {
            let (local, remote) = endpoints(i);
            let (dir, src, dst) = if round == 0 {
                (PacketDir::Egress, local, remote)
            } else {
                (PacketDir::Ingress, remote, local)
            };
            events.push(Event {
                time: t0 + (round * n + i) as u64,
                cpu: 0,
                task: None,
                kind: EventKind::Packet(Packet {
                    sock: Some(sock(i)),
                    dir,
                    transport,
                    src,
                    dst,
                    ip_len: 100,
                }),
            });
        }
    }
    // Warm: creates the UDP flows, so the measured loop only updates.
    for ev in &events {
        e.handle(ev, &mut out);
    }
    assert_eq!(e.stats().flows, n, "every flow live");
    assert!(out.iter().all(|o| matches!(o, Output::Flow(_))) && out.is_empty());
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
    println!(
        "memory per tracked TCP socket with one flow ({MEMORY_SOCKETS} sockets): \
         {per_sock_est} B by size accounting, {per_sock_rss} B by RSS growth"
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
                    (st.flows, st.flows_created as usize),
                    (n, n),
                    "the measured loop only updates live flows: {st:?}"
                );
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

criterion_group!(benches, bench_updates);

fn main() {
    memory_report();
    cpu_throughput_report();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
