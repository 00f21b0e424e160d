//! DNS naming: which process asked for which answers, and the names flows
//! take from them.
//!
//! An egress UDP packet to [`DNS_PORT`](super::DNS_PORT) claims its source
//! endpoint for its socket's owner; responses given to
//! [`Engine::observe_dns`] are kept per process by the attached
//! [`DnsTable`]. A flow is named from its owner's answers when it is created
//! and, while it has no name, whenever a record is produced. Forks copy the
//! parent's answers; a process's answers are dropped after its exit plus a
//! grace period (`flow_termination_timeout` +
//! [`DNS_EXIT_SLACK`](super::DNS_EXIT_SLACK)), a thread's inherited copy at
//! its exit.

use std::net::SocketAddr;

use super::table::Flow;
use super::{Clock, Engine};
use crate::enrich::dns::{DnsResponse, DnsTable, MatchSource, TableStats};
use crate::model::{KernelTime, SockAddr};

impl<C: Clock> Engine<C> {
    /// Attaches a DNS table: flows get names from the responses given to
    /// [`Engine::observe_dns`] (see the module documentation).
    pub fn with_dns(mut self, table: DnsTable) -> Self {
        self.dns = Some(table);
        self
    }

    /// Feeds one captured DNS response to the table (ignored without one).
    /// `now` is on the same clock as the events.
    pub fn observe_dns(&mut self, now: KernelTime, response: &DnsResponse) {
        if let Some(table) = self.dns.as_mut() {
            table.observe_response(now, response);
        }
    }

    /// Counters and sizes of the DNS table, when one is attached.
    pub fn dns_stats(&self) -> Option<TableStats> {
        self.dns.as_ref().map(DnsTable::stats)
    }

    /// A fork: the child's pid is new, so answers still held for an exited
    /// process of that pid go now; then the child inherits the parent's.
    pub(super) fn dns_fork(&mut self, t: KernelTime, parent: u32, child: u32) {
        let Some(table) = self.dns.as_mut() else {
            return;
        };
        if self.dns_exit_due.remove(&child).is_some() {
            table.on_exit(child);
        }
        table.fork(t, parent, child);
    }

    /// An exit: a thread's inherited copy (made by its creation's fork
    /// event) goes now; a process's answers go after the grace period.
    pub(super) fn dns_exit(&mut self, t: KernelTime, pid: u32, tid: u32) {
        let Some(table) = self.dns.as_mut() else {
            return;
        };
        if tid != pid {
            if !self.dns_exit_due.contains_key(&tid) {
                table.on_exit(tid);
            }
            return;
        }
        let at = t.saturating_add(self.dns_exit_grace);
        self.dns_exit_due.insert(pid, at);
        self.dns_exits.push_back((at, pid));
    }

    /// Drops the answers of processes whose exit grace ended by `now`, and
    /// expired table entries.
    pub(super) fn dns_tick(&mut self, now: KernelTime) {
        let Some(table) = self.dns.as_mut() else {
            return;
        };
        while let Some(&(at, pid)) = self.dns_exits.front() {
            if at > now {
                break;
            }
            self.dns_exits.pop_front();
            if self.dns_exit_due.get(&pid) == Some(&at) {
                self.dns_exit_due.remove(&pid);
                table.on_exit(pid);
            }
        }
        table.expire(now);
    }

    /// Names the flow's remote address from its owner's DNS answers, if it
    /// has no name yet.
    pub(super) fn resolve_domain(dns: &mut Option<DnsTable>, fl: &mut Flow) {
        if fl.domain.is_some() {
            return;
        }
        let (Some(table), Some(owner)) = (dns.as_mut(), fl.owner.as_ref()) else {
            return;
        };
        if let Some(m) = table.lookup_counted(fl.first, owner.pid, fl.remote.ip_addr()) {
            if m.source == MatchSource::Process {
                fl.domain = Some(m.domain().into());
            }
        }
    }

    /// A query left the local endpoint `src` of socket `sa`: the socket's
    /// owner will receive the responses sent back to it.
    pub(super) fn dns_claim(&mut self, t: KernelTime, sa: SockAddr, hint: u32, src: SocketAddr) {
        if self.dns.is_none() {
            return;
        }
        let owner = self
            .sock_slot(sa, hint)
            .and_then(|s| self.sockets.get(s))
            .and_then(|so| so.owner.as_ref())
            .map(|o| o.pid);
        if let (Some(table), Some(pid)) = (self.dns.as_mut(), owner) {
            table.claim(t, src, pid);
        }
    }
}
