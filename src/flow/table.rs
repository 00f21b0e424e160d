//! The socket and flow tables: creation, ownership and removal of their
//! entries.
//!
//! A [`Socket`] is keyed by its kernel address (`sock_index`) and holds the
//! doubly linked list of its [`Flow`]s (`first_flow`, `prev`/`next`): one
//! for a TCP socket (its 4-tuple, indexed in `tuple_index`), one per remote
//! endpoint for a UDP socket (indexed in `peer_index`). Creating an entry
//! when its table is full evicts another first (see `expiry`); removing a
//! flow emits its final record and unlinks it from every index; ending a
//! socket ends its flows. A socket whose address is reused ends, unless it
//! is a closed TCP socket in its termination wait, which is retired (see
//! [`Engine::reuse`]). Ownership comes from syscall-context events only
//! ([`Engine::attribute`]); a flow keeps the first owner it was given,
//! unless a child forked from that owner sends or receives on the socket
//! ([`Engine::attribute_use`]): a forking server's child serves the
//! connection its parent accepted, and the flow is the child's.

use std::cmp::Reverse;
use std::net::SocketAddr;
use std::sync::Arc;

use super::expiry::{HEAP_SLACK_FACTOR, HEAP_SLACK_MIN};
use super::keys::{Ep, Tuple};
use super::seq::SeqTrack;
use super::slab::NIL;
use super::{Clock, Engine};
use crate::model::{
    Accounting, FlowDirection, KernelTime, Output, Packet, PacketDir, ProcessInfo, SockAddr, Task,
    Transport,
};

/// One flow: a TCP socket's connection, or a UDP socket's traffic with one
/// remote endpoint. Local counters are egress, remote ones ingress.
#[derive(Debug)]
pub(super) struct Flow {
    pub(super) id: u64,
    pub(super) sock: u32,
    pub(super) transport: Transport,
    pub(super) local: Ep,
    pub(super) remote: Ep,
    pub(super) out_packets: u64,
    pub(super) out_bytes: u64,
    pub(super) in_packets: u64,
    pub(super) in_bytes: u64,
    pub(super) first: KernelTime,
    pub(super) last: KernelTime,
    pub(super) direction: FlowDirection,
    pub(super) complete: bool,
    pub(super) owner: Option<Arc<ProcessInfo>>,
    /// DNS name of the remote address, once found.
    pub(super) domain: Option<Box<str>>,
    pub(super) next_update: KernelTime,
    /// `last` when the pending timer was pushed (second-chance eviction).
    pub(super) sched_last: KernelTime,
    /// Packets at the last record, to skip unchanged interim records: the
    /// low 32 bits (equal by chance only after exactly 2^32 packets in one
    /// update interval).
    pub(super) reported_packets: u32,
    /// How the counters were obtained.
    pub(super) accounting: Accounting,
    /// TCP sequence space of what the local end sent.
    pub(super) seq_out: SeqTrack,
    /// TCP sequence space of what the remote end sent.
    pub(super) seq_in: SeqTrack,
    prev: u32,
    pub(super) next: u32,
}

impl Flow {
    pub(super) fn count(&mut self, dir: PacketDir, len: u32, t: KernelTime) {
        match dir {
            PacketDir::Egress => {
                self.out_packets += 1;
                self.out_bytes += u64::from(len);
            }
            PacketDir::Ingress => {
                self.in_packets += 1;
                self.in_bytes += u64::from(len);
            }
        }
        if t > self.last {
            self.last = t;
        }
    }

    /// Counts a TCP packet, and its sequence numbers when it has them.
    #[inline]
    pub(super) fn count_tcp(&mut self, p: &Packet, t: KernelTime) {
        self.count(p.dir, p.ip_len, t);
        if let Some(s) = p.tcp_seq {
            match p.dir {
                PacketDir::Egress => self.seq_out.add(p.tcp_flags, s),
                PacketDir::Ingress => self.seq_in.add(p.tcp_flags, s),
            }
        }
    }

    pub(super) fn packets(&self) -> u64 {
        self.out_packets + self.in_packets
    }
}

/// A tracked kernel socket and the head of its flow list.
#[derive(Debug)]
pub(super) struct Socket {
    pub(super) addr: SockAddr,
    pub(super) gen: u64,
    pub(super) transport: Option<Transport>,
    pub(super) owner: Option<Arc<ProcessInfo>>,
    /// Creation, connect or accept observed.
    pub(super) origin_seen: bool,
    /// A send or receive was seen: not a listener.
    pub(super) data_seen: bool,
    /// Direction of the TCP connection, when known.
    pub(super) tcp_dir: FlowDirection,
    /// The live flow of a TCP socket (NIL when none).
    pub(super) tcp_flow: u32,
    /// The UDP flow used last (a cache in front of the peer index).
    pub(super) udp_hint: u32,
    pub(super) tuple: Option<Tuple>,
    pub(super) udp_local: Option<Ep>,
    pub(super) closed_at: Option<KernelTime>,
    pub(super) last: KernelTime,
    pub(super) first_flow: u32,
    unowned_flows: u32,
}

