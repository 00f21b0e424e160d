//! Ring reader tests against the in-memory fake kernel.

use super::*;
use crate::sys::fake::{FakeRing, FakeSys};

const EVENTS: [u64; 2] = [501, 502];
const MS: u64 = 1_000_000;

fn open(sys: &FakeSys, cpus: &[u32], exp: u32) -> Rings<FakeSys> {
    Rings::open(
        sys.clone(),
        &EVENTS,
        cpus,
        &RingOptions {
            ring_size_exponent: exp,
            wakeup: None,
        },
    )
    .expect("open fake rings")
}

/// Stream id of tracefs event `tp` on `cpu`.
fn id_of(sys: &FakeSys, tp: u64, cpu: u32) -> u64 {
    sys.events()
        .iter()
        .find(|e| e.cpu == cpu && e.config.tracepoint_id == tp)
        .map(|e| e.stream_id)
        .expect("event opened")
}

fn sample(id: u64, time: u64, cpu: u32, raw: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    perf_record::encode_sample(
        &mut b,
        &perf_record::Sample {
            id,
            pid: 40 + cpu,
            tid: 50 + cpu,
            time,
            cpu,
            raw,
        },
    );
    b
}

#[derive(Debug, PartialEq, Eq)]
enum Got {
    S {
        event: u32,
        time: u64,
        cpu: u32,
        pid: u32,
        tid: u32,
        data: Vec<u8>,
    },
    Lost {
        cpu: u32,
        count: u64,
    },
}

fn read_all(r: &mut Rings<FakeSys>) -> Vec<Got> {
    let mut out = Vec::new();
    r.drain(&mut |i: RingItem<'_>| {
        out.push(match i {
            RingItem::Sample(s) => Got::S {
                event: s.event,
                time: s.time,
                cpu: s.cpu,
                pid: s.pid,
                tid: s.tid,
                data: s.data.to_vec(),
            },
            RingItem::Lost { cpu, count } => Got::Lost { cpu, count },
        })
    })
    .expect("drain");
    out
}

fn times(v: &[Got]) -> Vec<u64> {
    v.iter()
        .filter_map(|g| match g {
            Got::S { time, .. } => Some(*time),
            Got::Lost { .. } => None,
        })
        .collect()
}

fn ring(sys: &FakeSys, cpu: u32) -> FakeRing {
    sys.ring(cpu).expect("ring mapped")
}

#[test]
fn opens_one_event_per_id_and_cpu_and_cleans_up() {
    let sys = FakeSys::new();
    let r = open(&sys, &[0, 1], 2);
    let evs = sys.events();
    assert_eq!(evs.len(), 4);
    assert!(evs.iter().all(|e| e.enabled));
    assert!(evs
        .iter()
        .all(|e| e.config.sample_type == perf_record::SAMPLE_TYPE));
    assert!(evs
        .iter()
        .all(|e| e.config.clockid == Some(libc::CLOCK_MONOTONIC)));
    // 4 pages of 4 KiB, woken at a quarter.
    assert!(evs.iter().all(|e| e.config.wakeup == Wakeup::Bytes(4096)));
    // The second event of each CPU writes into the first one's ring.
    for cpu in [0, 1] {
        let on_cpu: Vec<_> = evs.iter().filter(|e| e.cpu == cpu).collect();
        assert_eq!(on_cpu.len(), 2);
        assert_eq!(on_cpu[1].output, on_cpu[0].output);
        assert_eq!(ring(&sys, cpu).data_size(), 4 * 4096);
    }
    assert_eq!(r.clock(), PerfClock::Monotonic);
    assert_eq!(r.cpus(), vec![0, 1]);
    r.set_filter(1, "common_pid != 1").expect("filter");
    assert_eq!(
        sys.events().iter().filter(|e| e.filter.is_some()).count(),
        2
    );
    drop(r);
    assert!(sys.events().iter().all(|e| !e.enabled));
    assert_eq!(sys.closed(), 4);
}

#[test]
fn open_rejects_bad_arguments() {
    let sys = FakeSys::new();
    let opts = RingOptions::default();
    assert!(matches!(
        Rings::open(sys.clone(), &[], &[0], &opts),
        Err(RingError::NoEvents)
    ));
    assert!(matches!(
        Rings::open(sys.clone(), &[1], &[], &opts),
        Err(RingError::NoCpus)
    ));
    let big = RingOptions {
        ring_size_exponent: MAX_RING_SIZE_EXPONENT + 1,
        wakeup: None,
    };
    assert!(matches!(
        Rings::open(sys, &[1], &[0], &big),
        Err(RingError::RingSize { .. })
    ));
}

