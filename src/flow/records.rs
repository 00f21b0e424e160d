//! Record emission: flow records, the daemon's own flows withheld, and the
//! loss notices of table evictions.
//!
//! A record carries a flow's cumulative counters under the same id for its
//! interim and final versions. Flows of the daemon itself (its pid, or an
//! unowned TCP flow on one of its listening ports) are counted but not
//! reported unless `include_self`. Evictions are counted per table while
//! events are handled, and each table's count is emitted as one coalesced
//! [`Loss`] at the next tick.

use std::sync::Arc;

use super::table::Flow;
use super::{Clock, Engine};
use crate::enrich::community_id::community_id;
use crate::model::{
    Accounting, Endpoint, FlowDirection, FlowRecord, KernelTime, Loss, LossSource, Output,
    SockAddr, Transport,
};

/// Evictions of one table not reported yet: how many, and when the first
/// and the last happened.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct UnreportedEvictions {
    count: u64,
    first: KernelTime,
    last: KernelTime,
}

/// The tables whose evictions the engine reports as losses; indexes the
/// pending notices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum EvictionLoss {
    /// A socket evicted from the full socket table.
    Socket,
    /// A flow evicted from the full flow table.
    Flow,
    /// Processes evicted from the full process table.
    Process,
}

impl EvictionLoss {
    /// Every kind, in the order their notices are emitted.
    const ALL: [EvictionLoss; 3] = [
        EvictionLoss::Socket,
        EvictionLoss::Flow,
        EvictionLoss::Process,
    ];
    /// Number of kinds: the length of the engine's pending notices.
    pub(super) const COUNT: usize = EvictionLoss::ALL.len();

    /// Position of this kind's pending notice.
    fn index(self) -> usize {
        self as usize
    }

    /// The loss source reported for this kind.
    fn source(self) -> LossSource {
        match self {
            EvictionLoss::Socket => LossSource::SocketTableEviction,
            EvictionLoss::Flow => LossSource::FlowTableEviction,
            EvictionLoss::Process => LossSource::ProcessTableEviction,
        }
    }
}

impl<C: Clock> Engine<C> {
    /// Counts `n` losses of `kind` at `t`, for the next notice.
    pub(super) fn note_loss(&mut self, kind: EvictionLoss, n: u64, t: KernelTime) {
        let l = &mut self.losses[kind.index()];
        if l.count == 0 {
            l.first = t;
        }
        l.count += n;
        l.last = t;
    }

    /// Counts the evictions the process table made since the last call.
    pub(super) fn note_process_evictions(&mut self, t: KernelTime) {
        let n = self.procs.take_evictions();
        if n > 0 {
            self.stats.process_evictions += n;
            self.note_loss(EvictionLoss::Process, n, t);
        }
    }

    /// Emits one loss notice per table with pending evictions.
    pub(super) fn flush_losses(&mut self, out: &mut Vec<Output>) {
        for kind in EvictionLoss::ALL {
            let l = std::mem::take(&mut self.losses[kind.index()]);
            if l.count > 0 {
                out.push(Output::Loss(Loss {
                    source: kind.source(),
                    cpu: None,
                    count: l.count,
                    first: self.clock.wall(l.first),
                    last: self.clock.wall(l.last),
                }));
            }
        }
    }

    /// Builds and pushes the record of a flow; false when withheld.
    pub(super) fn emit(
        &mut self,
        fl: &Flow,
        sock: SockAddr,
        is_final: bool,
        out: &mut Vec<Output>,
    ) -> bool {
        match self.record(fl, sock, is_final) {
            Some(rec) => {
                if is_final {
                    self.stats.final_records += 1;
                } else {
                    self.stats.interim_records += 1;
                }
                out.push(Output::Flow(Arc::new(rec)));
                true
            }
            None => {
                self.stats.self_suppressed += 1;
                false
            }
        }
    }

    pub(super) fn interim(&mut self, f: u32, out: &mut Vec<Output>) {
        if let Some(fl) = self.flows.get_mut(f) {
            Self::resolve_domain(&mut self.dns, fl);
        }
        let Some(fl) = self.flows.get(f) else { return };
        let addr = self.sockets.get(fl.sock).map_or(0, |so| so.addr);
        let packets = fl.packets();
        match self.record(fl, addr, false) {
            Some(rec) => {
                self.stats.interim_records += 1;
                out.push(Output::Flow(Arc::new(rec)));
            }
            None => self.stats.self_suppressed += 1,
        }
        if let Some(fl) = self.flows.get_mut(f) {
            fl.reported_packets = super::expiry::low32(packets);
        }
    }

    /// Whether a flow belongs to the daemon itself: owned by its pid, or a
    /// TCP flow without an owner on one of its listening ports (a
    /// connection the daemon accepted before any syscall on it was seen).
    fn is_own(&self, fl: &Flow) -> bool {
        match fl.owner.as_ref() {
            Some(o) => o.pid == self.own_pid,
            None => {
                fl.transport == Transport::Tcp
                    && fl.direction != FlowDirection::Egress
                    && self.own_tcp_ports.contains(&fl.local.port)
            }
        }
    }

    /// The record of a flow, or `None` when it belongs to the daemon itself
    /// and `include_self` is off.
    fn record(&self, fl: &Flow, sock: SockAddr, is_final: bool) -> Option<FlowRecord> {
        if !self.include_self && self.is_own(fl) {
            return None;
        }
        let (lip, rip) = (fl.local.ip_addr(), fl.remote.ip_addr());
        // Sequence figures exist where packets were counted; with the
        // socket's own counters there are none to compare.
        let seq = fl.transport == Transport::Tcp && fl.accounting == Accounting::Packets;
        Some(FlowRecord {
            id: fl.id,
            is_final,
            complete: fl.complete,
            transport: fl.transport,
            direction: fl.direction,
            local: Endpoint {
                ip: lip,
                port: fl.local.port,
                packets: fl.out_packets,
                bytes: fl.out_bytes,
                domain: None,
                sequence: fl.seq_out.space().filter(|_| seq),
            },
            remote: Endpoint {
                ip: rip,
                port: fl.remote.port,
                packets: fl.in_packets,
                bytes: fl.in_bytes,
                domain: fl.domain.as_deref().map(str::to_string),
                sequence: fl.seq_in.space().filter(|_| seq),
            },
            start: self.clock.wall(fl.first),
            end: self.clock.wall(fl.last),
            community_id: community_id(fl.transport, lip, fl.local.port, rip, fl.remote.port),
            sock,
            process: fl.owner.as_deref().cloned(),
            accounting: fl.accounting,
            pod: None,
            remote_pod: None,
        })
    }
}
