//! TCP: connection opens, packet lookup by 4-tuple, and the embryonic table
//! of handshake packets no socket claimed yet.
//!
//! A packet is found through its socket's live flow, then through the
//! oriented tuple index; a known socket that carries data and has no tuple
//! takes the tuple (a lost connect). Anything else is counted in an
//! [`Embryo`] keyed by tuple, bounded by `max_embryonic`. `TcpConnect` and
//! `TcpAccept` bind their tuple to the socket ([`Engine::bind_tuple`]),
//! which merges the embryonic counters into the new flow. An entry left
//! unclaimed for `flow_termination_timeout` becomes the flow of the socket
//! its packets carried when that socket is unknown or carries data, and is
//! dropped otherwise.
//!
//! The handshake gives a connection's direction on its own: a SYN without
//! ACK opens it (sent: we initiated; received: the peer did), a SYN-ACK
//! answers it. An embryo remembers what it saw ([`Opening`]), so a flow
//! whose connect or accept event is missing (an `accept` already blocked
//! when the probes were installed, a dropped probe hit, a ring loss) still
//! gets its direction, and is complete when the opening SYN was counted.

use std::cmp::Reverse;

use super::keys::{Tuple, TupleRef};
use super::seq::SeqTrack;
use super::slab::NIL;
use super::table::NewFlow;
use super::{Clock, Engine};
use crate::model::{
    Accounting, FlowDirection, KernelTime, Output, Packet, PacketDir, SockAddr, Task,
    TcpSockCounters, Transport, TCP_ACK, TCP_SYN,
};

/// What the handshake packets of an embryo said about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Opening {
    /// No SYN seen.
    Unseen,
    /// Only the SYN-ACK: the direction is known, the start was not seen.
    Answered(FlowDirection),
    /// The opening SYN: direction known, start seen.
    Opened(FlowDirection),
}

impl Opening {
    /// What `p` adds to what was seen.
    fn with(self, p: &Packet) -> Opening {
        let Some(flags) = p.tcp_flags else {
            return self;
        };
        if flags & TCP_SYN == 0 {
            return self;
        }
        // Sending the SYN means we initiated; sending the SYN-ACK means
        // the peer did.
        let ours = (p.dir == PacketDir::Egress) == (flags & TCP_ACK == 0);
        let dir = if ours {
            FlowDirection::Egress
        } else {
            FlowDirection::Ingress
        };
        match (self, flags & TCP_ACK == 0) {
            (_, true) => Opening::Opened(dir),
            (Opening::Opened(_), false) => self,
            (_, false) => Opening::Answered(dir),
        }
    }
}

/// Packets of a TCP tuple no socket claimed yet, and the socket they
/// carried, if any.
#[derive(Debug)]
pub(super) struct Embryo {
    pub(super) id: u64,
    pub(super) tuple: Tuple,
    pub(super) out_packets: u64,
    pub(super) out_bytes: u64,
    pub(super) in_packets: u64,
    pub(super) in_bytes: u64,
    pub(super) first: KernelTime,
    pub(super) last: KernelTime,
    pub(super) hint: Option<SockAddr>,
    pub(super) opening: Opening,
    /// Sequence space of the local end's packets.
    pub(super) seq_out: SeqTrack,
    /// Sequence space of the remote end's packets.
    pub(super) seq_in: SeqTrack,
}

impl<C: Clock> Engine<C> {
    pub(super) fn on_tcp_open(
        &mut self,
        t: KernelTime,
        task: Option<Task>,
        sock: SockAddr,
        tuple: Tuple,
        dir: FlowDirection,
        out: &mut Vec<Output>,
    ) {
        let s = match self.sock_index.get(&sock).copied() {
            Some(s)
                if self.sockets.get(s).is_some_and(|so| {
                    so.closed_at.is_none()
                        && so.tuple.is_none()
                        && so.transport != Some(Transport::Udp)
                }) =>
            {
                s
            }
            other => {
                if let Some(old) = other {
                    self.reuse(old, out);
                }
                self.new_socket(t, sock, Some(Transport::Tcp), true, out)
            }
        };
        if let Some(so) = self.sockets.get_mut(s) {
            so.transport = Some(Transport::Tcp);
            so.origin_seen = true;
            so.tcp_dir = dir;
            so.last = so.last.max(t);
        }
        self.attribute(s, task);
        self.bind_tuple(t, s, tuple, dir, true, out);
    }

