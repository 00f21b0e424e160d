//! What a parsed DNS response carries to the flow engine.

use std::net::SocketAddr;

use super::datagram::Address;

/// A resolved name: the name the client asked for and the CNAME chain that
/// led to the addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsName {
    chain: Box<[Box<str>]>,
}

impl DnsName {
    /// Builds a name from its chain (question name first). The root name
    /// (empty string) and an empty chain are shown as `.`.
    pub fn new(chain: Vec<String>) -> Self {
        let mut chain: Vec<Box<str>> = chain
            .into_iter()
            .map(|s| {
                if s.is_empty() {
                    ".".into()
                } else {
                    s.into_boxed_str()
                }
            })
            .collect();
        if chain.is_empty() {
            chain.push(".".into());
        }
        DnsName {
            chain: chain.into_boxed_slice(),
        }
    }

    /// The name the client asked for (reported as the flow's domain).
    pub fn domain(&self) -> &str {
        // `new` guarantees at least one element.
        self.chain.first().map_or(".", |s| s)
    }

    /// The chain from the question name to the name that owns the
    /// addresses; a single element when there was no CNAME.
    pub fn chain(&self) -> impl ExactSizeIterator<Item = &str> {
        self.chain.iter().map(|s| &**s)
    }

    /// Approximate heap bytes used, for memory accounting.
    pub fn heap_bytes(&self) -> usize {
        self.chain.len() * std::mem::size_of::<Box<str>>()
            + self.chain.iter().map(|s| s.len()).sum::<usize>()
    }
}

/// One parsed DNS response as the capture hands it to the flow engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsResponse {
    /// Where the response was sent: the endpoint the query came from.
    pub client: SocketAddr,
    /// The server that answered.
    pub server: SocketAddr,
    /// Transaction id.
    pub id: u16,
    /// Response code (0 = NOERROR).
    pub rcode: u8,
    /// Question type (1 = A, 28 = AAAA, ...).
    pub qtype: u16,
    /// The name asked for and its CNAME chain, shared by all addresses.
    pub name: std::sync::Arc<DnsName>,
    /// A and AAAA addresses of the chain's last name.
    pub addresses: Vec<Address>,
    /// The server set TC, or the capture or message was cut: more
    /// addresses may exist than were seen.
    pub truncated: bool,
}
