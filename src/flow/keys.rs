//! Keys of the engine's indices: endpoints, oriented TCP 4-tuples, the
//! value of the tuple index, and timer entries.
//!
//! Addresses are kept IPv4-mapped, so one key matches a dual-stack socket
//! and the IPv4 packets it produces; [`Ep::ip_addr`] turns a mapped address
//! back into IPv4 for records. A tuple is oriented: `local` is the source of
//! egress packets and the destination of ingress ones. Table entries are
//! named by their slab slot, and a timer entry carries the identity of the
//! slot's occupant so a deadline left behind by a removed entry is
//! recognised as stale when it comes due.

use std::cmp::Reverse;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::model::KernelTime;

/// An endpoint key: IPv4 stored IPv4-mapped. Byte arrays keep the key
/// unaligned and small (18 bytes), which matters for the tuple index's
/// cache footprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Ep {
    ip: [u8; 16],
    pub(super) port: u16,
}

impl Ep {
    pub(super) fn of(sa: &SocketAddr) -> Ep {
        let ip = match sa.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        Ep {
            ip,
            port: sa.port(),
        }
    }

    pub(super) fn ip_addr(&self) -> IpAddr {
        let v6 = Ipv6Addr::from(self.ip);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }
}

/// An oriented TCP 4-tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Tuple {
    pub(super) local: Ep,
    pub(super) remote: Ep,
}

impl Tuple {
    pub(super) fn of(local: &SocketAddr, remote: &SocketAddr) -> Tuple {
        Tuple {
            local: Ep::of(local),
            remote: Ep::of(remote),
        }
    }
}

/// Value of the tuple index: the socket, and its current flow (or NIL).
#[derive(Debug, Clone, Copy)]
pub(super) struct TupleRef {
    pub(super) sock: u32,
    pub(super) flow: u32,
}

/// A pending deadline: (time, slot, identity of the slot's occupant).
pub(super) type Due = Reverse<(KernelTime, u32, u64)>;