/// A flow about to be created: its socket, transport and endpoints, and
/// what is known of its start.
pub(super) struct NewFlow {
    /// Slab index of the socket the flow belongs to.
    pub(super) sock: u32,
    /// TCP or UDP.
    pub(super) transport: Transport,
    /// The local endpoint.
    pub(super) local: Ep,
    /// The remote endpoint.
    pub(super) remote: Ep,
    /// Who opened the flow, as far as known.
    pub(super) direction: FlowDirection,
    /// Whether the flow's start was observed.
    pub(super) complete: bool,
}

impl<C: Clock> Engine<C> {
    pub(super) fn new_socket(
        &mut self,
        t: KernelTime,
        addr: SockAddr,
        transport: Option<Transport>,
        origin_seen: bool,
        out: &mut Vec<Output>,
    ) -> u32 {
        while self.sockets.len() >= self.max_sockets {
            if !self.evict_socket(t, out) {
                break;
            }
        }
        let gen = self.id();
        let s = self.sockets.insert(Socket {
            addr,
            gen,
            transport,
            owner: None,
            origin_seen,
            data_seen: false,
            tcp_dir: FlowDirection::Unknown,
            tcp_flow: NIL,
            udp_hint: NIL,
            tuple: None,
            udp_local: None,
            closed_at: None,
            last: t,
            first_flow: NIL,
            unowned_flows: 0,
        });
        self.sock_index.insert(addr, s);
        self.sock_due
            .push(Reverse((t.saturating_add(self.sock_inactive), s, gen)));
        if self.sock_due.len() > HEAP_SLACK_FACTOR * self.sockets.len() + HEAP_SLACK_MIN
            || self.embryo_due.len() > HEAP_SLACK_FACTOR * self.embryos.len() + HEAP_SLACK_MIN
        {
            self.compact_timers();
        }
        s
    }

    /// Creates the flow `new` at `t` (evicting while the table is full)
    /// and links it at the head of its socket's flow list.
    pub(super) fn new_flow(&mut self, t: KernelTime, new: NewFlow, out: &mut Vec<Output>) -> u32 {
        let NewFlow {
            sock: s,
            transport,
            local,
            remote,
            direction,
            complete,
        } = new;
        while self.flows.len() >= self.max_flows {
            if !self.evict_flow(t, out) {
                break;
            }
        }
        let id = self.id();
        let (owner, head) = match self.sockets.get(s) {
            Some(so) => (so.owner.clone(), so.first_flow),
            None => (None, NIL),
        };
        let unowned = owner.is_none();
        let next_update = if self.update == 0 {
            u64::MAX
        } else {
            t.saturating_add(self.update)
        };
        let f = self.flows.insert(Flow {
            id,
            sock: s,
            transport,
            local,
            remote,
            out_packets: 0,
            out_bytes: 0,
            in_packets: 0,
            in_bytes: 0,
            first: t,
            last: t,
            direction,
            complete,
            owner,
            domain: None,
            next_update,
            sched_last: t,
            reported_packets: 0,
            accounting: if self.socket_counters && transport == Transport::Tcp {
                // Until the socket's counters come at its close.
                Accounting::Uncounted
            } else {
                Accounting::Packets
            },
            seq_out: SeqTrack::default(),
            seq_in: SeqTrack::default(),
            prev: NIL,
            next: head,
        });
        if let Some(h) = self.flows.get_mut(head) {
            h.prev = f;
        }
        if let Some(fl) = self.flows.get_mut(f) {
            Self::resolve_domain(&mut self.dns, fl);
        }
        if let Some(so) = self.sockets.get_mut(s) {
            so.first_flow = f;
            if unowned {
                so.unowned_flows += 1;
            }
        }
        self.stats.flows_created += 1;
        let due = t.saturating_add(self.inactive).min(next_update);
        self.flow_due.push(Reverse((due, f, id)));
        if self.flow_due.len() > HEAP_SLACK_FACTOR * self.flows.len() + HEAP_SLACK_MIN {
            self.compact_timers();
        }
        f
    }

    /// Emits a flow's final record and removes it from every index.
    pub(super) fn finish_flow(&mut self, f: u32, out: &mut Vec<Output>) {
        let Some(mut fl) = self.flows.remove(f) else {
            return;
        };
        Self::resolve_domain(&mut self.dns, &mut fl);
        if let Some(p) = self.flows.get_mut(fl.prev) {
            p.next = fl.next;
        }
        if let Some(n) = self.flows.get_mut(fl.next) {
            n.prev = fl.prev;
        }
        let addr = match self.sockets.get_mut(fl.sock) {
            Some(so) => {
                if so.first_flow == f {
                    so.first_flow = fl.next;
                }
                if fl.owner.is_none() {
                    so.unowned_flows = so.unowned_flows.saturating_sub(1);
                }
                if so.tcp_flow == f {
                    so.tcp_flow = NIL;
                }
                if so.udp_hint == f {
                    so.udp_hint = NIL;
                }
                so.addr
            }
            None => 0,
        };
        match fl.transport {
            Transport::Tcp => {
                let tuple = Tuple {
                    local: fl.local,
                    remote: fl.remote,
                };
                if let Some(r) = self.tuple_index.get_mut(&tuple) {
                    if r.flow == f {
                        r.flow = NIL;
                    }
                }
            }
            Transport::Udp => {
                if self.peer_index.get(&(addr, fl.remote)) == Some(&f) {
                    self.peer_index.remove(&(addr, fl.remote));
                }
            }
        }
        if fl.accounting == Accounting::Uncounted {
            self.stats.uncounted_flows += 1;
        }
        self.emit(&fl, addr, true, out);
    }

