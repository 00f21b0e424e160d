//! Ring reader throughput: synthetic per-CPU rings in the in-memory fake
//! kernel, decoded and merged into one ordered stream.
//!
//! * `prefilled`: the rings are filled between measurements, only the
//!   reader's drain + decode + merge is timed (cost per sample on one core).
//! * `producer_thread`: a producer thread keeps the rings full while the
//!   reader runs, as with a busy kernel (reader on one core, producer on
//!   another).

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sockscope::ring::perf_record::{encode_sample, Sample};
use sockscope::ring::{RingItem, RingOptions, Rings, REORDER_SLACK};
use sockscope::sys::fake::{FakeRing, FakeSys};

/// Simulated CPUs.
const CPUS: u32 = 2;
/// Ring size exponent (the default: 512 KiB per CPU).
const RING_EXP: u32 = 7;
/// Raw tracepoint payload per sample (a typical kprobe record).
const RAW_BYTES: usize = 64;
/// Samples written per CPU per fill in `prefilled`.
const FILL_PER_CPU: u64 = 4096;
/// tracefs id of the synthetic event.
const EVENT_ID: u64 = 700;

fn setup() -> (FakeSys, Rings<FakeSys>, Vec<(FakeRing, u64)>) {
    let sys = FakeSys::new();
    let cpus: Vec<u32> = (0..CPUS).collect();
    let rings = Rings::open(
        sys.clone(),
        &[EVENT_ID],
        &cpus,
        &RingOptions {
            ring_size_exponent: RING_EXP,
            wakeup: None,
        },
    )
    .expect("fake rings");
    let events = sys.events();
    let producers = cpus
        .iter()
        .map(|&c| {
            let id = events
                .iter()
                .find(|e| e.cpu == c)
                .map(|e| e.stream_id)
                .expect("event");
            (sys.ring(c).expect("ring"), id)
        })
        .collect();
    (sys, rings, producers)
}

fn record(buf: &mut Vec<u8>, id: u64, time: u64, cpu: u32) {
    buf.clear();
    let raw = [0x5au8; RAW_BYTES];
    encode_sample(
        buf,
        &Sample {
            id,
            pid: 1234,
            tid: 1235,
            time,
            cpu,
            raw: &raw,
        },
    );
}

fn slack_ns() -> u64 {
    REORDER_SLACK.as_nanos() as u64
}

fn prefilled(c: &mut Criterion) {
    let (sys, mut rings, producers) = setup();
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(FILL_PER_CPU * u64::from(CPUS)));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(3));
    let mut t = 0u64;
    let mut buf = Vec::new();
    g.bench_function("prefilled", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                for _ in 0..FILL_PER_CPU {
                    for (cpu, (ring, id)) in producers.iter().enumerate() {
                        t += 1;
                        record(&mut buf, *id, t, cpu as u32);
                        assert!(ring.write(&buf), "ring sized for one fill");
                    }
                }
                sys.set_clock(t + slack_ns() + 1);
                let start = Instant::now();
                let mut n = 0u64;
                rings
                    .drain(&mut |i: RingItem<'_>| {
                        if let RingItem::Sample(s) = i {
                            n += black_box(s.data.len()) as u64 / RAW_BYTES as u64;
                        }
                    })
                    .expect("drain");
                total += start.elapsed();
                assert_eq!(n, FILL_PER_CPU * u64::from(CPUS));
            }
            total
        })
    });
    g.finish();
}

fn producer_thread(c: &mut Criterion) {
    let (sys, mut rings, producers) = setup();
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let stop = stop.clone();
        let sys = sys.clone();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut t = 0u64;
            let mut written = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let mut progressed = false;
                for (cpu, (ring, id)) in producers.iter().enumerate() {
                    record(&mut buf, *id, t + 1, cpu as u32);
                    if ring.write(&buf) {
                        t += 1;
                        written += 1;
                        progressed = true;
                    }
                }
                if written % 256 == 0 || !progressed {
                    sys.set_clock(t + slack_ns() + 1);
                    sys.notify();
                }
                if !progressed {
                    std::thread::yield_now();
                }
            }
        })
    };
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(3));
    g.bench_function("producer_thread", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            let mut n = 0u64;
            while n < iters {
                rings
                    .read(Duration::from_millis(10), &mut |i: RingItem<'_>| {
                        if let RingItem::Sample(s) = i {
                            black_box(s.data);
                            n += 1;
                        }
                    })
                    .expect("read");
            }
            start.elapsed()
        })
    });
    g.finish();
    stop.store(true, Ordering::Relaxed);
    producer.join().expect("producer");
}

criterion_group!(benches, prefilled, producer_thread);
criterion_main!(benches);
