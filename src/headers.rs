//! IP and transport headers in untrusted packet bytes: the one header
//! parser of the daemon, used by the sample decoder (headers fetched by the
//! packet probes) and by the DNS capture (packets read from an AF_PACKET
//! socket).
//!
//! Field access goes through pnet_packet's header views; what is checked
//! (version nibble, IHL, lengths, IPv6 extension headers, fragments) is
//! decided here, the same way for both users. Every function is total over
//! its input: short or inconsistent bytes give a [`HeaderError`], never a
//! panic. Nothing allocates.
//!
//! The buffers may be cut short of the packet (a probe fetches a fixed
//! number of bytes), so lengths read from a header are reported, not
//! required to fit the buffer.

use std::net::{IpAddr, SocketAddr};

use pnet_packet::ipv4::Ipv4Packet;
use pnet_packet::ipv6::Ipv6Packet;
use pnet_packet::udp::UdpPacket;

/// IPPROTO_TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IPPROTO_UDP.
pub const IPPROTO_UDP: u8 = 17;
/// Shortest IPv4 header (IHL 5).
pub const IPV4_MIN_HEADER_LEN: usize = 20;
/// Longest IPv4 header (IHL 15).
pub const IPV4_MAX_HEADER_LEN: usize = 60;
/// Bytes per IHL unit.
const IPV4_IHL_UNIT: usize = 4;
/// Fixed IPv6 header length.
pub const IPV6_HEADER_LEN: usize = 40;
/// UDP header length.
pub const UDP_HEADER_LEN: usize = 8;
/// IPv4 fragment offset bits (of the 13-bit field).
pub const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;
/// IPv6 fragment offset bits (of the fragment header's offset field).
const IPV6_FRAG_OFFSET_MASK: u16 = 0xfff8;
/// IPv6 extension headers walked to find the transport header.
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;
/// Length of an IPv6 fragment header.
const IPV6_FRAGMENT_HEADER_LEN: usize = 8;
/// Unit of an IPv6 extension header's length field.
const IPV6_EXT_UNIT: usize = 8;
/// Bytes of a transport header holding the two ports.
const PORTS_LEN: usize = 4;

/// Why bytes are not the header they should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderError {
    /// Shorter than a fixed IPv4 header.
    ShortV4,
    /// Shorter than the fixed IPv6 header.
    ShortV6,
    /// The version nibble is not 4.
    NotV4,
    /// The version nibble is not 6.
    NotV6,
    /// IHL below 5.
    Ihl,
    /// IPv6 extension headers run past the bytes present.
    Extensions,
    /// The transport ports are past the bytes present.
    Ports,
    /// A delivery window too short to hold a UDP and an IP header.
    WindowShort,
    /// No UDP header consistent with the payload ends the window.
    NoUdpHeader,
    /// No IP header consistent with the UDP header precedes it.
    NoIpHeader,
}

impl HeaderError {
    /// What is wrong, for error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            HeaderError::ShortV4 => "header shorter than 20 bytes",
            HeaderError::ShortV6 => "header shorter than 40 bytes",
            HeaderError::NotV4 => "not an IPv4 header",
            HeaderError::NotV6 => "not an IPv6 header",
            HeaderError::Ihl => "IHL below 5",
            HeaderError::Extensions => "extension headers beyond fetched bytes",
            HeaderError::Ports => "transport header beyond fetched bytes",
            HeaderError::WindowShort => "delivery window too short",
            HeaderError::NoUdpHeader => "no UDP header before the payload",
            HeaderError::NoIpHeader => "no IP header before the UDP header",
        }
    }
}

/// An IP header, as far as flows and DNS need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpHeader {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// The transport protocol (after IPv6 extension headers).
    pub protocol: u8,
    /// Where the transport header starts.
    pub transport_offset: usize,
    /// The packet's length per its IP header (header included); may exceed
    /// the bytes present.
    pub total_len: usize,
    /// A fragment other than the first: no transport header follows.
    pub later_fragment: bool,
}

