//! From a captured network-layer packet to a [`DnsResponse`]: IPv4/IPv6 and
//! UDP headers through the daemon's shared header parser
//! ([`crate::headers`]), the DNS message through [`super::message`], and the
//! reasons packets are dropped.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::headers::{self, HeaderError, IpHeader, IPPROTO_UDP, UDP_HEADER_LEN};

use super::message::{self, Message, RecordData, WireError};
use super::{DnsName, DnsResponse};

/// UDP port DNS servers answer from.
pub const DNS_PORT: u16 = 53;
/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86DD;
/// `sll_pkttype` of packets sent by this host.
pub const PACKET_OUTGOING: u8 = libc::PACKET_OUTGOING;
/// Longest CNAME chain followed from the question name.
pub const MAX_CNAME_CHAIN: usize = 16;

/// Why a captured packet yielded no [`DnsResponse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Sent by this host (the incoming copy is the one kept).
    Outgoing,
    /// Link protocol is neither IPv4 nor IPv6, or the version nibble
    /// disagrees with it.
    NotIp,
    /// IP header shorter than its minimum or than its own length field.
    BadIpHeader,
    /// Not UDP (IPv6 extension headers included).
    NotUdp,
    /// An IPv4 fragment (non-first fragments carry no UDP header; first
    /// fragments are not reassembled).
    Fragment,
    /// UDP header cut or with a length below 8.
    BadUdpHeader,
    /// UDP source port is not 53.
    NotDnsPort,
    /// The DNS message was rejected.
    Dns(WireError),
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 16] = [
        DropReason::Outgoing,
        DropReason::NotIp,
        DropReason::BadIpHeader,
        DropReason::NotUdp,
        DropReason::Fragment,
        DropReason::BadUdpHeader,
        DropReason::NotDnsPort,
        DropReason::Dns(WireError::Truncated),
        DropReason::Dns(WireError::NotResponse),
        DropReason::Dns(WireError::NotQuery),
        DropReason::Dns(WireError::QuestionCount),
        DropReason::Dns(WireError::LabelTooLong),
        DropReason::Dns(WireError::NameTooLong),
        DropReason::Dns(WireError::PointerOutOfRange),
        DropReason::Dns(WireError::PointerLoop),
        DropReason::Dns(WireError::BadRecordLength),
    ];

    /// Number of reasons (size of a per-reason counter array).
    pub const COUNT: usize = Self::ALL.len();

    /// Position in [`DropReason::ALL`].
    pub fn index(self) -> usize {
        match self {
            DropReason::Outgoing => 0,
            DropReason::NotIp => 1,
            DropReason::BadIpHeader => 2,
            DropReason::NotUdp => 3,
            DropReason::Fragment => 4,
            DropReason::BadUdpHeader => 5,
            DropReason::NotDnsPort => 6,
            DropReason::Dns(WireError::Truncated) => 7,
            DropReason::Dns(WireError::NotResponse) => 8,
            DropReason::Dns(WireError::NotQuery) => 9,
            DropReason::Dns(WireError::QuestionCount) => 10,
            DropReason::Dns(WireError::LabelTooLong) => 11,
            DropReason::Dns(WireError::NameTooLong) => 12,
            DropReason::Dns(WireError::PointerOutOfRange) => 13,
            DropReason::Dns(WireError::PointerLoop) => 14,
            DropReason::Dns(WireError::BadRecordLength) => 15,
        }
    }

    /// Stable snake_case name for the status API and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Outgoing => "outgoing",
            DropReason::NotIp => "not_ip",
            DropReason::BadIpHeader => "bad_ip_header",
            DropReason::NotUdp => "not_udp",
            DropReason::Fragment => "fragment",
            DropReason::BadUdpHeader => "bad_udp_header",
            DropReason::NotDnsPort => "not_dns_port",
            DropReason::Dns(WireError::Truncated) => "dns_truncated",
            DropReason::Dns(WireError::NotResponse) => "dns_not_response",
            DropReason::Dns(WireError::NotQuery) => "dns_not_query",
            DropReason::Dns(WireError::QuestionCount) => "dns_question_count",
            DropReason::Dns(WireError::LabelTooLong) => "dns_label_too_long",
            DropReason::Dns(WireError::NameTooLong) => "dns_name_too_long",
            DropReason::Dns(WireError::PointerOutOfRange) => "dns_pointer_out_of_range",
            DropReason::Dns(WireError::PointerLoop) => "dns_pointer_loop",
            DropReason::Dns(WireError::BadRecordLength) => "dns_bad_record_length",
        }
    }
}

