//! Event intake: each decoded event is dispatched to the part of the state
//! machine it concerns.
//!
//! Socket events (create, connect, accept, activity, close) reach the
//! socket table, TCP opens bind their 4-tuple (see `tcp`), packets are
//! looked up by transport (see `tcp` and `udp`), and process events
//! (exec, fork, exit, credentials) update the process table and the DNS
//! answers held per process (see `naming`). [`Engine::handle_batch`] has
//! the result of [`Engine::handle`] on each event, and issues the socket
//! lookups of a group of packets before applying any of them.

use std::cmp::Reverse;

use super::keys::{Ep, Tuple};
use super::slab::NIL;
use super::{Clock, Engine};
use crate::model::{
    Event, EventKind, FlowDirection, KernelTime, Output, Packet, PacketDir, SockAddr, SockOp, Task,
    Transport, TCP_SYN,
};

/// Events per group in [`Engine::handle_batch`].
const BATCH: usize = 16;

impl<C: Clock> Engine<C> {
    /// Processes one event (events must come in timestamp order).
    pub fn handle(&mut self, ev: &Event, out: &mut Vec<Output>) {
        self.handle_hinted(ev, NIL, out);
    }

    /// Processes a slice of events in order, with the same result as
    /// calling [`Engine::handle`] on each. Faster with large tables: the
    /// socket lookups of a group of packets are issued before any of them is
    /// applied, so their cache misses overlap.
    pub fn handle_batch(&mut self, evs: &[Event], out: &mut Vec<Output>) {
        for chunk in evs.chunks(BATCH) {
            let mut hints = [NIL; BATCH];
            let mut touched = 0u64;
            for (hint, ev) in hints.iter_mut().zip(chunk) {
                let EventKind::Packet(Packet {
                    sock: Some(sa),
                    transport,
                    ..
                }) = &ev.kind
                else {
                    continue;
                };
                let Some(&s) = self.sock_index.get(sa) else {
                    continue;
                };
                *hint = s;
                if let Some(so) = self.sockets.get(s) {
                    let f = match transport {
                        Transport::Tcp => so.tcp_flow,
                        Transport::Udp => so.udp_hint,
                    };
                    // Start loading the flow too; the value is irrelevant.
                    touched ^= self.flows.get(f).map_or(0, |fl| fl.id);
                }
            }
            std::hint::black_box(touched);
            for (&hint, ev) in hints.iter().zip(chunk) {
                self.handle_hinted(ev, hint, out);
            }
        }
    }

    /// The slot of the tracked socket at `sa`; `hint` is a slot looked up
    /// earlier, used when it still holds that socket.
    pub(super) fn sock_slot(&self, sa: SockAddr, hint: u32) -> Option<u32> {
        if self.sockets.get(hint).is_some_and(|so| so.addr == sa) {
            return Some(hint);
        }
        self.sock_index.get(&sa).copied()
    }

    fn handle_hinted(&mut self, ev: &Event, hint: u32, out: &mut Vec<Output>) {
        let t = ev.time;
        if let EventKind::Packet(p) = &ev.kind {
            self.on_packet(t, ev.task, p, hint, out);
            return;
        }
        match &ev.kind {
            EventKind::Packet(_) => {}
            EventKind::SockCreate { sock, transport } => {
                if let Some(&old) = self.sock_index.get(sock) {
                    self.reuse(old, out);
                }
                let s = self.new_socket(t, *sock, *transport, true, out);
                self.attribute(s, ev.task);
            }
            EventKind::TcpConnect {
                sock,
                local,
                remote,
            } => {
                let tuple = Tuple::of(local, remote);
                self.on_tcp_open(t, ev.task, *sock, tuple, FlowDirection::Egress, out);
            }
            EventKind::TcpAccept {
                sock,
                local,
                remote,
            } => {
                let tuple = Tuple::of(local, remote);
                self.on_tcp_open(t, ev.task, *sock, tuple, FlowDirection::Ingress, out);
            }
            EventKind::SockActivity {
                sock,
                transport,
                op,
                ..
            } => self.on_activity(t, ev.task, *sock, *transport, *op, out),
            EventKind::UdpRecv { sock, local } => {
                self.on_activity(t, ev.task, *sock, Transport::Udp, SockOp::Recv, out);
                self.bind_udp_local(*sock, local, out);
            }
            EventKind::TcpClose {
                sock,
                local,
                remote,
                counters,
            } => {
                let tuple = Tuple::of(local, remote);
                self.on_tcp_counters(t, *sock, tuple, counters, out);
            }
            EventKind::SockClose { sock } => {
                let Some(&s) = self.sock_index.get(sock) else {
                    self.stats.ignored_events += 1;
                    return;
                };
                // The last close is a use: a forked child that closes the
                // socket its parent accepted was the one serving it.
                self.attribute_use(s, ev.task);
                let gen = if let Some(so) = self.sockets.get_mut(s) {
                    so.last = so.last.max(t);
                    if so.closed_at.is_some() {
                        return;
                    }
                    so.closed_at = Some(t);
                    so.gen
                } else {
                    return;
                };
                self.sock_due
                    .push(Reverse((t.saturating_add(self.termination), s, gen)));
            }
            EventKind::ExecArgs { pid, args, .. } => self.procs.on_exec_args(*pid, args.clone()),
            EventKind::Exec { pid, filename } => self.procs.on_exec(*pid, filename),
            EventKind::Fork { parent, child } => {
                let wall = self.clock.wall(t);
                self.procs.on_fork(*parent, *child, wall);
                self.dns_fork(t, *parent, *child);
            }
            EventKind::Exit { tid, pid } => {
                self.procs.on_exit(*pid, *tid, t);
                self.dns_exit(t, *pid, *tid);
            }
            EventKind::Creds(c) => match ev.task {
                Some(task) => self.procs.on_creds(task.pid, *c),
                None => self.stats.ignored_events += 1,
            },
        }
        self.note_process_evictions(t);
    }

