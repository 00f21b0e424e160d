//! Decoder throughput on packet records recorded on Debian 6.1.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use sockscope::decode::{Decoder, DecoderKind, EventDesc, IpFamily};
use sockscope::model::{PacketDir, RawSample};

const FORMAT: &str = include_str!("../tests/fixtures/6.1/ip_out.format");
const RECORDS: &str = include_str!("../tests/fixtures/6.1/records.txt");

fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        .collect()
}

fn bench(c: &mut Criterion) {
    let dec = Decoder::new(&[EventDesc {
        kind: DecoderKind::Packet {
            dir: PacketDir::Egress,
            family: IpFamily::V4,
        },
        task_context: false,
        format: FORMAT,
    }])
    .unwrap();
    let recs: Vec<Vec<u8>> = RECORDS
        .lines()
        .filter(|l| l.starts_with("ip_out "))
        .map(|l| hex(l.split_whitespace().nth(3).unwrap()))
        .collect();
    assert!(!recs.is_empty());
    c.bench_function("decode_ipv4_egress_packet", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % recs.len();
            let s = RawSample {
                event: 0,
                time: 1,
                cpu: 0,
                pid: 1,
                tid: 1,
                data: &recs[i],
            };
            black_box(dec.decode(black_box(&s)))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