    /// A TCP connection ended with these socket counters (socket-counter
    /// accounting): they become its flow's counters. The flow ends as in
    /// per-packet accounting (`flow_termination_timeout` after its socket's
    /// release, or by inactivity), so records leave in batches rather than
    /// one by one while connections churn. A
    /// connection whose open was not seen (it predates the daemon, or its
    /// connect or accept sample was lost) gets a flow of unknown direction
    /// here.
    pub(super) fn on_tcp_counters(
        &mut self,
        t: KernelTime,
        sock: SockAddr,
        tuple: Tuple,
        c: &TcpSockCounters,
        out: &mut Vec<Output>,
    ) {
        let live = |f: u32| (f != NIL).then_some(f);
        let flow = self
            .sock_index
            .get(&sock)
            .and_then(|&s| self.sockets.get(s))
            .filter(|so| so.tuple == Some(tuple))
            .and_then(|so| live(so.tcp_flow))
            .or_else(|| self.tuple_index.get(&tuple).and_then(|r| live(r.flow)));
        let f = match flow {
            Some(f) => f,
            None => {
                if c.is_empty() || tuple.remote.port == 0 {
                    // A listener, or a socket that never sent or received.
                    self.stats.ignored_events += 1;
                    return;
                }
                let s = match self.sock_index.get(&sock).copied() {
                    Some(s)
                        if self.sockets.get(s).is_some_and(|so| {
                            so.tuple.is_none() && so.transport != Some(Transport::Udp)
                        }) =>
                    {
                        s
                    }
                    other => {
                        if let Some(old) = other {
                            self.reuse(old, out);
                        }
                        self.new_socket(t, sock, Some(Transport::Tcp), false, out)
                    }
                };
                if let Some(so) = self.sockets.get_mut(s) {
                    so.transport = Some(Transport::Tcp);
                }
                match self.bind_tuple(t, s, tuple, FlowDirection::Unknown, false, out) {
                    Some(f) => f,
                    None => return,
                }
            }
        };
        if let Some(fl) = self.flows.get_mut(f) {
            fl.out_bytes = c.payload_out();
            fl.in_bytes = c.payload_in();
            fl.out_packets = u64::from(c.segs_out);
            fl.in_packets = u64::from(c.segs_in);
            fl.accounting = Accounting::SocketCounters;
            fl.last = fl.last.max(t);
        }
        self.stats.socket_counted += 1;
    }

