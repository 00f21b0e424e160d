//! Ring reader against the host kernel: real tracepoints, real perf rings.
//!
//! Needs root (or CAP_PERFMON) and tracefs; fails, never skips, when they
//! are missing. The tests share the machine's tracepoints, so they run one
//! at a time and filter on their own threads' ids in the kernel.

use std::cell::{Cell, RefCell};
use std::sync::mpsc;
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime};

use sockscope::ring::clock::{PerfClock, SysClockSource, WallClock};
use sockscope::ring::recording::{RecordHeader, RecordedEvent, Recorder, Replay};
use sockscope::ring::{online_cpus, RingItem, RingOptions, Rings, DEFAULT_POLL_TIMEOUT};
use sockscope::sys;

mod common;

/// Tracepoint fired by `getppid(2)`.
const EVENT: &str = "syscalls/sys_enter_getppid";
/// Ping-pong rounds per CPU in the ordering test.
const ROUNDS: usize = 200;
/// getppid calls in the burst that overflows a one-page ring.
const BURST: usize = 20_000;
/// getppid calls after the overflow.
const AFTER_BURST: usize = 20;
/// Upper bound on waiting for samples.
const DEADLINE: Duration = Duration::from_secs(20);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// tracefs id of [`EVENT`]; mounts tracefs when it is not there.
fn event_id() -> u64 {
    common::require_privileges(true);
    let path = common::tracefs().join("events").join(EVENT).join("id");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (kernel without syscall tracepoints?)",
            path.display()
        )
    });
    text.trim().parse().expect("numeric tracefs event id")
}

fn getppid() {
    std::hint::black_box(std::os::unix::process::parent_id());
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    time: u64,
    cpu: u32,
    pid: u32,
    tid: u32,
}

#[test]
#[ignore = "needs root and tracefs: tests/run-all runs it (cargo test -- --include-ignored)"]
fn samples_from_pinned_threads_arrive_complete_and_in_order() {
    let _g = serial();
    let id = event_id();
    let cpus = online_cpus().expect("online CPUs");
    let n = cpus.len();
    let opts = RingOptions {
        ring_size_exponent: 4,
        wakeup: None,
    };
    let mut rings = Rings::open_real(&[id], &cpus, &opts).expect("opening perf rings");
    assert_eq!(
        rings.clock(),
        PerfClock::Monotonic,
        "kernel accepts use_clockid CLOCK_MONOTONIC"
    );

    // One thread per CPU; a token goes round the ring of threads, each
    // calling getppid before passing it on, so the global order is known.
    let (tid_tx, tid_rx) = mpsc::channel();
    let start = std::sync::Arc::new(Barrier::new(n + 1));
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..n {
        let (tx, rx) = mpsc::channel::<()>();
        senders.push(tx);
        receivers.push(rx);
    }
    let mut handles = Vec::new();
    for (i, rx) in receivers.into_iter().enumerate() {
        let cpu = cpus[i];
        let next = senders[(i + 1) % n].clone();
        let tid_tx = tid_tx.clone();
        let start = start.clone();
        handles.push(std::thread::spawn(move || {
            sys::pin_current_thread(cpu).expect("pinning thread");
            tid_tx.send((i, sys::current_tid())).expect("send tid");
            start.wait();
            for _ in 0..ROUNDS {
                rx.recv().expect("token");
                getppid();
                next.send(()).ok();
            }
        }));
    }
    let mut tids = vec![0u32; n];
    for _ in 0..n {
        let (i, tid) = tid_rx.recv().expect("tid");
        tids[i] = tid;
    }
    let filter = tids
        .iter()
        .map(|t| format!("common_pid == {t}"))
        .collect::<Vec<_>>()
        .join(" || ");
    rings
        .set_filter(0, &filter)
        .expect("setting tracepoint filter");
    start.wait();
    senders[0].send(()).expect("first token");

    let expected = ROUNDS * n;
    let mut seen: Vec<Seen> = Vec::new();
    let mut all_times = Vec::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let rec_path = dir.path().join("live.rec");
    let header = RecordHeader {
        clock: rings.clock().as_str().to_string(),
        events: vec![RecordedEvent::from_tracefs(&common::tracefs(), EVENT).expect("format")],
    };
    let mut recorder = Recorder::create(&rec_path, &header).expect("create recording");
    let deadline = Instant::now() + DEADLINE;
    while seen.len() < expected && Instant::now() < deadline {
        rings
            .read(DEFAULT_POLL_TIMEOUT, &mut |item| {
                recorder.write(&item).expect("record");
                if let RingItem::Sample(s) = item {
                    all_times.push(s.time);
                    if tids.contains(&s.tid) {
                        seen.push(Seen {
                            time: s.time,
                            cpu: s.cpu,
                            pid: s.pid,
                            tid: s.tid,
                        });
                    }
                }
            })
            .expect("reading rings");
    }
    for h in handles {
        h.join().expect("worker");
    }
    let recorded = recorder.items();
    recorder.finish().expect("flush recording");
    let stats = rings.stats();
    assert_eq!(seen.len(), expected, "all samples arrive; stats {stats:?}");
    assert_eq!(stats.total_lost(), 0);
    assert_eq!(stats.total_malformed(), 0);
    assert_eq!(stats.late, 0);
    assert!(
        all_times.windows(2).all(|w| w[0] <= w[1]),
        "merged stream is in timestamp order"
    );
    let me = std::process::id();
    for (k, s) in seen.iter().enumerate() {
        let i = k % n;
        assert_eq!(
            s.tid, tids[i],
            "sample {k} comes from the thread holding the token"
        );
        assert_eq!(s.cpu, cpus[i], "sample {k} taken on the pinned CPU");
        assert_eq!(s.pid, me);
    }
    assert!(seen.windows(2).all(|w| w[0].time < w[1].time));

    // The recording replays the same stream.
    let mut replay = Replay::open(&rec_path).expect("open recording");
    assert_eq!(replay.header(), &header);
    assert!(replay.header().events[0]
        .format
        .contains("sys_enter_getppid"));
    let mut replayed = Vec::new();
    let n_items = replay
        .for_each(|item| {
            if let RingItem::Sample(s) = item {
                if tids.contains(&s.tid) {
                    replayed.push((s.time, s.cpu, s.tid));
                }
            }
        })
        .expect("replay");
    assert_eq!(n_items, recorded);
    let live: Vec<_> = seen.iter().map(|s| (s.time, s.cpu, s.tid)).collect();
    assert_eq!(replayed, live);

    // Timestamps are on CLOCK_MONOTONIC: they convert to about now.
    let wc = WallClock::from_source(
        &mut SysClockSource::new(rings.clock()),
        Duration::from_secs(10),
        Duration::from_millis(100),
    )
    .expect("clock reads")
    .expect("offset");
    let last = wc.to_system_time(seen[seen.len() - 1].time);
    let age = SystemTime::now()
        .duration_since(last)
        .expect("sample in the past");
    assert!(age < DEADLINE, "sample wall time {last:?} is {age:?} old");
}

