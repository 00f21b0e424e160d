//! Fuzzes the DNS response path on untrusted bytes: the DNS message parser
//! and CNAME resolution, the IPv4/IPv6 + UDP decoder, and the answer table
//! fed with whatever decodes.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;

// The daemon's DNS parsing modules, compiled from their source files (they
// depend on nothing else of the daemon), so the instrumented build does not
// have to compile the whole daemon. They refer to each other through
// `super::` and to the shared header parser through `crate::headers`, both
// of which are this crate's root here.
#[allow(dead_code)]
#[path = "../../src/enrich/dns/datagram.rs"]
mod datagram;
#[allow(dead_code)]
#[path = "../../src/headers.rs"]
mod headers;
#[allow(dead_code)]
#[path = "../../src/enrich/dns/response.rs"]
mod response;
#[allow(dead_code)]
#[path = "../../src/enrich/dns/table.rs"]
mod table;
#[allow(dead_code)]
#[path = "../../src/enrich/dns/message.rs"]
mod message;

use datagram::{Address, ETH_P_IP, ETH_P_IPV6, MAX_CNAME_CHAIN};
use response::{DnsName, DnsResponse};
use table::{DnsTable, TableLimits};
use message::{MAX_ANSWER_RECORDS, MAX_NAME_WIRE_LEN};

/// Longest presentation form of a name: every octet escaped as `\DDD`.
const MAX_NAME_TEXT_LEN: usize = MAX_NAME_WIRE_LEN * 4;
/// `sll_pkttype` of a packet addressed to this host.
const PACKET_HOST: u8 = 0;
/// Small bounds so eviction paths run.
const FUZZ_TABLE_CAP: usize = 8;

fn check(response: &DnsResponse) {
    let chain: Vec<&str> = response.name.chain().collect();
    assert!(!chain.is_empty() && chain.len() <= MAX_CNAME_CHAIN + 1);
    assert!(chain.iter().all(|n| n.len() <= MAX_NAME_TEXT_LEN));
    assert!(response.addresses.len() <= MAX_ANSWER_RECORDS);
}

fn exercise_table(response: &DnsResponse) {
    let limits = TableLimits {
        max_pending_clients: FUZZ_TABLE_CAP,
        max_responses_per_client: 2,
        max_claims: FUZZ_TABLE_CAP,
        max_process_entries: FUZZ_TABLE_CAP,
        max_entries_per_process: 3,
        max_host_entries: FUZZ_TABLE_CAP,
        ..TableLimits::default()
    };
    let mut table = DnsTable::new(limits);
    table.observe_response(0, response);
    table.claim(1, response.client, 1);
    table.observe_response(2, response);
    table.fork(3, 1, 2);
    for a in &response.addresses {
        if let Some(m) = table.lookup(4, 2, a.ip) {
            assert_eq!(m.domain(), response.name.domain());
        }
    }
    // The newest host-map entry is never evicted.
    if let Some(last) = response.addresses.last() {
        assert!(table.lookup(4, 99, last.ip).is_some());
    }
    table.on_exit(1);
    table.expire(u64::MAX);
    let s = table.stats();
    assert_eq!(
        s.process_entries + s.host_entries + s.pending_clients + s.claims,
        0
    );
}

fuzz_target!(|data: &[u8]| {
    if let Ok(message) = message::parse_response(data) {
        let client = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40_000);
        let server = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), datagram::DNS_PORT);
        let response = datagram::response_from_message(client, server, &message, false);
        check(&response);
        exercise_table(&response);
    }
    for protocol in [ETH_P_IP, ETH_P_IPV6] {
        if let Ok(response) = datagram::decode_packet(protocol, PACKET_HOST, data) {
            check(&response);
            exercise_table(&response);
        }
    }
});