    /// Ends a socket: its flows become final and it leaves every index.
    pub(super) fn end_socket(&mut self, s: u32, out: &mut Vec<Output>) {
        loop {
            let head = match self.sockets.get(s) {
                Some(so) => so.first_flow,
                None => return,
            };
            if head == NIL {
                break;
            }
            self.finish_flow(head, out);
        }
        let Some(so) = self.sockets.remove(s) else {
            return;
        };
        if let Some(tuple) = so.tuple {
            if self.tuple_index.get(&tuple).is_some_and(|r| r.sock == s) {
                self.tuple_index.remove(&tuple);
            }
        }
        if let Some(l) = so.udp_local {
            if let Some(table) = self.dns.as_mut() {
                table.release(SocketAddr::new(l.ip_addr(), l.port));
            }
            if self.udp_local.get(&l) == Some(&so.addr) {
                self.udp_local.remove(&l);
            }
            if self.udp_port.get(&l.port) == Some(&so.addr) {
                self.udp_port.remove(&l.port);
            }
        }
        if self.sock_index.get(&so.addr) == Some(&s) {
            self.sock_index.remove(&so.addr);
        }
    }

    /// A new socket took the address of socket `s`. A closed TCP socket
    /// whose termination wait is still running is *retired*: it leaves the
    /// address index to the new socket but keeps its flows (and their tuple)
    /// until its close timer ends it, so the late packets of the old
    /// connection (a FIN's ACK, sent after the kernel freed the socket and
    /// reused its memory) still count. Any other socket ends at once.
    pub(super) fn reuse(&mut self, s: u32, out: &mut Vec<Output>) {
        self.stats.socket_reuses += 1;
        let retire = self.sockets.get(s).is_some_and(|so| {
            so.closed_at.is_some() && so.tuple.is_some() && so.udp_local.is_none()
        });
        if !retire {
            self.end_socket(s, out);
            return;
        }
        if let Some(so) = self.sockets.get(s) {
            if self.sock_index.get(&so.addr) == Some(&s) {
                self.sock_index.remove(&so.addr);
            }
        }
    }

    /// [`Engine::attribute`] for a send or receive on the socket: its flows
    /// owned by the process that forked the sender move to the sender. A
    /// forking server accepts in the parent and serves in the child (which
    /// may exec another program, as inetd's children do); the flow is the
    /// child's. Another process using the socket (descriptor passing, a
    /// process that shares it otherwise) does not take existing flows over.
    pub(super) fn attribute_use(&mut self, s: u32, task: Option<Task>) {
        let Some(info) = self.attribute(s, task) else {
            return;
        };
        let mut f = self.sockets.get(s).map_or(NIL, |so| so.first_flow);
        while f != NIL {
            let Some(fl) = self.flows.get_mut(f) else {
                break;
            };
            if fl.owner.as_deref().is_some_and(|o| forked_from(&info, o)) {
                fl.owner = Some(Arc::clone(&info));
                self.stats.handed_to_children += 1;
            }
            f = fl.next;
        }
    }

    /// Sets the socket's owner from a syscall-context task and gives it to
    /// the socket's flows that have none yet; returns the new owner when it
    /// changed.
    pub(super) fn attribute(&mut self, s: u32, task: Option<Task>) -> Option<Arc<ProcessInfo>> {
        let task = task?;
        let info = self.procs.lookup(task.pid);
        if self
            .sockets
            .get(s)
            .and_then(|so| so.owner.as_ref())
            .is_some_and(|o| Arc::ptr_eq(o, &info))
        {
            return None;
        }
        let so = self.sockets.get_mut(s)?;
        so.owner = Some(Arc::clone(&info));
        if so.unowned_flows == 0 {
            return Some(info);
        }
        so.unowned_flows = 0;
        let mut f = so.first_flow;
        while f != NIL {
            let Some(fl) = self.flows.get_mut(f) else {
                break;
            };
            if fl.owner.is_none() {
                fl.owner = Some(Arc::clone(&info));
            }
            f = fl.next;
        }
        Some(info)
    }
}

/// Whether `child` is a process forked by `parent` (its parent pid, and not
/// older than it when both start times are known).
fn forked_from(child: &ProcessInfo, parent: &ProcessInfo) -> bool {
    child.pid != parent.pid
        && child.ppid == parent.pid
        && match (child.created, parent.created) {
            (Some(c), Some(p)) => c >= p,
            _ => true,
        }
}
