//! Throughput of the DNS response path: message parsing, packet decoding,
//! and the answer table.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use criterion::{criterion_group, criterion_main, Criterion};
use sockscope::enrich::dns::datagram::{decode_packet, ETH_P_IP};
use sockscope::enrich::dns::message::parse_response;
use sockscope::enrich::dns::{DnsTable, TableLimits};

const PACKET_HOST: u8 = 0;
const SEC: u64 = 1_000_000_000;

fn enc(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// www.example.com CNAME edge.example.net, four A records.
fn message() -> Vec<u8> {
    let mut m = Vec::new();
    for v in [0x1234u16, 0x8180, 1, 5, 0, 0] {
        m.extend(v.to_be_bytes());
    }
    m.extend(enc("www.example.com"));
    m.extend([0, 1, 0, 1]);
    let target = enc("edge.example.net");
    m.extend([0xC0, 12, 0, 5, 0, 1, 0, 0, 0, 60]);
    m.extend((target.len() as u16).to_be_bytes());
    let at = m.len() as u16;
    m.extend(target);
    for i in 0..4u8 {
        m.extend((0xC000 | at).to_be_bytes());
        m.extend([0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 192, 0, 2, i]);
    }
    m
}

fn packet(dns: &[u8]) -> Vec<u8> {
    let total = (28 + dns.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend(total.to_be_bytes());
    p.extend([
        0, 0, 0x40, 0, 64, 17, 0, 0, 192, 0, 2, 53, 192, 0, 2, 2, 0, 53, 0x9c, 0x40,
    ]);
    p.extend((total - 20).to_be_bytes());
    p.extend([0, 0]);
    p.extend(dns);
    p
}

fn bench(c: &mut Criterion) {
    let msg = message();
    let pkt = packet(&msg);
    c.bench_function("dns/parse_response_cname_4a", |b| {
        b.iter(|| parse_response(black_box(&msg)))
    });
    c.bench_function("dns/decode_packet_ipv4", |b| {
        b.iter(|| decode_packet(ETH_P_IP, PACKET_HOST, black_box(&pkt)))
    });
    let response = decode_packet(ETH_P_IP, PACKET_HOST, &pkt).expect("bench packet decodes");
    c.bench_function("dns/table_observe_claim_lookup", |b| {
        let mut table = DnsTable::new(TableLimits::default());
        let mut now = 0u64;
        let mut port = 1024u16;
        b.iter(|| {
            now += SEC / 1000;
            port = port.wrapping_add(1).max(1024);
            let mut r = response.clone();
            r.client = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)), port);
            table.observe_response(now, &r);
            table.claim(now, r.client, u32::from(port));
            black_box(
                table
                    .lookup(now, u32::from(port), r.addresses[0].ip)
                    .is_some(),
            )
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
