//! What existed before the daemon started: the TCP connections and
//! listeners of the start-up snapshot ([`crate::enrich::sockets`]), used
//! for flows whose open the probes did not see.
//!
//! * A flow on the 4-tuple of a connection established at start gets that
//!   connection's owner, and its direction when one end is a listener of
//!   the snapshot (our end: `ingress`; the other end: `egress`). It stays
//!   `complete: false`: its start was not seen.
//! * A flow without owner and without an outbound handshake, on the local
//!   endpoint of a listener of the snapshot (an `accept` that began before
//!   the probes were installed returns unreported), gets the listener's
//!   owner, the process that accepts on it.
//!
//! An entry of a connection is used once (by the flow of its tuple) and
//! then forgotten; listeners are kept. Both are bounded by the snapshot's
//! own bound.

use std::net::{IpAddr, SocketAddr};

use hashbrown::HashMap;

use super::keys::Tuple;
use super::{Clock, Engine};
use crate::enrich::sockets::{SocketSnapshot, TCP_ESTABLISHED, TCP_LISTEN};
use crate::model::{FlowDirection, Task};

/// Connections and listeners of the start-up snapshot.
#[derive(Debug, Default)]
pub(super) struct Preexisting {
    /// Established connections, by oriented tuple: their owner.
    conns: HashMap<Tuple, u32>,
    /// Listeners by port: (bound address, owner), the owner unknown when
    /// no descriptor was found.
    listeners: HashMap<u16, Vec<(IpAddr, Option<u32>)>>,
}

impl Preexisting {
    /// The listener on `ep`: bound to its address or to the wildcard.
    fn listener(&self, ep: &SocketAddr) -> Option<Option<u32>> {
        let ls = self.listeners.get(&ep.port())?;
        ls.iter()
            .find(|(ip, _)| *ip == ep.ip())
            .or_else(|| ls.iter().find(|(ip, _)| ip.is_unspecified()))
            .map(|&(_, pid)| pid)
    }
}

impl<C: Clock> Engine<C> {
    /// Takes in the start-up snapshot of the machine's TCP sockets.
    pub fn seed_sockets(&mut self, snap: &SocketSnapshot) {
        for s in &snap.sockets {
            match s.state {
                TCP_LISTEN => self
                    .pre
                    .listeners
                    .entry(s.local.port())
                    .or_default()
                    .push((s.local.ip(), s.pid)),
                TCP_ESTABLISHED => {
                    if let Some(pid) = s.pid {
                        self.pre.conns.insert(Tuple::of(&s.local, &s.remote), pid);
                    }
                }
                _ => {}
            }
        }
    }

    /// Owner and direction for the new TCP flow `f` of socket `s` from
    /// the snapshot, where the flow lacks them (an owner may already be
    /// known from a send on the socket).
    pub(super) fn seeded_flow(&mut self, s: u32, f: u32, tuple: Tuple) {
        let Some(fl) = self.flows.get(f) else { return };
        let (owned, known_dir) = (fl.owner.is_some(), fl.direction != FlowDirection::Unknown);
        if (owned && known_dir) || (self.pre.conns.is_empty() && self.pre.listeners.is_empty()) {
            return;
        }
        let (local, remote) = (
            SocketAddr::new(tuple.local.ip_addr(), tuple.local.port),
            SocketAddr::new(tuple.remote.ip_addr(), tuple.remote.port),
        );
        let ours = self.pre.listener(&local);
        let (pid, dir) = match self.pre.conns.remove(&tuple) {
            Some(pid) => {
                let dir = if ours.is_some() {
                    FlowDirection::Ingress
                } else if self.pre.listener(&remote).is_some() {
                    FlowDirection::Egress
                } else {
                    FlowDirection::Unknown
                };
                (Some(pid), dir)
            }
            // Accepted from a listener of the snapshot, unless we sent the
            // opening SYN.
            None if fl.direction != FlowDirection::Egress => {
                (ours.flatten(), FlowDirection::Ingress)
            }
            None => (None, FlowDirection::Unknown),
        };
        let Some(pid) = pid else { return };
        if let Some(fl) = self.flows.get_mut(f) {
            if fl.direction == FlowDirection::Unknown {
                fl.direction = dir;
            }
        }
        if let Some(so) = self.sockets.get_mut(s) {
            if so.tcp_dir == FlowDirection::Unknown {
                so.tcp_dir = dir;
            }
        }
        if !owned {
            self.stats.seeded_owners += 1;
            self.attribute(s, Some(Task { pid, tid: pid }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listeners_match_any_address_of_their_port() {
        let mut p = Preexisting::default();
        p.listeners
            .entry(80)
            .or_default()
            .push(("0.0.0.0".parse().unwrap(), Some(7)));
        p.listeners
            .entry(80)
            .or_default()
            .push(("127.0.0.1".parse().unwrap(), Some(8)));
        assert_eq!(p.listener(&"127.0.0.1:80".parse().unwrap()), Some(Some(8)));
        assert_eq!(p.listener(&"10.0.0.1:80".parse().unwrap()), Some(Some(7)));
        assert_eq!(p.listener(&"10.0.0.1:81".parse().unwrap()), None);
    }
}
