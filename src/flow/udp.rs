//! UDP: flows per remote endpoint, the local endpoint indices, and
//! datagrams parked until their socket is known.
//!
//! A datagram is looked up by its socket and remote endpoint (the socket's
//! last used flow first, then `peer_index`); a new remote endpoint starts a
//! new flow of the socket. An ingress datagram without a socket is matched
//! through the local (address, port) index, then the port index. Unmatched
//! ones are [`Parked`] per (local, remote) pair, grouped by local port in a
//! [`ParkedPort`], until a socket's local endpoint becomes known and claims
//! them, or until `flow_inactive_timeout` passes without a datagram to the
//! port (they are then counted as unmatched). The parked table is bounded
//! by `max_parked_udp` pairs.

use std::cmp::Reverse;
use std::net::SocketAddr;

use super::keys::Ep;
use super::table::NewFlow;
use super::{Clock, Engine, DNS_PORT};
use crate::model::{FlowDirection, KernelTime, Output, Packet, PacketDir, SockAddr, Transport};

/// Datagrams received for a (local, remote) endpoint pair no known socket
/// matched yet.
#[derive(Debug, Clone, Copy)]
pub(super) struct Parked {
    pub(super) local: Ep,
    pub(super) remote: Ep,
    pub(super) packets: u64,
    pub(super) bytes: u64,
    pub(super) first: KernelTime,
    pub(super) last: KernelTime,
}

/// The parked pairs of one local port, and the latest arrival among them.
#[derive(Debug, Default)]
pub(super) struct ParkedPort {
    pub(super) pairs: Vec<Parked>,
    pub(super) last: KernelTime,
}

impl<C: Clock> Engine<C> {
    /// Records the bound local address of a UDP socket seen receiving, so
    /// its ingress packets (which carry no socket) find it even when it
    /// never sends. A wildcard bind is indexed by port only.
    pub(super) fn bind_udp_local(
        &mut self,
        sock: SockAddr,
        local: &SocketAddr,
        out: &mut Vec<Output>,
    ) {
        if local.port() == 0 {
            return;
        }
        let Some(&s) = self.sock_index.get(&sock) else {
            return;
        };
        let Some(so) = self.sockets.get_mut(s) else {
            return;
        };
        if so.udp_local.is_some() || so.transport != Some(Transport::Udp) {
            return;
        }
        let l = Ep::of(local);
        so.udp_local = Some(l);
        let wildcard = local.ip().is_unspecified();
        if !wildcard {
            self.udp_local.insert(l, sock);
        }
        self.udp_port.insert(l.port, sock);
        self.claim_parked(s, l, wildcard, out);
    }

    pub(super) fn udp_packet(
        &mut self,
        t: KernelTime,
        p: &Packet,
        hint: u32,
        (l, r): (Ep, Ep),
        out: &mut Vec<Output>,
    ) {
        let sa = match p.sock {
            Some(sa) => sa,
            None => match self
                .udp_local
                .get(&l)
                .or_else(|| self.udp_port.get(&l.port))
            {
                Some(&sa) => sa,
                None => {
                    if p.dir == PacketDir::Ingress {
                        self.park(t, l, r, p.ip_len);
                    } else {
                        self.stats.unmatched_packets += 1;
                    }
                    return;
                }
            },
        };
        if p.dir == PacketDir::Egress && r.port == DNS_PORT {
            self.dns_claim(t, sa, hint, p.src);
        }
        // Fast path: the flow this socket used last.
        if let Some(s) = self.sock_slot(sa, hint) {
            if let Some(so) = self.sockets.get(s) {
                let f = so.udp_hint;
                if let Some(fl) = self
                    .flows
                    .get_mut(f)
                    .filter(|fl| fl.sock == s && fl.remote == r)
                {
                    fl.count(p.dir, p.ip_len, t);
                    return;
                }
            }
        }
        if let Some(&f) = self.peer_index.get(&(sa, r)) {
            if let Some(fl) = self.flows.get_mut(f) {
                fl.count(p.dir, p.ip_len, t);
                let s = fl.sock;
                if let Some(so) = self.sockets.get_mut(s) {
                    so.udp_hint = f;
                }
            }
            return;
        }
        let s = match self.sock_index.get(&sa).copied() {
            Some(s)
                if self
                    .sockets
                    .get(s)
                    .is_some_and(|so| so.transport != Some(Transport::Tcp)) =>
            {
                s
            }
            other => {
                if let Some(old) = other {
                    self.reuse(old, out);
                }
                self.new_socket(t, sa, Some(Transport::Udp), false, out)
            }
        };
        let (dir, complete, learnt) = match self.sockets.get_mut(s) {
            Some(so) => {
                so.transport = Some(Transport::Udp);
                let learnt = so.udp_local.is_none();
                if learnt {
                    so.udp_local = Some(l);
                    self.udp_local.insert(l, sa);
                    self.udp_port.insert(l.port, sa);
                }
                let dir = match (so.origin_seen, p.dir) {
                    (false, _) => FlowDirection::Unknown,
                    (true, PacketDir::Egress) => FlowDirection::Egress,
                    (true, PacketDir::Ingress) => FlowDirection::Ingress,
                };
                (dir, so.origin_seen, learnt)
            }
            None => return,
        };
        let new = NewFlow {
            sock: s,
            transport: Transport::Udp,
            local: l,
            remote: r,
            direction: dir,
            complete,
        };
        let f = self.new_flow(t, new, out);
        self.peer_index.insert((sa, r), f);
        if let Some(so) = self.sockets.get_mut(s) {
            so.udp_hint = f;
        }
        if let Some(fl) = self.flows.get_mut(f) {
            fl.count(p.dir, p.ip_len, t);
        }
        if learnt {
            self.claim_parked(s, l, false, out);
        }
    }

