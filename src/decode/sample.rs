//! Reading a sample's fields ([`SampleReader`]) and the packet headers it
//! carries (through the shared parser in [`crate::headers`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::headers::{self, HeaderError, IPPROTO_TCP, IPPROTO_UDP};
use crate::model::Transport;
use crate::schema::IpFamily;

use super::layout::{Loc, PeerLocs};
use super::DecodeError;

/// AF_INET.
pub(super) const AF_INET: u16 = 2;
/// AF_INET6.
pub(super) const AF_INET6: u16 = 10;
/// Smallest `msg_namelen` of an AF_INET destination.
const SOCKADDR_IN_LEN: i32 = 16;
/// Smallest `msg_namelen` of an AF_INET6 destination (RFC 2133 size).
const SOCKADDR_IN6_LEN: i32 = 24;

/// Whether a socket family is one we track.
pub(super) fn is_inet(family: u16) -> bool {
    family == AF_INET || family == AF_INET6
}

/// IPv4-mapped IPv6 addresses become IPv4 (they travel as IPv4 packets).
pub(super) fn canonical(a: Ipv6Addr) -> IpAddr {
    match a.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(a),
    }
}

/// A packet's transport, both ends, TCP flags and TCP sequence number with
/// the offset its payload starts at (when TCP and fetched), or None for a
/// protocol not tracked.
pub(super) type Parsed = Option<(
    Transport,
    SocketAddr,
    SocketAddr,
    Option<u8>,
    Option<(u32, usize)>,
)>;

fn transport_of(proto: u8) -> Option<Transport> {
    match proto {
        IPPROTO_TCP => Some(Transport::Tcp),
        IPPROTO_UDP => Some(Transport::Udp),
        _ => None,
    }
}

fn bad(event: u32) -> impl Fn(HeaderError) -> DecodeError {
    move |e| DecodeError::BadPacket {
        event,
        what: e.as_str(),
    }
}

/// The transport protocol of the IP header at the start of `h`, when its
/// version matches `family`.
pub(super) fn ip_protocol(h: &[u8], family: IpFamily) -> Option<u8> {
    match (family, headers::ip_version(h)?) {
        (IpFamily::V4, 4) => h.get(9).copied(),
        (IpFamily::V6, 6) => h.get(6).copied(),
        _ => None,
    }
}

/// The transport and both ends of the packet whose headers start `h`.
/// Protocols other than TCP and UDP give `Ok(None)`; fragments after the
/// first (no ports) are errors of their own kind.
pub(super) fn parse_ip(h: &[u8], family: IpFamily, event: u32) -> Result<Parsed, DecodeError> {
    let ip = match family {
        IpFamily::V4 => headers::parse_ipv4(h),
        IpFamily::V6 => headers::parse_ipv6(h),
    }
    .map_err(bad(event))?;
    let Some(t) = transport_of(ip.protocol) else {
        return Ok(None);
    };
    if ip.later_fragment {
        return Err(DecodeError::Fragment { event });
    }
    let (sp, dp) = headers::ports(h, ip.transport_offset).map_err(bad(event))?;
    let (flags, seq) = match t {
        Transport::Tcp => (
            headers::tcp_flags(h, ip.transport_offset),
            headers::tcp_seq(h, ip.transport_offset),
        ),
        Transport::Udp => (None, None),
    };
    Ok(Some((
        t,
        SocketAddr::new(ip.src, sp),
        SocketAddr::new(ip.dst, dp),
        flags,
        seq,
    )))
}

/// Both ends and the IP length of a datagram delivered to a socket, from
/// the bytes before its `payload` bytes.
pub(super) fn parse_udp_delivery(
    w: &[u8],
    payload: u64,
    event: u32,
) -> Result<(SocketAddr, SocketAddr, u32), DecodeError> {
    let d = headers::datagram_before_payload(w, payload).map_err(bad(event))?;
    Ok((d.src, d.dst, d.ip_len))
}

/// The bytes of one sample, read by field location; every read is
/// bounds-checked.
pub(super) struct SampleReader<'a> {
    pub(super) d: &'a [u8],
    pub(super) event: u32,
}

impl<'a> SampleReader<'a> {
    pub(super) fn bytes(&self, l: Loc) -> Result<&'a [u8], DecodeError> {
        self.d
            .get(l.off..l.off.saturating_add(l.size))
            .ok_or(DecodeError::Truncated {
                event: self.event,
                need: l.off.saturating_add(l.size),
                have: self.d.len(),
            })
    }

    /// Little-endian (host order) unsigned value of a 1/2/4/8-byte field.
    pub(super) fn uint(&self, l: Loc) -> Result<u64, DecodeError> {
        let b = self.bytes(l)?;
        let mut buf = [0u8; 8];
        let n = b.len().min(buf.len());
        buf[..n].copy_from_slice(&b[..n]);
        Ok(u64::from_le_bytes(buf))
    }

    pub(super) fn be16(&self, l: Loc) -> Result<u16, DecodeError> {
        let b = self.bytes(l)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub(super) fn v4(&self, l: Loc) -> Result<Ipv4Addr, DecodeError> {
        let b = self.bytes(l)?;
        Ok(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    }

    pub(super) fn v6(&self, l: Loc) -> Result<Ipv6Addr, DecodeError> {
        let b = self.bytes(l)?;
        let mut a = [0u8; 16];
        a.copy_from_slice(b);
        Ok(Ipv6Addr::from(a))
    }

    /// Bytes of a `__data_loc` string, without the trailing NUL.
    pub(super) fn str_bytes(&self, l: Loc) -> Result<&'a [u8], DecodeError> {
        let v = self.uint(l)? as u32;
        let (off, len) = ((v & 0xffff) as usize, (v >> 16) as usize);
        let b = self.bytes(Loc { off, size: len })?;
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        Ok(&b[..end])
    }

    pub(super) fn peer(&self, p: PeerLocs) -> Result<Option<SocketAddr>, DecodeError> {
        let namelen = self.uint(p.namelen)? as u32 as i32;
        let nfamily = self.uint(p.nfamily)? as u16;
        let port = self.be16(p.nport)?;
        Ok(match (p.family, nfamily) {
            (IpFamily::V4, AF_INET) if namelen >= SOCKADDR_IN_LEN => {
                Some(SocketAddr::new(IpAddr::V4(self.v4(p.naddr)?), port))
            }
            (IpFamily::V6, AF_INET6) if namelen >= SOCKADDR_IN6_LEN => {
                Some(SocketAddr::new(canonical(self.v6(p.naddr)?), port))
            }
            _ => None,
        })
    }
}