#[test]
fn clock_falls_back_on_einval() {
    let sys = FakeSys::new();
    sys.reject_clock(libc::CLOCK_MONOTONIC);
    let r = open(&sys, &[0], 0);
    assert_eq!(r.clock(), PerfClock::Boottime);
    assert!(sys
        .events()
        .iter()
        .all(|e| e.config.clockid == Some(libc::CLOCK_BOOTTIME)));

    let sys = FakeSys::new();
    sys.reject_clock(libc::CLOCK_BOOTTIME);
    sys.reject_clock(libc::CLOCK_MONOTONIC);
    let r = open(&sys, &[0], 0);
    assert_eq!(r.clock(), PerfClock::KernelDefault);
    assert!(sys.events().iter().all(|e| e.config.clockid.is_none()));
}

#[test]
fn routes_by_stream_id_and_updates_tail() {
    let sys = FakeSys::new();
    let mut r = open(&sys, &[0], 0);
    sys.set_clock(1000 * MS);
    let p = ring(&sys, 0);
    assert!(p.write(&sample(id_of(&sys, 501, 0), 10, 0, b"first")));
    assert!(p.write(&sample(id_of(&sys, 502, 0), 11, 0, b"second")));
    let got = read_all(&mut r);
    assert_eq!(got.len(), 2);
    assert!(
        matches!(&got[0], Got::S { event: 0, time: 10, pid: 40, tid: 50, data, .. } if data.starts_with(b"first"))
    );
    assert!(matches!(
        &got[1],
        Got::S {
            event: 1,
            time: 11,
            ..
        }
    ));
    assert_eq!(p.tail(), p.head(), "tail released everything read");
    let st = r.stats();
    assert_eq!(st.cpus[0].samples, 2);
    assert_eq!(st.cpus[0].bytes, p.head());
}

#[test]
fn records_wrapping_the_ring_end_are_reassembled() {
    let sys = FakeSys::new();
    let mut r = open(&sys, &[0], 0);
    sys.set_clock(1000 * MS);
    let p = ring(&sys, 0);
    let id = id_of(&sys, 501, 0);
    let mut expected = Vec::new();
    let mut t = 0;
    // Several passes around a 4 KiB ring with record sizes that do not
    // divide it, so records (and headers' neighbours) straddle the end.
    for round in 0..40u32 {
        for k in 0..5u32 {
            t += 1;
            let raw: Vec<u8> = (0..(100 + 37 * k + round) as usize)
                .map(|i| (i as u32 ^ round ^ k) as u8)
                .collect();
            assert!(p.write(&sample(id, t, 0, &raw)), "space after reads");
            expected.push((t, raw));
        }
        let got = read_all(&mut r);
        assert_eq!(p.tail(), p.head());
        for g in got {
            let Got::S { time, data, .. } = g else {
                panic!("unexpected loss")
            };
            let (et, eraw) = expected.remove(0);
            assert_eq!(time, et);
            assert_eq!(&data[..eraw.len()], &eraw[..], "record at t {et}");
        }
    }
    assert!(expected.is_empty());
    assert!(p.head() > 10 * p.data_size(), "wrapped several times");
    assert_eq!(r.stats().cpus[0].malformed, 0);
}

#[test]
fn lost_records_are_reported_and_counted() {
    let sys = FakeSys::new();
    let mut r = open(&sys, &[0, 1], 0);
    sys.set_clock(1000 * MS);
    let mut lost = Vec::new();
    perf_record::encode_lost(&mut lost, id_of(&sys, 501, 1), 17);
    assert!(ring(&sys, 1).write(&lost));
    assert!(ring(&sys, 1).write(&sample(id_of(&sys, 501, 1), 5, 1, b"after")));
    let got = read_all(&mut r);
    assert_eq!(got[0], Got::Lost { cpu: 1, count: 17 });
    assert_eq!(times(&got), vec![5]);
    let st = r.stats();
    assert_eq!(st.total_lost(), 17);
    assert_eq!(st.cpus[1].lost, 17);
    assert_eq!(st.cpus[0].lost, 0);
}