    pub(super) fn tcp_packet(
        &mut self,
        t: KernelTime,
        p: &Packet,
        hint: u32,
        tuple: Tuple,
        out: &mut Vec<Output>,
    ) {
        // Fast path, same result as the tuple index (a socket's tuple is
        // indexed to that socket alone) with a smaller table to probe.
        if let Some(sa) = p.sock {
            if let Some(so) = self.sock_slot(sa, hint).and_then(|s| self.sockets.get(s)) {
                // The socket's live flow carries the socket's tuple.
                let f = so.tcp_flow;
                if let Some(fl) = self
                    .flows
                    .get_mut(f)
                    .filter(|fl| fl.local == tuple.local && fl.remote == tuple.remote)
                {
                    fl.count_tcp(p, t);
                    return;
                }
            }
        }
        if let Some(&TupleRef { sock, flow }) = self.tuple_index.get(&tuple) {
            let flow = if flow != NIL {
                flow
            } else {
                // The flow ended by inactivity; the connection resumes.
                let dir = self
                    .sockets
                    .get(sock)
                    .map_or(FlowDirection::Unknown, |so| so.tcp_dir);
                let new = NewFlow {
                    sock,
                    transport: Transport::Tcp,
                    local: tuple.local,
                    remote: tuple.remote,
                    direction: dir,
                    complete: false,
                };
                let f = self.new_flow(t, new, out);
                self.set_tcp_flow(sock, tuple, f);
                f
            };
            if let Some(f) = self.flows.get_mut(flow) {
                f.count_tcp(p, t);
            }
            return;
        }
        if let Some(sa) = p.sock {
            if let Some(&s) = self.sock_index.get(&sa) {
                let (conflict, data) = match self.sockets.get(s) {
                    Some(so) => (
                        so.tuple.is_some()
                            || so.transport == Some(Transport::Udp)
                            || so.closed_at.is_some(),
                        so.data_seen,
                    ),
                    None => (false, false),
                };
                if conflict {
                    // A connected socket never changes its tuple, and a closed
                    // one sends nothing new: the address was reused (for a
                    // connection not accepted yet, say) without the events
                    // that would have said so.
                    self.reuse(s, out);
                } else if data {
                    // Lost connect: a socket that carries data owns this tuple.
                    if let Some(so) = self.sockets.get_mut(s) {
                        so.transport = Some(Transport::Tcp);
                    }
                    if let Some(f) =
                        self.bind_tuple(t, s, tuple, FlowDirection::Unknown, false, out)
                    {
                        if let Some(f) = self.flows.get_mut(f) {
                            f.count_tcp(p, t);
                        }
                    }
                    return;
                }
            }
        }
        self.embryo_packet(t, p, tuple);
    }

    /// Records `f` as the live flow of TCP socket `s` with `tuple`.
    fn set_tcp_flow(&mut self, s: u32, tuple: Tuple, f: u32) {
        if let Some(so) = self.sockets.get_mut(s) {
            so.tcp_flow = f;
        }
        if let Some(r) = self.tuple_index.get_mut(&tuple) {
            if r.sock == s {
                r.flow = f;
            }
        }
    }

    fn embryo_packet(&mut self, t: KernelTime, p: &Packet, tuple: Tuple) {
        let hint = p.sock.filter(|sa| {
            self.sock_index
                .get(sa)
                .and_then(|&s| self.sockets.get(s))
                .is_none_or(|so| so.tuple.is_none() && so.data_seen)
        });
        let e = match self.embryo_index.get(&tuple) {
            Some(&e) => e,
            None => {
                if self.embryos.len() >= self.max_embryonic {
                    self.stats.embryonic_dropped += 1;
                    return;
                }
                let id = self.id();
                let e = self.embryos.insert(Embryo {
                    id,
                    tuple,
                    out_packets: 0,
                    out_bytes: 0,
                    in_packets: 0,
                    in_bytes: 0,
                    first: t,
                    last: t,
                    hint: None,
                    opening: Opening::Unseen,
                    seq_out: SeqTrack::default(),
                    seq_in: SeqTrack::default(),
                });
                self.embryo_index.insert(tuple, e);
                self.embryo_due
                    .push(Reverse((t.saturating_add(self.termination), e, id)));
                e
            }
        };
        if let Some(em) = self.embryos.get_mut(e) {
            let seq = match p.dir {
                PacketDir::Egress => {
                    em.out_packets += 1;
                    em.out_bytes += u64::from(p.ip_len);
                    &mut em.seq_out
                }
                PacketDir::Ingress => {
                    em.in_packets += 1;
                    em.in_bytes += u64::from(p.ip_len);
                    &mut em.seq_in
                }
            };
            if let Some(s) = p.tcp_seq {
                seq.add(p.tcp_flags, s);
            }
            em.last = em.last.max(t);
            em.opening = em.opening.with(p);
            if hint.is_some() {
                em.hint = hint;
            }
        }
    }

