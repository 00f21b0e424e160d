//! k-way merge of per-CPU sample streams into one timestamp-ordered stream.
//!
//! Each CPU's samples are copied out of its perf ring (so the kernel can
//! reuse the space at once) into a per-CPU byte arena and a queue of
//! headers kept sorted by time. Within one ring the order is almost sorted:
//! an interrupt can nest inside a sample being written and reserve its
//! (later-stamped) record first, so insertion scans from the back, which is
//! O(1) in the common case.
//!
//! [`Merger::release`] emits, in timestamp order across CPUs, every queued
//! sample whose time is at or before a *frontier* chosen by the caller (see
//! `ring::Rings::read` for how it is computed). A binary heap over the
//! heads of the CPU queues gives O(log CPUs) per sample. Arenas are reused
//! and compacted once at least half of their bytes are released, so steady
//! state does not allocate.
//!
//! A sample that arrives with a time before something already released
//! (the frontier guess was too optimistic) is still delivered, at the next
//! release, and counted as late.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use crate::model::RawSample;

/// Arenas smaller than this are never compacted (only cleared when empty).
const COMPACT_MIN_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, Copy)]
struct Pending {
    time: u64,
    event: u32,
    cpu: u32,
    pid: u32,
    tid: u32,
    off: usize,
    len: usize,
}

#[derive(Debug, Default)]
struct CpuQueue {
    pending: VecDeque<Pending>,
    arena: Vec<u8>,
    spare: Vec<u8>,
    live_bytes: usize,
}

impl CpuQueue {
    fn compact(&mut self) {
        if self.pending.is_empty() {
            self.arena.clear();
            self.live_bytes = 0;
            return;
        }
        if self.arena.len() < COMPACT_MIN_BYTES || self.live_bytes * 2 > self.arena.len() {
            return;
        }
        self.spare.clear();
        for p in self.pending.iter_mut() {
            let new_off = self.spare.len();
            self.spare
                .extend_from_slice(&self.arena[p.off..p.off + p.len]);
            p.off = new_off;
        }
        std::mem::swap(&mut self.arena, &mut self.spare);
        self.spare.clear();
    }
}

/// Per-CPU reorder queues and the merge over them.
#[derive(Debug, Default)]
pub struct Merger {
    queues: Vec<CpuQueue>,
    heap: BinaryHeap<Reverse<(u64, usize)>>,
    last_released: u64,
    late: u64,
    pending: usize,
}

impl Merger {
    /// A merger over `queues` CPU streams (indices `0..queues`).
    pub fn new(queues: usize) -> Merger {
        Merger {
            queues: (0..queues).map(|_| CpuQueue::default()).collect(),
            ..Merger::default()
        }
    }

    /// Queues one sample of stream `queue`, copying `data`.
    /// Out-of-range queues are ignored.
    pub fn push(&mut self, queue: usize, s: &RawSample<'_>) {
        let Some(q) = self.queues.get_mut(queue) else {
            return;
        };
        if s.time < self.last_released {
            self.late += 1;
        }
        let off = q.arena.len();
        q.arena.extend_from_slice(s.data);
        q.live_bytes += s.data.len();
        let p = Pending {
            time: s.time,
            event: s.event,
            cpu: s.cpu,
            pid: s.pid,
            tid: s.tid,
            off,
            len: s.data.len(),
        };
        let mut at = q.pending.len();
        while at > 0 && q.pending[at - 1].time > s.time {
            at -= 1;
        }
        q.pending.insert(at, p);
        self.pending += 1;
    }