#[test]
fn malformed_records_are_counted_and_skipped() {
    let sys = FakeSys::new();
    let mut r = open(&sys, &[0], 1);
    sys.set_clock(1000 * MS);
    let p = ring(&sys, 0);
    let id = id_of(&sys, 501, 0);

    // Truncated raw: raw size larger than the record. Skipped by size.
    let mut bad = sample(id, 1, 0, b"abcdefgh1234");
    let raw_size_at = perf_record::HEADER_SIZE + 32;
    bad[raw_size_at..raw_size_at + 4].copy_from_slice(&1000u32.to_ne_bytes());
    assert!(p.write(&bad));
    // Unknown stream id.
    assert!(p.write(&sample(999_999, 2, 0, b"who")));
    // A good one after them.
    assert!(p.write(&sample(id, 3, 0, b"good")));
    let got = read_all(&mut r);
    assert_eq!(times(&got), vec![3]);
    let st = r.stats().cpus[0];
    assert_eq!((st.malformed, st.unknown_id, st.samples), (1, 1, 1));
    assert_eq!(p.tail(), p.head());

    // Size 0: cannot advance; the reader skips to head and carries on.
    let mut zero = sample(id, 4, 0, b"zero");
    zero[6..8].copy_from_slice(&0u16.to_ne_bytes());
    assert!(p.write(&zero));
    assert!(p.write(&sample(id, 5, 0, b"lost to resync")));
    assert!(read_all(&mut r).is_empty());
    assert_eq!(p.tail(), p.head());
    // Size beyond what was published.
    let mut huge = sample(id, 6, 0, b"huge");
    huge[6..8].copy_from_slice(&4000u16.to_ne_bytes());
    assert!(p.write(&huge));
    assert!(read_all(&mut r).is_empty());
    // Unaligned size.
    let mut odd = sample(id, 7, 0, b"odd");
    odd[6..8].copy_from_slice(&13u16.to_ne_bytes());
    assert!(p.write(&odd));
    assert!(read_all(&mut r).is_empty());
    // A head more than a ring ahead of the tail.
    p.set_head(p.tail() + 10 * p.data_size());
    assert!(read_all(&mut r).is_empty());
    assert_eq!(p.tail(), p.head());
    let st = r.stats().cpus[0];
    assert_eq!((st.malformed, st.resyncs), (5, 4));

    // Reading resumes normally.
    assert!(p.write(&sample(id, 8, 0, b"fine")));
    assert_eq!(times(&read_all(&mut r)), vec![8]);
}

#[test]
fn merges_cpus_in_time_order_behind_the_clock_frontier() {
    let sys = FakeSys::new();
    let mut r = open(&sys, &[0, 1, 2], 0);
    let slack = REORDER_SLACK.as_nanos() as u64;
    let (p0, p1) = (ring(&sys, 0), ring(&sys, 1));
    let (a, b) = (id_of(&sys, 501, 0), id_of(&sys, 502, 1));
    // connect on CPU 0, then send on CPU 1, interleaved with CPU 0 work.
    for t in [100, 300, 500] {
        assert!(p0.write(&sample(a, t * MS, 0, b"c0")));
    }
    for t in [200, 400, 600] {
        assert!(p1.write(&sample(b, t * MS, 1, b"c1")));
    }
    // Now = 450 ms: only samples up to 450 − slack may go.
    sys.set_clock(450 * MS);
    let got = read_all(&mut r);
    assert_eq!(times(&got), vec![100 * MS, 200 * MS, 300 * MS, 400 * MS]);
    assert!(450 * MS - slack >= 400 * MS);
    assert_eq!(r.stats().pending, 2);
    // A sample stamped 410 ms shows up late on CPU 2 (still within slack
    // of the previous pass's clock): it is ordered before 500.
    assert!(ring(&sys, 2).write(&sample(id_of(&sys, 501, 2), 410 * MS, 2, b"c2")));
    sys.set_clock(10_000 * MS);
    let got = read_all(&mut r);
    assert_eq!(times(&got), vec![410 * MS, 500 * MS, 600 * MS]);
    assert!(matches!(
        got[1],
        Got::S {
            cpu: 0,
            event: 0,
            ..
        }
    ));
    assert!(matches!(
        got[2],
        Got::S {
            cpu: 1,
            event: 1,
            ..
        }
    ));
    assert_eq!(r.stats().late, 0);
    assert_eq!(r.stats().pending, 0);
}