    fn on_activity(
        &mut self,
        t: KernelTime,
        task: Option<Task>,
        sock: SockAddr,
        transport: Transport,
        _op: SockOp,
        out: &mut Vec<Output>,
    ) {
        let s = match self.sock_index.get(&sock).copied() {
            Some(s)
                if self.sockets.get(s).is_some_and(|so| {
                    so.closed_at.is_none() && so.transport.is_none_or(|tr| tr == transport)
                }) =>
            {
                s
            }
            other => {
                if let Some(old) = other {
                    self.reuse(old, out);
                }
                self.new_socket(t, sock, Some(transport), false, out)
            }
        };
        if let Some(so) = self.sockets.get_mut(s) {
            so.transport = Some(transport);
            so.data_seen = true;
            so.last = so.last.max(t);
        }
        self.attribute_use(s, task);
    }

    /// An egress packet sampled in the task that sent it (a send, a
    /// connect's SYN, a receive's window update, a close's FIN): that task
    /// uses the socket, as a send call would have said, and this comes
    /// before the packet is counted, so a flow the packet starts is the
    /// sender's. A closed socket, or one of the other transport, is left to
    /// the packet path (a reused address), and kernel threads never take a
    /// socket this way (with threaded NAPI, receive-path replies are sent
    /// from one).
    fn on_egress_in_task(
        &mut self,
        t: KernelTime,
        task: Task,
        sa: SockAddr,
        (transport, syn): (Transport, Option<u8>),
        hint: u32,
        out: &mut Vec<Output>,
    ) {
        // A SYN is a connect's, not a send: it says who uses the socket but
        // not that it carries data, which would bind the tuple to it before
        // the handshake gives the flow its direction.
        let opening = transport == Transport::Tcp && syn.is_some_and(|f| f & TCP_SYN != 0);
        let Some(s) = self.sock_slot(sa, hint) else {
            if !opening && !self.procs.lookup(task.pid).is_kernel_thread() {
                self.on_activity(t, Some(task), sa, transport, SockOp::Send, out);
            }
            return;
        };
        let Some(so) = self.sockets.get_mut(s) else {
            return;
        };
        if so.closed_at.is_some() || so.transport.is_some_and(|tr| tr != transport) {
            return;
        }
        so.transport = Some(transport);
        so.data_seen |= !opening;
        so.last = so.last.max(t);
        // The usual case, without a clone: the sender owns the socket.
        let owner_sends = so
            .owner
            .as_ref()
            .is_some_and(|o| o.pid == task.pid && self.procs.is_current(task.pid, o));
        if owner_sends || self.procs.lookup(task.pid).is_kernel_thread() {
            return;
        }
        self.attribute_use(s, Some(task));
    }

    fn on_packet(
        &mut self,
        t: KernelTime,
        task: Option<Task>,
        p: &Packet,
        hint: u32,
        out: &mut Vec<Output>,
    ) {
        if let (PacketDir::Egress, Some(task), Some(sa)) = (p.dir, task, p.sock) {
            self.on_egress_in_task(t, task, sa, (p.transport, p.tcp_flags), hint, out);
        }
        let (local, remote) = match p.dir {
            PacketDir::Egress => (&p.src, &p.dst),
            PacketDir::Ingress => (&p.dst, &p.src),
        };
        let (l, r) = (Ep::of(local), Ep::of(remote));
        match p.transport {
            Transport::Tcp => self.tcp_packet(
                t,
                p,
                hint,
                Tuple {
                    local: l,
                    remote: r,
                },
                out,
            ),
            Transport::Udp => self.udp_packet(t, p, hint, (l, r), out),
        }
    }
}
