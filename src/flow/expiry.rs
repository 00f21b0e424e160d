//! Timers and expiry: the deadline heaps of flows, sockets and embryonic
//! entries, eviction from full tables, and shutdown.
//!
//! Each heap entry is (deadline, slot, identity); an entry whose slot has a
//! new occupant is stale and skipped (lazy invalidation), and a flow's or
//! socket's deadline is re-checked when it comes due, so work is
//! proportional to what comes due. [`Engine::tick`] handles deadlines in
//! time order across the heaps: a flow inactive for `flow_inactive_timeout`
//! becomes final, a changed long-lived flow emits an interim record every
//! `flow_update_interval`, a closed socket ends `flow_termination_timeout`
//! after its close and an idle one after `socket_inactive_timeout`. Heaps
//! are compacted when stale entries outnumber live items by
//! [`HEAP_SLACK_FACTOR`]. Eviction takes the earliest deadline, giving a
//! flow active since it was scheduled a second chance.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::keys::Due;
use super::records::EvictionLoss;
use super::slab::Slab;
use super::{Clock, Engine};
use crate::model::{Accounting, KernelTime, Output};

/// A timer heap is compacted when it holds more than this many entries per
/// live flow (plus [`HEAP_SLACK_MIN`]).
pub(super) const HEAP_SLACK_FACTOR: usize = 3;
/// Entries a timer heap may hold beyond the slack factor before compaction.
pub(super) const HEAP_SLACK_MIN: usize = 4096;

/// How many live candidates a flow eviction examines before taking one.
const EVICTION_PROBES: usize = 8;

impl<C: Clock> Engine<C> {
    /// Advances time to `now`: expires flows, sockets, embryonic entries and
    /// exited processes, emits interim records and pending loss notices.
    pub fn tick(&mut self, now: KernelTime, out: &mut Vec<Output>) {
        // Deadlines are handled in time order across the three heaps, so a
        // socket closed at 6 s ends its flows before their 11 s update.
        loop {
            let next = |h: &BinaryHeap<Due>| h.peek().map_or(u64::MAX, |Reverse(d)| d.0);
            let (f, e, s) = (
                next(&self.flow_due),
                next(&self.embryo_due),
                next(&self.sock_due),
            );
            let min = f.min(e).min(s);
            if min > now || min == u64::MAX {
                break;
            }
            if min == s {
                if let Some(Reverse((_, slot, gen))) = self.sock_due.pop() {
                    self.fire_socket(slot, gen, now, out);
                }
            } else if min == e {
                if let Some(Reverse((_, slot, id))) = self.embryo_due.pop() {
                    self.fire_embryo(slot, id, out);
                }
            } else if let Some(Reverse((_, slot, id))) = self.flow_due.pop() {
                self.fire_flow(slot, id, now, out);
            }
        }
        self.expire_parked(now);
        self.procs.expire(now);
        self.dns_tick(now);
        self.note_process_evictions(now);
        self.flush_losses(out);
    }

    fn fire_flow(&mut self, f: u32, id: u64, now: KernelTime, out: &mut Vec<Output>) {
        let Some(fl) = self.flows.get_mut(f).filter(|fl| fl.id == id) else {
            return; // stale
        };
        let waits_for_counters = fl.accounting == Accounting::Uncounted;
        if fl.last.saturating_add(self.inactive) <= now {
            let open = self
                .sockets
                .get(fl.sock)
                .is_some_and(|so| so.closed_at.is_none());
            if !(waits_for_counters && open) {
                self.finish_flow(f, out);
                return;
            }
            // Socket-counter accounting: an open connection is silent
            // between its open and its close; it ends with its socket.
            fl.sched_last = fl.last;
            self.flow_due
                .push(Reverse((now.saturating_add(self.inactive), f, id)));
            return;
        }
        let mut interim = false;
        if fl.next_update <= now {
            let point = fl.next_update;
            while fl.next_update <= now {
                fl.next_update = fl.next_update.saturating_add(self.update);
            }
            // Long-lived: changed since the last record and still active in
            // the interval that just ended.
            interim = low32(fl.packets()) != fl.reported_packets
                && fl.last.saturating_add(self.update) > point;
        }
        fl.sched_last = fl.last;
        let next = fl.last.saturating_add(self.inactive).min(fl.next_update);
        let sock = fl.sock;
        self.flow_due.push(Reverse((next, f, id)));
        let closing = self
            .sockets
            .get(sock)
            .is_some_and(|so| so.closed_at.is_some());
        if interim && !closing {
            self.interim(f, out);
        }
    }