#[test]
fn samples_behind_an_already_released_one_are_late_but_delivered() {
    let sys = FakeSys::new();
    let mut r = open(&sys, &[0, 1], 0);
    assert!(ring(&sys, 0).write(&sample(id_of(&sys, 501, 0), 500 * MS, 0, b"x")));
    sys.set_clock(1000 * MS);
    assert_eq!(times(&read_all(&mut r)), vec![500 * MS]);
    assert!(ring(&sys, 1).write(&sample(id_of(&sys, 501, 1), 400 * MS, 1, b"y")));
    assert_eq!(times(&read_all(&mut r)), vec![400 * MS]);
    assert_eq!(r.stats().late, 1);
}

#[test]
fn without_a_readable_clock_idle_cpus_do_not_block_and_active_ones_bound() {
    let sys = FakeSys::new();
    sys.reject_clock(libc::CLOCK_BOOTTIME);
    sys.reject_clock(libc::CLOCK_MONOTONIC);
    let mut r = open(&sys, &[0, 1], 0);
    let (p0, p1) = (ring(&sys, 0), ring(&sys, 1));
    let (a, b) = (id_of(&sys, 501, 0), id_of(&sys, 501, 1));
    for t in [10, 30, 50] {
        assert!(p0.write(&sample(a, t, 0, b"")));
    }
    assert!(p1.write(&sample(b, 20, 1, b"")));
    // CPU 1's newest is 20: only up to 20 may go.
    assert_eq!(times(&read_all(&mut r)), vec![10, 20]);
    assert!(p1.write(&sample(b, 40, 1, b"")));
    assert_eq!(times(&read_all(&mut r)), vec![30, 40]);
    // CPU 1 goes idle; after the holdback it stops holding CPU 0 back.
    std::thread::sleep(IDLE_HOLDBACK + Duration::from_millis(20));
    assert!(p0.write(&sample(a, 60, 0, b"")));
    assert_eq!(times(&read_all(&mut r)), vec![50, 60]);
    let mut rest = Vec::new();
    r.flush(&mut |i: RingItem<'_>| {
        if let RingItem::Sample(s) = i {
            rest.push(s.time)
        }
    });
    assert!(rest.is_empty());
}

#[test]
fn read_waits_for_data_and_returns_on_timeout() {
    let sys = FakeSys::new();
    let mut r = open(&sys, &[0], 0);
    sys.set_clock(1000 * MS);
    let start = Instant::now();
    let n = r
        .read(Duration::from_millis(30), &mut |_: RingItem<'_>| {})
        .expect("read");
    assert_eq!(n, 0);
    assert!(start.elapsed() >= Duration::from_millis(30));
    let p = ring(&sys, 0);
    let id = id_of(&sys, 501, 0);
    let producer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        assert!(p.write(&sample(id, 5, 0, b"wake")));
        p.notify();
    });
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while got == 0 && Instant::now() < deadline {
        r.read(Duration::from_secs(5), &mut |i: RingItem<'_>| {
            if matches!(i, RingItem::Sample(_)) {
                got += 1
            }
        })
        .expect("read");
    }
    producer.join().expect("producer");
    assert_eq!(got, 1);
}

#[test]
fn cpu_lists_parse() {
    assert_eq!(parse_cpu_list("0-3,5,7-8\n"), Ok(vec![0, 1, 2, 3, 5, 7, 8]));
    assert_eq!(parse_cpu_list("0"), Ok(vec![0]));
    assert_eq!(parse_cpu_list(""), Ok(vec![]));
    assert_eq!(parse_cpu_list("2,1,1-2"), Ok(vec![1, 2]));
    assert!(parse_cpu_list("3-1").is_err());
    assert!(parse_cpu_list("a").is_err());
    assert!(parse_cpu_list("0-").is_err());
    assert!(parse_cpu_list("0-99999999").is_err());
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("online");
    std::fs::write(&f, "0-1,4\n").expect("write");
    assert_eq!(online_cpus_from(&f).expect("parse"), vec![0, 1, 4]);
    std::fs::write(&f, "\n").expect("write");
    assert!(online_cpus_from(&f).is_err());
    assert!(online_cpus_from(&dir.path().join("missing")).is_err());
}

#[test]
fn real_rings_can_move_to_a_reader_thread() {
    fn assert_send<T: Send>() {}
    assert_send::<Rings<RealSys>>();
    assert_send::<Rings<FakeSys>>();
}