#[test]
#[ignore = "needs root and tracefs: tests/run-all runs it (cargo test -- --include-ignored)"]
fn a_full_one_page_ring_reports_lost_samples_and_keeps_reading() {
    let _g = serial();
    let id = event_id();
    let cpus = online_cpus().expect("online CPUs");
    let cpu = cpus[0];
    let opts = RingOptions {
        ring_size_exponent: 0,
        wakeup: None,
    };
    let mut rings = Rings::open_real(&[id], &cpus, &opts).expect("opening perf rings");

    let (tid_tx, tid_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<usize>();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let worker = std::thread::spawn(move || {
        sys::pin_current_thread(cpu).expect("pinning thread");
        tid_tx.send(sys::current_tid()).expect("send tid");
        while let Ok(calls) = go_rx.recv() {
            for _ in 0..calls {
                getppid();
            }
            done_tx.send(()).expect("done");
        }
    });
    let tid = tid_rx.recv().expect("tid");
    rings
        .set_filter(0, &format!("common_pid == {tid}"))
        .expect("setting tracepoint filter");

    let samples = Cell::new(0u64);
    let lost = Cell::new(0u64);
    let lost_cpus = RefCell::new(Vec::new());
    let mut on_item = |item: RingItem<'_>| match item {
        RingItem::Sample(s) => {
            assert_eq!(s.tid, tid);
            samples.set(samples.get() + 1);
        }
        RingItem::Lost { cpu, count } => {
            lost.set(lost.get() + count);
            lost_cpus.borrow_mut().push(cpu);
        }
    };

    // Burst without reading: a 4 KiB ring holds a few dozen samples.
    go_tx.send(BURST).expect("go");
    done_rx.recv().expect("burst done");
    rings.drain(&mut on_item).expect("drain");
    // The kernel writes the loss record with the next sample that fits.
    go_tx.send(AFTER_BURST).expect("go");
    done_rx.recv().expect("second batch done");
    let deadline = Instant::now() + DEADLINE;
    let total = (BURST + AFTER_BURST) as u64;
    while samples.get() + lost.get() < total && Instant::now() < deadline {
        rings
            .read(DEFAULT_POLL_TIMEOUT, &mut on_item)
            .expect("read");
    }
    rings.flush(&mut on_item);
    drop(go_tx);
    worker.join().expect("worker");

    let (samples, lost) = (samples.get(), lost.get());
    assert!(lost > 0, "a burst of {BURST} overflows a one-page ring");
    assert!(lost_cpus.borrow().iter().all(|&c| c == cpu));
    assert_eq!(
        samples + lost,
        total,
        "every call is either delivered or counted lost"
    );
    assert!(
        samples >= AFTER_BURST as u64,
        "reading continues after the loss ({samples} samples)"
    );
    let stats = rings.stats();
    assert_eq!(stats.total_lost(), lost);
    assert_eq!(stats.total_malformed(), 0);
}
