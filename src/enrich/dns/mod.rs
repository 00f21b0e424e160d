//! DNS enrichment: names for the addresses flows talk to.
//!
//! DNS responses are captured on an AF_PACKET socket ([`DnsCapture`]) with a
//! classic BPF filter so that only UDP datagrams from port 53 reach user
//! space; IP and UDP headers are decoded by the shared [`crate::headers`] parser and the DNS
//! message with our own parser ([`message`], fuzzed). The capture thread sends
//! [`DnsResponse`]s over a bounded channel to the flow engine, which feeds
//! them to a [`DnsTable`]:
//!
//! * [`DnsTable::observe_response`] stores a response's addresses under the
//!   client endpoint (the address and port the query came from);
//! * [`DnsTable::claim`] tells the table which process owns that endpoint's
//!   UDP socket, moving its answers (now or when they arrive, the two can
//!   come in either order) into that process's ip → name map;
//! * [`DnsTable::lookup`] answers "which name did process P resolve to reach
//!   ip X", falling back to a host-wide map (and saying so) when P has no
//!   answer of its own;
//! * [`DnsTable::fork`] / [`DnsTable::on_exit`] follow the process tree.
//!
//! Everything is bounded (see [`TableLimits`]) and counted (the capture's
//! [`CaptureCounters`], the table's [`TableStats`]).
//!
//! # Wiring
//!
//! At start: `DnsCapture::open_if_enabled(&cfg.socket.dns)?` then
//! `capture.spawn(capture::DEFAULT_QUEUE_LEN)?` gives a [`DnsCaptureThread`]
//! (stops on drop) and a `Receiver<DnsResponse>`. The flow engine owns the
//! [`DnsTable`] and, with its own clock (`now` in nanoseconds):
//!
//! * between events: `while let Ok(r) = rx.try_recv() { table.observe_response(now, &r) }`;
//! * when a process's UDP socket sends to port 53: `table.claim(now, local, pid)`;
//! * on socket close: `table.release(local)`; on fork/exit of a process:
//!   `table.fork(now, parent, child)` / `table.on_exit(pid)`;
//! * when a flow starts (names can expire before it ends):
//!   `table.lookup(now, pid, remote_ip)` → `Endpoint::domain`;
//! * every second or so: `table.expire(now)`.
//!
//! The status API reports the capture thread's counters
//! (`thread.counters()`) and the table's (`table.stats()`).
//!
//! ```
//! use std::net::SocketAddr;
//! use std::sync::Arc;
//! use sockscope::enrich::dns::{Address, DnsName, DnsResponse, DnsTable, MatchSource, TableLimits};
//!
//! let client: SocketAddr = "192.0.2.2:40000".parse().unwrap();
//! let response = DnsResponse {
//!     client,
//!     server: "192.0.2.53:53".parse().unwrap(),
//!     id: 7,
//!     rcode: 0,
//!     qtype: 1,
//!     name: Arc::new(DnsName::new(vec!["www.example.com".into(), "edge.example.net".into()])),
//!     addresses: vec![Address { ip: "198.51.100.7".parse().unwrap(), ttl: 300 }],
//!     truncated: false,
//! };
//! let mut table = DnsTable::new(TableLimits::default());
//! table.observe_response(1_000, &response);
//! table.claim(2_000, client, 4242);
//! let m = table.lookup(3_000, 4242, "198.51.100.7".parse().unwrap()).unwrap();
//! assert_eq!((m.domain(), m.source), ("www.example.com", MatchSource::Process));
//! ```

pub mod bpf;
pub mod capture;
pub mod datagram;
pub mod message;
pub mod response;
pub mod table;

pub use bpf::filter_program;
pub use capture::{CaptureCounters, CaptureStats, DnsCapture, DnsCaptureThread};
pub use datagram::{decode_packet, Address, DropReason};
pub use response::{DnsName, DnsResponse};
pub use table::{DnsMatch, DnsTable, MatchSource, TableLimits, TableStats};

use crate::sys::packet::PacketError;

/// Errors of the DNS capture.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// `socket.dns.type` names an unsupported capture method.
    #[error("socket.dns.type {kind:?} is not supported (only \"af_packet\")")]
    UnsupportedType {
        /// The configured value.
        kind: String,
    },
    /// `socket.dns.af_packet.snaplen` out of range.
    #[error("socket.dns.af_packet.snaplen {snaplen} out of range {min}..={max}")]
    Snaplen {
        /// The configured value.
        snaplen: u32,
        /// Smallest accepted value.
        min: u32,
        /// Largest accepted value.
        max: u32,
    },
    /// An AF_PACKET socket operation failed.
    #[error("DNS capture on interface {interface:?}: {source}")]
    Socket {
        /// The configured interface.
        interface: String,
        /// The failing operation.
        #[source]
        source: PacketError,
    },
    /// The capture thread could not be started.
    #[error("starting the DNS capture thread: {0}")]
    Thread(#[source] std::io::Error),
}

#[cfg(test)]
mod tests;