/// The IP version nibble of the first byte, if any.
pub fn ip_version(b: &[u8]) -> Option<u8> {
    b.first().map(|v| v >> 4)
}

/// Parses an IPv4 header (options skipped by IHL).
pub fn parse_ipv4(b: &[u8]) -> Result<IpHeader, HeaderError> {
    let ip = Ipv4Packet::new(b).ok_or(HeaderError::ShortV4)?;
    if ip.get_version() != 4 {
        return Err(HeaderError::NotV4);
    }
    let ihl = usize::from(ip.get_header_length()) * IPV4_IHL_UNIT;
    if ihl < IPV4_MIN_HEADER_LEN {
        return Err(HeaderError::Ihl);
    }
    Ok(IpHeader {
        src: IpAddr::V4(ip.get_source()),
        dst: IpAddr::V4(ip.get_destination()),
        protocol: ip.get_next_level_protocol().0,
        transport_offset: ihl,
        total_len: usize::from(ip.get_total_length()),
        later_fragment: ip.get_fragment_offset() & IPV4_FRAG_OFFSET_MASK != 0,
    })
}

/// Parses an IPv6 header and walks its extension headers (hop-by-hop,
/// routing, destination options, fragment) to the transport header.
pub fn parse_ipv6(b: &[u8]) -> Result<IpHeader, HeaderError> {
    let ip = Ipv6Packet::new(b).ok_or(HeaderError::ShortV6)?;
    if ip.get_version() != 6 {
        return Err(HeaderError::NotV6);
    }
    let mut next = ip.get_next_header().0;
    let mut off = IPV6_HEADER_LEN;
    let mut later_fragment = false;
    loop {
        match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let ext = b.get(off..off + 2).ok_or(HeaderError::Extensions)?;
                next = ext[0];
                off += (usize::from(ext[1]) + 1) * IPV6_EXT_UNIT;
            }
            IPV6_FRAGMENT => {
                let ext = b.get(off..off + 4).ok_or(HeaderError::Extensions)?;
                next = ext[0];
                off += IPV6_FRAGMENT_HEADER_LEN;
                if u16::from_be_bytes([ext[2], ext[3]]) & IPV6_FRAG_OFFSET_MASK != 0 {
                    later_fragment = true;
                    break;
                }
            }
            _ => break,
        }
    }
    Ok(IpHeader {
        src: IpAddr::V6(ip.get_source()),
        dst: IpAddr::V6(ip.get_destination()),
        protocol: next,
        transport_offset: off,
        total_len: IPV6_HEADER_LEN + usize::from(ip.get_payload_length()),
        later_fragment,
    })
}

/// Source and destination ports of the TCP or UDP header at `offset`.
pub fn ports(b: &[u8], offset: usize) -> Result<(u16, u16), HeaderError> {
    match b.get(offset..offset.saturating_add(PORTS_LEN)) {
        Some(p) => Ok((
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        )),
        None => Err(HeaderError::Ports),
    }
}

/// Offset of the flags byte in a TCP header.
const TCP_FLAGS_AT: usize = 13;

/// The flags byte of the TCP header at `offset`, when present in `b`.
pub fn tcp_flags(b: &[u8], offset: usize) -> Option<u8> {
    b.get(offset.checked_add(TCP_FLAGS_AT)?).copied()
}

/// Offset of the sequence number in a TCP header.
const TCP_SEQ_AT: usize = 4;
/// Offset of the data offset byte (high nibble) in a TCP header.
const TCP_DATA_OFFSET_AT: usize = 12;
/// Bytes per data offset unit.
const TCP_DATA_OFFSET_UNIT: usize = 4;
/// Shortest TCP header (data offset 5).
pub const TCP_MIN_HEADER_LEN: usize = 20;