    fn fire_socket(&mut self, s: u32, gen: u64, now: KernelTime, out: &mut Vec<Output>) {
        let Some(so) = self.sockets.get(s).filter(|so| so.gen == gen) else {
            return; // stale
        };
        if let Some(closed) = so.closed_at {
            let mut at = closed.saturating_add(self.termination);
            if at <= now && self.awaits_counters(s) {
                // The connection may still be closing (FIN retransmitted,
                // the peer slow to close): wait for its counters up to the
                // socket inactivity timeout after the release.
                at = closed.saturating_add(self.sock_inactive.max(self.termination));
            }
            if at <= now {
                self.end_socket(s, out);
            } else {
                self.sock_due.push(Reverse((at, s, gen)));
            }
            return;
        }
        let mut last = so.last;
        let mut f = so.first_flow;
        while let Some(fl) = self.flows.get(f) {
            last = last.max(fl.last);
            f = fl.next;
        }
        if self.awaits_counters(s) {
            // An open connection counted by its socket is silent.
            last = last.max(now);
        }
        let at = last.saturating_add(self.sock_inactive);
        if at <= now {
            self.stats.sockets_expired += 1;
            self.end_socket(s, out);
        } else {
            self.sock_due.push(Reverse((at, s, gen)));
        }
    }

    /// Whether socket `s` has a TCP flow still waiting for the socket's
    /// counters (socket-counter accounting).
    fn awaits_counters(&self, s: u32) -> bool {
        let Some(so) = self.sockets.get(s) else {
            return false;
        };
        self.flows
            .get(so.tcp_flow)
            .is_some_and(|fl| fl.accounting == Accounting::Uncounted)
    }

    /// Drops stale timer entries (of removed flows, sockets and embryonic
    /// entries). Called when a heap holds several times more entries than
    /// live items, so the cost is amortised over the insertions that made
    /// the garbage.
    pub(super) fn compact_timers(&mut self) {
        let flows = &self.flows;
        self.flow_due
            .retain(|Reverse((_, f, id))| flows.get(*f).is_some_and(|fl| fl.id == *id));
        let sockets = &self.sockets;
        self.sock_due
            .retain(|Reverse((_, s, gen))| sockets.get(*s).is_some_and(|so| so.gen == *gen));
        let embryos = &self.embryos;
        self.embryo_due
            .retain(|Reverse((_, e, id))| embryos.get(*e).is_some_and(|em| em.id == *id));
    }

    /// Evicts one flow: the earliest-deadline flow not active since it was
    /// scheduled, or after [`EVICTION_PROBES`] candidates the first one.
    pub(super) fn evict_flow(&mut self, t: KernelTime, out: &mut Vec<Output>) -> bool {
        let mut spared: [Option<Due>; EVICTION_PROBES] = [None; EVICTION_PROBES];
        let mut victim = None;
        let mut probes = 0;
        while let Some(Reverse((due, f, id))) = self.flow_due.pop() {
            let Some(fl) = self.flows.get_mut(f).filter(|fl| fl.id == id) else {
                continue; // stale
            };
            if fl.last > fl.sched_last && probes + 1 < EVICTION_PROBES {
                // Second chance: active since scheduled; look further.
                fl.sched_last = fl.last;
                let next = fl
                    .last
                    .saturating_add(self.inactive)
                    .min(fl.next_update)
                    .max(due);
                spared[probes] = Some(Reverse((next, f, id)));
                probes += 1;
                continue;
            }
            // This one goes; its timer entry is consumed with it.
            victim = Some(f);
            break;
        }
        // Everything probed was active: take the first one spared.
        if victim.is_none() {
            if let Some(Reverse((_, f, _))) = spared[0].take() {
                victim = Some(f);
            }
        }
        for d in spared.into_iter().flatten() {
            self.flow_due.push(d);
        }
        match victim {
            Some(f) => {
                self.evicted_flow(t, f, out);
                true
            }
            None => false,
        }
    }

    fn evicted_flow(&mut self, t: KernelTime, f: u32, out: &mut Vec<Output>) {
        self.stats.flow_evictions += 1;
        self.note_loss(EvictionLoss::Flow, 1, t);
        self.finish_flow(f, out);
    }

    /// Evicts the socket with the earliest deadline.
    pub(super) fn evict_socket(&mut self, t: KernelTime, out: &mut Vec<Output>) -> bool {
        while let Some(Reverse((_, s, gen))) = self.sock_due.pop() {
            if self.sockets.get(s).is_some_and(|so| so.gen == gen) {
                self.stats.socket_evictions += 1;
                self.note_loss(EvictionLoss::Socket, 1, t);
                self.end_socket(s, out);
                return true;
            }
        }
        // Every socket has a pending deadline, so this is unreachable while
        // the table is non-empty; an empty table needs no eviction.
        false
    }

    /// Ends everything (shutdown): every flow is emitted as final, tables
    /// are emptied, pending loss notices are emitted.
    pub fn flush(&mut self, out: &mut Vec<Output>) {
        let slots: Vec<u32> = self.sockets.slots().collect();
        for s in slots {
            self.end_socket(s, out);
        }
        self.embryos = Slab::default();
        self.embryo_index.clear();
        let parked: u64 = self
            .parked
            .values()
            .flat_map(|p| p.pairs.iter())
            .map(|pk| pk.packets)
            .sum();
        self.stats.unmatched_packets += parked;
        self.parked.clear();
        self.parked_pairs = 0;
        self.parked_due.clear();
        self.flow_due.clear();
        self.sock_due.clear();
        self.embryo_due.clear();
        self.flush_losses(out);
    }
}

/// The low 32 bits of a packet count (see `Flow::reported_packets`).
pub(super) fn low32(n: u64) -> u32 {
    (n & u64::from(u32::MAX)) as u32
}