    /// Emits every queued sample with time `<= frontier`, in time order
    /// (ties: lower queue index first, then arrival order). Returns how many
    /// were emitted.
    pub fn release(&mut self, frontier: u64, emit: &mut impl FnMut(RawSample<'_>)) -> u64 {
        self.heap.clear();
        for (i, q) in self.queues.iter().enumerate() {
            if let Some(p) = q.pending.front() {
                if p.time <= frontier {
                    self.heap.push(Reverse((p.time, i)));
                }
            }
        }
        let mut n = 0;
        while let Some(Reverse((_, i))) = self.heap.pop() {
            let q = &mut self.queues[i];
            let Some(p) = q.pending.pop_front() else {
                continue;
            };
            emit(RawSample {
                event: p.event,
                time: p.time,
                cpu: p.cpu,
                pid: p.pid,
                tid: p.tid,
                data: &q.arena[p.off..p.off + p.len],
            });
            q.live_bytes -= p.len;
            self.last_released = self.last_released.max(p.time);
            n += 1;
            if let Some(next) = q.pending.front() {
                if next.time <= frontier {
                    self.heap.push(Reverse((next.time, i)));
                }
            }
        }
        self.pending -= n as usize;
        for q in &mut self.queues {
            q.compact();
        }
        n
    }

    /// Emits everything queued, in time order.
    pub fn flush(&mut self, emit: &mut impl FnMut(RawSample<'_>)) -> u64 {
        self.release(u64::MAX, emit)
    }

    /// Emits the oldest samples until at most `max` remain queued.
    pub fn shed(&mut self, max: usize, emit: &mut impl FnMut(RawSample<'_>)) -> u64 {
        let mut n = 0;
        while self.pending > max {
            let oldest = self
                .queues
                .iter()
                .filter_map(|q| q.pending.front().map(|p| p.time))
                .min();
            match oldest {
                Some(t) => n += self.release(t, emit),
                None => break,
            }
        }
        n
    }

    /// Samples queued and not yet emitted.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Samples that arrived after a later sample had already been emitted.
    pub fn late(&self) -> u64 {
        self.late
    }

    /// Time of the newest sample emitted so far.
    pub fn last_released(&self) -> u64 {
        self.last_released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(time: u64, cpu: u32, data: &[u8]) -> RawSample<'_> {
        RawSample {
            event: 0,
            time,
            cpu,
            pid: 1,
            tid: 2,
            data,
        }
    }

    fn collect(m: &mut Merger, frontier: u64) -> Vec<(u64, u32, Vec<u8>)> {
        let mut out = Vec::new();
        m.release(frontier, &mut |r: RawSample<'_>| {
            out.push((r.time, r.cpu, r.data.to_vec()))
        });
        out
    }

    #[test]
    fn merges_across_cpus_up_to_the_frontier() {
        let mut m = Merger::new(2);
        m.push(0, &s(10, 0, b"a"));
        m.push(0, &s(30, 0, b"c"));
        m.push(1, &s(20, 1, b"b"));
        m.push(1, &s(40, 1, b"d"));
        let first = collect(&mut m, 25);
        assert_eq!(first, vec![(10, 0, b"a".to_vec()), (20, 1, b"b".to_vec())]);
        assert_eq!(m.pending(), 2);
        let rest = collect(&mut m, u64::MAX);
        assert_eq!(rest.iter().map(|r| r.0).collect::<Vec<_>>(), vec![30, 40]);
        assert_eq!(rest[1].2, b"d");
        assert_eq!(m.late(), 0);
    }

    #[test]
    fn nested_out_of_order_samples_within_a_cpu_are_sorted() {
        let mut m = Merger::new(1);
        for t in [5, 9, 7, 8, 6] {
            m.push(0, &s(t, 0, &[t as u8]));
        }
        let out = collect(&mut m, 100);
        assert_eq!(
            out.iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![5, 6, 7, 8, 9]
        );
        assert!(out.iter().all(|r| r.2 == vec![r.0 as u8]));
    }

    #[test]
    fn late_samples_are_delivered_and_counted() {
        let mut m = Merger::new(2);
        m.push(0, &s(100, 0, b"x"));
        assert_eq!(collect(&mut m, 150).len(), 1);
        m.push(1, &s(90, 1, b"late"));
        assert_eq!(m.late(), 1);
        let out = collect(&mut m, 150);
        assert_eq!(out, vec![(90, 1, b"late".to_vec())]);
    }

    #[test]
    fn arena_compaction_keeps_data_intact() {
        let mut m = Merger::new(1);
        let mut t = 0u64;
        let mut next_expected = 0u64;
        for round in 0..50 {
            for _ in 0..1000 {
                t += 1;
                m.push(0, &s(t, 0, &t.to_ne_bytes()));
            }
            // Release all but the newest 100 each round.
            let out = collect(&mut m, t - 100);
            for r in &out {
                next_expected += 1;
                assert_eq!(r.0, next_expected, "round {round}");
                assert_eq!(r.2, r.0.to_ne_bytes().to_vec());
            }
        }
        assert!(
            m.queues[0].arena.len() < COMPACT_MIN_BYTES + 2 * 1000 * 8,
            "arena was compacted"
        );
        let out = collect(&mut m, u64::MAX);
        assert_eq!(out.len(), 100);
        assert_eq!(out.last().map(|r| r.0), Some(t));
    }

    #[test]
    fn shed_bounds_the_queue() {
        let mut m = Merger::new(2);
        for t in 0..10 {
            m.push((t % 2) as usize, &s(t, (t % 2) as u32, b"z"));
        }
        let mut times = Vec::new();
        m.shed(4, &mut |r: RawSample<'_>| times.push(r.time));
        assert_eq!(times, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(m.pending(), 4);
    }
}