/// The sequence number of the TCP header at `offset` and where its
/// payload starts (the offset plus the header length its data offset
/// gives), when both are present in `b` and the data offset is valid.
pub fn tcp_seq(b: &[u8], offset: usize) -> Option<(u32, usize)> {
    let at = offset.checked_add(TCP_SEQ_AT)?;
    let seq = b.get(at..at.checked_add(4)?)?;
    let doff = b.get(offset.checked_add(TCP_DATA_OFFSET_AT)?)?;
    let len = usize::from(doff >> 4) * TCP_DATA_OFFSET_UNIT;
    if len < TCP_MIN_HEADER_LEN {
        return None;
    }
    Some((
        u32::from_be_bytes([seq[0], seq[1], seq[2], seq[3]]),
        offset.checked_add(len)?,
    ))
}

/// A UDP header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpHeader {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Datagram length per the header (header included).
    pub length: u16,
}

/// Parses the UDP header at the start of `b`.
pub fn parse_udp(b: &[u8]) -> Option<UdpHeader> {
    let u = UdpPacket::new(b)?;
    Some(UdpHeader {
        src_port: u.get_source(),
        dst_port: u.get_destination(),
        length: u.get_length(),
    })
}

/// A datagram found in the bytes right before its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveredDatagram {
    /// Sender.
    pub src: SocketAddr,
    /// Receiver.
    pub dst: SocketAddr,
    /// IP length: the IP and UDP headers plus `payload` bytes.
    pub ip_len: u32,
}