    /// Parks an ingress datagram no socket matched.
    fn park(&mut self, t: KernelTime, local: Ep, remote: Ep, len: u32) {
        let port = self.parked.entry(local.port).or_default();
        port.last = port.last.max(t);
        if let Some(pk) = port
            .pairs
            .iter_mut()
            .find(|pk| pk.local == local && pk.remote == remote)
        {
            pk.packets += 1;
            pk.bytes += u64::from(len);
            pk.last = pk.last.max(t);
            return;
        }
        if self.parked_pairs >= self.max_parked_udp {
            if port.pairs.is_empty() {
                self.parked.remove(&local.port);
            }
            self.stats.unmatched_packets += 1;
            return;
        }
        let fresh = port.pairs.is_empty();
        port.pairs.push(Parked {
            local,
            remote,
            packets: 1,
            bytes: u64::from(len),
            first: t,
            last: t,
        });
        self.parked_pairs += 1;
        if fresh {
            self.parked_due
                .push(Reverse((t.saturating_add(self.inactive), local.port)));
        }
    }

    /// Gives socket `s`, now known to receive at `local` (any address of
    /// that port when `wildcard`), the datagrams parked for it.
    fn claim_parked(&mut self, s: u32, local: Ep, wildcard: bool, out: &mut Vec<Output>) {
        let Some(mut port) = self.parked.remove(&local.port) else {
            return;
        };
        let (mine, rest): (Vec<Parked>, Vec<Parked>) = port
            .pairs
            .drain(..)
            .partition(|pk| wildcard || pk.local == local);
        if !rest.is_empty() {
            port.pairs = rest;
            self.parked.insert(local.port, port);
        }
        let Some(so) = self.sockets.get(s) else {
            self.stats.unmatched_packets += mine.iter().map(|pk| pk.packets).sum::<u64>();
            self.parked_pairs -= mine.len();
            return;
        };
        let (sa, complete) = (so.addr, so.origin_seen);
        let dir = if complete {
            FlowDirection::Ingress
        } else {
            FlowDirection::Unknown
        };
        for pk in mine {
            self.parked_pairs -= 1;
            self.stats.parked_udp_claimed += 1;
            let f = match self.peer_index.get(&(sa, pk.remote)) {
                Some(&f) => f,
                None => {
                    let new = NewFlow {
                        sock: s,
                        transport: Transport::Udp,
                        local: pk.local,
                        remote: pk.remote,
                        direction: dir,
                        complete,
                    };
                    let f = self.new_flow(pk.first, new, out);
                    self.peer_index.insert((sa, pk.remote), f);
                    f
                }
            };
            if let Some(fl) = self.flows.get_mut(f) {
                fl.in_packets += pk.packets;
                fl.in_bytes += pk.bytes;
                fl.first = fl.first.min(pk.first);
                fl.last = fl.last.max(pk.last);
            }
        }
    }

    /// Drops parked ports whose last datagram is `flow_inactive_timeout`
    /// old, counting their datagrams as unmatched.
    pub(super) fn expire_parked(&mut self, now: KernelTime) {
        while let Some(&Reverse((due, port))) = self.parked_due.peek() {
            if due > now {
                break;
            }
            self.parked_due.pop();
            let Some(p) = self.parked.get(&port) else {
                continue;
            };
            let again = p.last.saturating_add(self.inactive);
            if again > now {
                self.parked_due.push(Reverse((again, port)));
                continue;
            }
            if let Some(p) = self.parked.remove(&port) {
                self.parked_pairs -= p.pairs.len();
                self.stats.unmatched_packets += p.pairs.iter().map(|pk| pk.packets).sum::<u64>();
            }
        }
    }
}