    /// Binds a TCP tuple to a socket and creates its flow, claiming the
    /// embryonic entry of the tuple. Returns the flow's slot.
    fn bind_tuple(
        &mut self,
        t: KernelTime,
        s: u32,
        tuple: Tuple,
        dir: FlowDirection,
        complete: bool,
        out: &mut Vec<Output>,
    ) -> Option<u32> {
        if let Some(old) = self.tuple_index.get(&tuple).map(|r| r.sock) {
            // Two live sockets never share a 4-tuple: the old one is gone.
            if old != s {
                self.reuse(old, out);
            }
        }
        let so = self.sockets.get_mut(s)?;
        so.tuple = Some(tuple);
        let new = NewFlow {
            sock: s,
            transport: Transport::Tcp,
            local: tuple.local,
            remote: tuple.remote,
            direction: dir,
            complete,
        };
        let f = self.new_flow(t, new, out);
        self.tuple_index
            .insert(tuple, TupleRef { sock: s, flow: f });
        if let Some(so) = self.sockets.get_mut(s) {
            so.tcp_flow = f;
        }
        if let Some(e) = self.embryo_index.remove(&tuple) {
            if let (Some(em), Some(fl)) = (self.embryos.remove(e), self.flows.get_mut(f)) {
                fl.out_packets += em.out_packets;
                fl.out_bytes += em.out_bytes;
                fl.in_packets += em.in_packets;
                fl.in_bytes += em.in_bytes;
                // The embryo's packets came first: a new flow has seen
                // no sequence number of its own yet.
                if fl.seq_out.space().is_none() {
                    fl.seq_out = em.seq_out;
                }
                if fl.seq_in.space().is_none() {
                    fl.seq_in = em.seq_in;
                }
                fl.first = fl.first.min(em.first);
                fl.last = fl.last.max(em.last);
                self.stats.embryonic_claimed += 1;
                if fl.direction == FlowDirection::Unknown {
                    let seen = match em.opening {
                        Opening::Opened(d) => Some((d, true)),
                        Opening::Answered(d) => Some((d, false)),
                        Opening::Unseen => None,
                    };
                    if let Some((d, complete)) = seen {
                        fl.direction = d;
                        fl.complete |= complete;
                        if let Some(so) = self.sockets.get_mut(s) {
                            so.tcp_dir = d;
                        }
                    }
                }
            }
        }
        self.seeded_flow(s, f, tuple);
        Some(f)
    }

    pub(super) fn fire_embryo(&mut self, e: u32, id: u64, out: &mut Vec<Output>) {
        if self.embryos.get(e).is_none_or(|em| em.id != id) {
            return; // claimed or replaced
        }
        let Some(em) = self.embryos.remove(e) else {
            return;
        };
        self.embryo_index.remove(&em.tuple);
        self.promote_or_drop(em, out);
    }

    fn promote_or_drop(&mut self, em: Embryo, out: &mut Vec<Output>) {
        let target = match em.hint {
            Some(sa) => match self.sock_index.get(&sa).copied() {
                None => Some(self.new_socket(em.last, sa, Some(Transport::Tcp), false, out)),
                Some(s) => self
                    .sockets
                    .get(s)
                    .filter(|so| so.tuple.is_none() && so.data_seen && so.closed_at.is_none())
                    .map(|_| s),
            },
            None => None,
        };
        let Some(s) = target else {
            self.stats.embryonic_expired += 1;
            return;
        };
        if let Some(so) = self.sockets.get_mut(s) {
            so.transport = Some(Transport::Tcp);
        }
        // bind_tuple merges counters from the embryonic table; re-insert it
        // there for the merge.
        let tuple = em.tuple;
        let first = em.first;
        let e = self.embryos.insert(em);
        self.embryo_index.insert(tuple, e);
        if self
            .bind_tuple(first, s, tuple, FlowDirection::Unknown, false, out)
            .is_some()
        {
            self.stats.embryonic_claimed -= 1;
            self.stats.embryonic_promoted += 1;
        }
    }
}