/// Finds the UDP header and the IP header before it at the end of
/// `window`, the bytes right before a datagram's `payload` bytes (the
/// kernel has pulled both headers when the datagram is queued on its
/// socket). The UDP header must agree with the payload and the IP header
/// with the UDP header: an IPv6 header without extension headers is tried
/// first, then IPv4 headers of every IHL.
pub fn datagram_before_payload(
    window: &[u8],
    payload: u64,
) -> Result<DeliveredDatagram, HeaderError> {
    if window.len() < UDP_HEADER_LEN + IPV4_MIN_HEADER_LEN {
        return Err(HeaderError::WindowShort);
    }
    let u = window.len() - UDP_HEADER_LEN;
    let udp = parse_udp(&window[u..]).ok_or(HeaderError::WindowShort)?;
    // A UDP GRO aggregate carries the length of its first segment.
    if usize::from(udp.length) < UDP_HEADER_LEN
        || u64::from(udp.length) > payload + UDP_HEADER_LEN as u64
    {
        return Err(HeaderError::NoUdpHeader);
    }
    let datagram = |ip: IpHeader, ip_hdr: usize| DeliveredDatagram {
        src: SocketAddr::new(ip.src, udp.src_port),
        dst: SocketAddr::new(ip.dst, udp.dst_port),
        ip_len: u32::try_from(payload + (UDP_HEADER_LEN + ip_hdr) as u64).unwrap_or(u32::MAX),
    };
    if let Some(o) = u.checked_sub(IPV6_HEADER_LEN) {
        let h = &window[o..u];
        if ip_version(h) == Some(6) {
            if let Ok(ip) = parse_ipv6(h) {
                if ip.protocol == IPPROTO_UDP
                    && ip.transport_offset == IPV6_HEADER_LEN
                    && ip.total_len - IPV6_HEADER_LEN == usize::from(udp.length)
                {
                    return Ok(datagram(ip, IPV6_HEADER_LEN));
                }
            }
        }
    }
    for ihl in (IPV4_MIN_HEADER_LEN..=IPV4_MAX_HEADER_LEN).step_by(IPV4_IHL_UNIT) {
        let Some(o) = u.checked_sub(ihl) else { break };
        let h = &window[o..u];
        if h[0] != 0x40 | (ihl / IPV4_IHL_UNIT) as u8 {
            continue;
        }
        if let Ok(ip) = parse_ipv4(h) {
            if ip.protocol == IPPROTO_UDP && ip.total_len == ihl + usize::from(udp.length) {
                return Ok(datagram(ip, ihl));
            }
        }
    }
    Err(HeaderError::NoIpHeader)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_udp(ihl_words: u8, payload: &[u8]) -> Vec<u8> {
        let ihl = usize::from(ihl_words) * 4;
        let total = ihl + UDP_HEADER_LEN + payload.len();
        let mut p = vec![0u8; ihl];
        p[0] = 0x40 | ihl_words;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[9] = IPPROTO_UDP;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let ulen = (UDP_HEADER_LEN + payload.len()) as u16;
        p.extend_from_slice(&5353u16.to_be_bytes());
        p.extend_from_slice(&53u16.to_be_bytes());
        p.extend_from_slice(&ulen.to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn ipv4_with_options() {
        let p = v4_udp(6, b"abcd");
        let h = parse_ipv4(&p).unwrap();
        assert_eq!(h.transport_offset, 24);
        assert_eq!(h.protocol, IPPROTO_UDP);
        assert_eq!(h.total_len, p.len());
        assert_eq!(ports(&p, h.transport_offset), Ok((5353, 53)));
        assert!(!h.later_fragment);
    }

    #[test]
    fn ipv4_errors() {
        assert_eq!(parse_ipv4(&[0x45; 19]), Err(HeaderError::ShortV4));
        let mut p = v4_udp(5, b"");
        p[0] = 0x65;
        assert_eq!(parse_ipv4(&p), Err(HeaderError::NotV4));
        p[0] = 0x44;
        assert_eq!(parse_ipv4(&p), Err(HeaderError::Ihl));
        p[0] = 0x45;
        p[6..8].copy_from_slice(&0x0001u16.to_be_bytes());
        assert!(parse_ipv4(&p).unwrap().later_fragment);
        assert_eq!(ports(&p[..22], 20), Err(HeaderError::Ports));
    }

    #[test]
    fn ipv6_extension_headers_and_fragments() {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[6] = IPV6_HOPOPTS;
        p.extend_from_slice(&[IPV6_FRAGMENT, 0, 0, 0, 0, 0, 0, 0]);
        p.extend_from_slice(&[IPPROTO_TCP, 0, 0, 0, 0, 0, 0, 0]);
        p.extend_from_slice(&[0, 80, 0, 81]);
        let h = parse_ipv6(&p).unwrap();
        assert_eq!((h.protocol, h.transport_offset), (IPPROTO_TCP, 56));
        assert_eq!(ports(&p, 56), Ok((80, 81)));
        // A later fragment: offset bits set.
        p[50..52].copy_from_slice(&0x0008u16.to_be_bytes());
        assert!(parse_ipv6(&p).unwrap().later_fragment);
        assert_eq!(parse_ipv6(&p[..45]), Err(HeaderError::Extensions));
        assert_eq!(parse_ipv6(&p[..39]), Err(HeaderError::ShortV6));
    }

    #[test]
    fn datagram_found_before_its_payload() {
        // The window holds IPv4 headers of up to 56 bytes (IHL 14).
        for ihl in 5..=14u8 {
            let p = v4_udp(ihl, b"xyz");
            let hdrs = &p[..p.len() - 3];
            let mut window = vec![0xaa; 64 - hdrs.len()];
            window.extend_from_slice(hdrs);
            let d = datagram_before_payload(&window, 3).unwrap();
            assert_eq!(d.src, "10.0.0.1:5353".parse().unwrap());
            assert_eq!(d.ip_len as usize, p.len(), "ihl {ihl}");
        }
        assert_eq!(
            datagram_before_payload(&[0; 27], 0),
            Err(HeaderError::WindowShort)
        );
        assert_eq!(
            datagram_before_payload(&[0; 64], 200),
            Err(HeaderError::NoUdpHeader)
        );
    }
}