impl From<WireError> for DropReason {
    fn from(e: WireError) -> Self {
        DropReason::Dns(e)
    }
}

/// Decodes one packet captured on the cooked socket (`data` starts at the
/// network header; `protocol` and `pkttype` come from the socket address).
/// Every byte is untrusted.
pub fn decode_packet(protocol: u16, pkttype: u8, data: &[u8]) -> Result<DnsResponse, DropReason> {
    if pkttype == PACKET_OUTGOING {
        return Err(DropReason::Outgoing);
    }
    let ip: IpHeader = match protocol {
        ETH_P_IP => headers::parse_ipv4(data),
        ETH_P_IPV6 => headers::parse_ipv6(data),
        _ => return Err(DropReason::NotIp),
    }
    .map_err(|e| match e {
        HeaderError::NotV4 | HeaderError::NotV6 => DropReason::NotIp,
        _ => DropReason::BadIpHeader,
    })?;
    let header_len = ip.transport_offset;
    if header_len > data.len() || ip.total_len < header_len {
        return Err(DropReason::BadIpHeader);
    }
    if ip.protocol != IPPROTO_UDP {
        return Err(DropReason::NotUdp);
    }
    if ip.later_fragment {
        return Err(DropReason::Fragment);
    }
    // A first fragment (offset 0, more-fragments set) is parsed as a
    // cut-off message: its UDP length exceeds what is present.
    let end = ip.total_len.min(data.len());
    let l4 = data.get(header_len..end).ok_or(DropReason::BadIpHeader)?;
    let udp = headers::parse_udp(l4).ok_or(DropReason::BadUdpHeader)?;
    if udp.src_port != DNS_PORT {
        return Err(DropReason::NotDnsPort);
    }
    let udp_len = usize::from(udp.length);
    if udp_len < UDP_HEADER_LEN {
        return Err(DropReason::BadUdpHeader);
    }
    let cut = udp_len > l4.len();
    let dns = l4
        .get(UDP_HEADER_LEN..udp_len.min(l4.len()))
        .ok_or(DropReason::BadUdpHeader)?;
    let message = message::parse_response(dns)?;
    let server = SocketAddr::new(ip.src, udp.src_port);
    let client = SocketAddr::new(ip.dst, udp.dst_port);
    Ok(response_from_message(client, server, &message, cut))
}

/// One address of a response with the TTL that applies to it (the smallest
/// TTL along the CNAME chain that led to it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    /// The address.
    pub ip: IpAddr,
    /// Seconds the answer may be cached.
    pub ttl: u32,
}

/// Follows the CNAME chain from the question name through the answer
/// section and collects the A/AAAA records of its last name. Returns the
/// chain (question name first) and the addresses. Loops and chains longer
/// than [`MAX_CNAME_CHAIN`] stop the walk.
pub fn resolve(message: &Message) -> (Vec<String>, Vec<Address>) {
    let mut chain = vec![message.qname.clone()];
    let mut chain_ttl = u32::MAX;
    while chain.len() <= MAX_CNAME_CHAIN {
        let Some(current) = chain.last() else { break };
        let next = message.answers.iter().find_map(|r| match &r.data {
            RecordData::Cname(target) if r.name == *current => Some((target, r.ttl)),
            _ => None,
        });
        match next {
            Some((target, ttl)) if !chain.contains(target) => {
                chain_ttl = chain_ttl.min(ttl);
                chain.push(target.clone());
            }
            _ => break,
        }
    }
    let mut addresses: Vec<Address> = Vec::new();
    if let Some(last) = chain.last() {
        for r in message.answers.iter().filter(|r| r.name == *last) {
            let ip = match r.data {
                RecordData::A(a) => IpAddr::V4(a),
                RecordData::Aaaa(a) => IpAddr::V6(a),
                RecordData::Cname(_) => continue,
            };
            if !addresses.iter().any(|a| a.ip == ip) {
                addresses.push(Address {
                    ip,
                    ttl: r.ttl.min(chain_ttl),
                });
            }
        }
    }
    (chain, addresses)
}

/// Builds the response value the table consumes.
pub fn response_from_message(
    client: SocketAddr,
    server: SocketAddr,
    message: &Message,
    cut: bool,
) -> DnsResponse {
    let (chain, addresses) = resolve(message);
    DnsResponse {
        client,
        server,
        id: message.id,
        rcode: message.rcode,
        qtype: message.qtype,
        name: Arc::new(DnsName::new(chain)),
        addresses,
        truncated: cut || message.tc || message.incomplete,
    }
}
