//! Tests on hand-built DNS messages and packets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::bpf::filter_program;
use super::datagram::{decode_packet, resolve, DropReason, ETH_P_IP, ETH_P_IPV6, PACKET_OUTGOING};
use super::message::{
    parse_response, read_name, RecordData, WireError, CLASS_IN, TYPE_A, TYPE_AAAA, TYPE_CNAME,
};
use super::*;

const PACKET_HOST: u8 = libc::PACKET_HOST;
const TYPE_MX: u16 = 15;
const CLASS_CH: u16 = 3;
const FLAGS_RESPONSE: u16 = 0x8180;

/// Wire form of a dotted name, uncompressed, with the root label.
fn enc(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// A compression pointer to `offset`.
fn ptr(offset: u16) -> Vec<u8> {
    (0xC000 | offset).to_be_bytes().to_vec()
}

/// Builds DNS messages field by field.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(id: u16, flags: u16, qd: u16, an: u16) -> Self {
        let mut buf = Vec::new();
        for v in [id, flags, qd, an, 0, 0] {
            buf.extend_from_slice(&v.to_be_bytes());
        }
        Msg { buf }
    }

    /// A response with one question; returns it and the question name's offset (12).
    fn response(qname: &str, qtype: u16, an: u16) -> Self {
        let mut m = Msg::new(0x1234, FLAGS_RESPONSE, 1, an);
        m.raw(&enc(qname));
        m.u16(qtype);
        m.u16(CLASS_IN);
        m
    }

    fn pos(&self) -> u16 {
        self.buf.len() as u16
    }

    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }

    fn u16(&mut self, v: u16) -> &mut Self {
        self.raw(&v.to_be_bytes())
    }

    fn record(
        &mut self,
        owner: &[u8],
        rtype: u16,
        class: u16,
        ttl: u32,
        rdata: &[u8],
    ) -> &mut Self {
        self.raw(owner);
        self.u16(rtype);
        self.u16(class);
        self.raw(&ttl.to_be_bytes());
        self.u16(rdata.len() as u16);
        self.raw(rdata)
    }

    fn a(&mut self, owner: &[u8], ttl: u32, ip: [u8; 4]) -> &mut Self {
        self.record(owner, TYPE_A, CLASS_IN, ttl, &ip)
    }

    fn aaaa(&mut self, owner: &[u8], ttl: u32, ip: Ipv6Addr) -> &mut Self {
        self.record(owner, TYPE_AAAA, CLASS_IN, ttl, &ip.octets())
    }

    fn cname(&mut self, owner: &[u8], ttl: u32, target: &[u8]) -> &mut Self {
        self.record(owner, TYPE_CNAME, CLASS_IN, ttl, target)
    }
}

const Q: u16 = 12;

fn addrs(m: &message::Message) -> Vec<(IpAddr, u32)> {
    resolve(m).1.into_iter().map(|a| (a.ip, a.ttl)).collect()
}

#[test]
fn a_answer_with_compressed_owner() {
    let mut m = Msg::response("www.example.com", TYPE_A, 1);
    m.a(&ptr(Q), 300, [93, 184, 216, 34]);
    let msg = parse_response(&m.buf).expect("valid response");
    assert_eq!(msg.id, 0x1234);
    assert_eq!(msg.qname, "www.example.com");
    assert_eq!(msg.qtype, TYPE_A);
    assert!(!msg.incomplete && !msg.tc);
    assert_eq!(
        addrs(&msg),
        vec![(IpAddr::V4(Ipv4Addr::new(93, 184, 216, 34)), 300)]
    );
    let (chain, _) = resolve(&msg);
    assert_eq!(chain, vec!["www.example.com".to_string()]);
}

#[test]
fn aaaa_answer() {
    let ip: Ipv6Addr = "2001:db8::1".parse().unwrap();
    let mut m = Msg::response("v6.example.org", TYPE_AAAA, 1);
    m.aaaa(&ptr(Q), 60, ip);
    let msg = parse_response(&m.buf).unwrap();
    assert_eq!(addrs(&msg), vec![(IpAddr::V6(ip), 60)]);
}

#[test]
fn cname_chain_is_followed_and_reported_from_the_question() {
    let mut m = Msg::response("www.example.com", TYPE_A, 5);
    // www.example.com CNAME cdn.example.com (compressed: "cdn" + pointer to "example.com").
    let mut target = vec![3];
    target.extend_from_slice(b"cdn");
    target.extend(ptr(Q + 4));
    m.cname(&ptr(Q), 3600, &target);
    let cdn_at = m.pos() - target.len() as u16;
    // cdn.example.com CNAME edge.cdn.net (uncompressed).
    m.cname(&ptr(cdn_at), 120, &enc("edge.cdn.net"));
    let edge_at = m.pos() - enc("edge.cdn.net").len() as u16;
    m.a(&ptr(edge_at), 20, [192, 0, 2, 10]);
    m.a(&ptr(edge_at), 300, [192, 0, 2, 11]);
    // An address of a name outside the chain is not kept.
    m.a(&enc("other.example"), 300, [198, 51, 100, 1]);
    let msg = parse_response(&m.buf).unwrap();
    assert_eq!(msg.answers.len(), 5);
    let (chain, addresses) = resolve(&msg);
    assert_eq!(
        chain,
        vec!["www.example.com", "cdn.example.com", "edge.cdn.net"]
    );
    let got: Vec<_> = addresses.iter().map(|a| (a.ip, a.ttl)).collect();
    // TTL is the smallest along the chain.
    assert_eq!(
        got,
        vec![
            (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)), 20),
            (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 11)), 120)
        ]
    );
    let name = DnsName::new(chain);
    assert_eq!(name.domain(), "www.example.com");
    assert_eq!(name.chain().len(), 3);
}

#[test]
fn cname_loop_terminates() {
    let mut m = Msg::response("a.test", TYPE_A, 3);
    m.cname(&ptr(Q), 60, &enc("b.test"));
    m.cname(&enc("b.test"), 60, &enc("a.test"));
    m.a(&enc("a.test"), 60, [10, 0, 0, 1]);
    let msg = parse_response(&m.buf).unwrap();
    let (chain, addresses) = resolve(&msg);
    assert_eq!(chain, vec!["a.test", "b.test"]);
    assert!(
        addresses.is_empty(),
        "a looping chain has no final name with addresses"
    );
}

#[test]
fn multiple_answers_mixed_families_duplicates_and_skipped_types() {
    let mut m = Msg::response("multi.test", TYPE_A, 6);
    let mut mx = vec![0, 10];
    mx.extend(ptr(Q));
    m.record(&ptr(Q), TYPE_MX, CLASS_IN, 60, &mx);
    m.record(&ptr(Q), TYPE_A, CLASS_CH, 60, &[1, 2, 3, 4]);
    m.a(&ptr(Q), 60, [10, 0, 0, 1]);
    m.a(&ptr(Q), 60, [10, 0, 0, 2]);
    m.a(&ptr(Q), 60, [10, 0, 0, 1]);
    m.aaaa(&ptr(Q), 60, Ipv6Addr::LOCALHOST);
    let msg = parse_response(&m.buf).unwrap();
    assert_eq!(msg.answers.len(), 4, "MX and class CH records are skipped");
    let got: Vec<IpAddr> = addrs(&msg).into_iter().map(|(ip, _)| ip).collect();
    assert_eq!(
        got,
        vec![
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        ]
    );
}

#[test]
fn names_are_lowercased_and_escaped() {
    let mut m = Msg::response("WwW.ExAmPlE.CoM", TYPE_A, 1);
    m.a(&enc("www.example.COM"), 5, [1, 1, 1, 1]);
    let msg = parse_response(&m.buf).unwrap();
    assert_eq!(msg.qname, "www.example.com");
    assert_eq!(
        addrs(&msg).len(),
        1,
        "case-insensitive owner match (0x20 randomisation)"
    );

    let mut raw = Msg::new(1, FLAGS_RESPONSE, 1, 0);
    raw.raw(&[4, b'a', b'.', 0xFF, b' ', 0])
        .u16(TYPE_A)
        .u16(CLASS_IN);
    assert_eq!(parse_response(&raw.buf).unwrap().qname, "a\\046\\255\\032");
}

#[test]
fn root_question() {
    let mut m = Msg::new(1, FLAGS_RESPONSE, 1, 0);
    m.raw(&[0]).u16(TYPE_A).u16(CLASS_IN);
    let msg = parse_response(&m.buf).unwrap();
    assert_eq!(msg.qname, "");
    assert_eq!(DnsName::new(vec![msg.qname]).domain(), ".");
    assert_eq!(DnsName::new(vec![]).domain(), ".");
}

#[test]
fn header_checks() {
    let mut query = Msg::new(1, 0x0100, 1, 0);
    query.raw(&enc("x.test")).u16(TYPE_A).u16(CLASS_IN);
    assert_eq!(parse_response(&query.buf), Err(WireError::NotResponse));

    let mut notify = Msg::new(1, 0x8000 | (4 << 11), 1, 0);
    notify.raw(&enc("x.test")).u16(TYPE_A).u16(CLASS_IN);
    assert_eq!(parse_response(&notify.buf), Err(WireError::NotQuery));

    let mut two = Msg::new(1, FLAGS_RESPONSE, 2, 0);
    two.raw(&enc("x.test")).u16(TYPE_A).u16(CLASS_IN);
    assert_eq!(parse_response(&two.buf), Err(WireError::QuestionCount));

    let tc = Msg::response("x.test", TYPE_A, 0);
    let mut bytes = tc.buf.clone();
    bytes[2] |= 0x02;
    assert!(parse_response(&bytes).unwrap().tc);

    let mut nx = Msg::response("nx.test", TYPE_A, 0);
    nx.buf[3] = (nx.buf[3] & 0xF0) | 3;
    assert_eq!(parse_response(&nx.buf).unwrap().rcode, 3);
}

#[test]
fn truncation_at_every_length() {
    let mut m = Msg::response("www.example.com", TYPE_A, 3);
    m.cname(&ptr(Q), 60, &enc("x.example.net"));
    let x_at = m.pos() - enc("x.example.net").len() as u16;
    m.a(&ptr(x_at), 60, [192, 0, 2, 1]);
    m.a(&ptr(x_at), 60, [192, 0, 2, 2]);
    let full = parse_response(&m.buf).unwrap();
    assert_eq!(full.answers.len(), 3);
    let question_end = 12 + enc("www.example.com").len() + 4;
    for cut in 0..m.buf.len() {
        let r = parse_response(&m.buf[..cut]);
        if cut < question_end {
            assert_eq!(r, Err(WireError::Truncated), "cut at {cut}");
        } else {
            let msg = r.unwrap_or_else(|e| panic!("cut at {cut}: {e}"));
            assert!(msg.incomplete, "cut at {cut} must be flagged");
            assert!(msg.answers.len() < 3);
            // Kept records are exactly a prefix of the full answer list.
            assert_eq!(msg.answers[..], full.answers[..msg.answers.len()]);
        }
    }
}

#[test]
fn compression_loops_are_rejected() {
    // Answer owner points at itself.
    let mut m = Msg::response("loop.test", TYPE_A, 1);
    let at = m.pos();
    m.a(&ptr(at), 60, [1, 2, 3, 4]);
    assert_eq!(parse_response(&m.buf), Err(WireError::PointerLoop));

    // Forward pointer into a later pointer that points back: a two-pointer loop.
    let mut m = Msg::response("loop.test", TYPE_A, 1);
    let at = m.pos();
    m.raw(&ptr(at + 2)).raw(&ptr(at));
    assert_eq!(
        read_name(&m.buf, at as usize).map_err(WireError::from),
        Err(WireError::PointerLoop)
    );

    // A label followed by a pointer back to the label's own start: every
    // pointer points backwards, yet the walk would cycle.
    let mut m = Msg::response("loop.test", TYPE_A, 1);
    let at = m.pos();
    m.raw(&[1, b'a']).raw(&ptr(at));
    m.u16(TYPE_A)
        .u16(CLASS_IN)
        .raw(&60u32.to_be_bytes())
        .u16(4)
        .raw(&[1, 2, 3, 4]);
    assert_eq!(parse_response(&m.buf), Err(WireError::PointerLoop));
}

#[test]
fn pointer_out_of_range() {
    let mut m = Msg::response("x.test", TYPE_A, 1);
    m.a(&ptr(0x3FFF), 60, [1, 2, 3, 4]);
    assert_eq!(parse_response(&m.buf), Err(WireError::PointerOutOfRange));
}

#[test]
fn label_longer_than_63() {
    for octet in [64u8, 0x7F, 0x80, 0xBF] {
        let mut m = Msg::new(1, FLAGS_RESPONSE, 1, 0);
        m.raw(&[octet])
            .raw(&[b'a'; 200])
            .raw(&[0])
            .u16(TYPE_A)
            .u16(CLASS_IN);
        assert_eq!(
            parse_response(&m.buf),
            Err(WireError::LabelTooLong),
            "octet {octet:#x}"
        );
    }
}

#[test]
fn name_longer_than_255() {
    let label = [b'a'; 63];
    let mut m = Msg::new(1, FLAGS_RESPONSE, 1, 0);
    for _ in 0..4 {
        m.raw(&[63]).raw(&label);
    }
    m.raw(&[0]).u16(TYPE_A).u16(CLASS_IN);
    assert_eq!(parse_response(&m.buf), Err(WireError::NameTooLong));

    // 253 octets in place is fine...
    let mut ok = Msg::new(1, FLAGS_RESPONSE, 1, 1);
    for _ in 0..3 {
        ok.raw(&[63]).raw(&label);
    }
    ok.raw(&[61])
        .raw(&label[..61])
        .raw(&[0])
        .u16(TYPE_A)
        .u16(CLASS_IN);
    assert_eq!(parse_response(&ok.buf).unwrap().qname.len(), 4 * 64 - 3);
    // ...but prefixing a label through a pointer makes it 257.
    ok.raw(&[1, b'b'])
        .raw(&ptr(Q))
        .u16(TYPE_A)
        .u16(CLASS_IN)
        .raw(&[0, 0, 0, 1])
        .u16(4)
        .raw(&[1, 2, 3, 4]);
    assert_eq!(parse_response(&ok.buf), Err(WireError::NameTooLong));
}

#[test]
fn bad_address_length() {
    let mut m = Msg::response("x.test", TYPE_A, 1);
    m.record(&ptr(Q), TYPE_A, CLASS_IN, 60, &[1, 2, 3, 4, 5]);
    assert_eq!(parse_response(&m.buf), Err(WireError::BadRecordLength));

    // After a good record, a bad one only ends the section.
    let mut m = Msg::response("x.test", TYPE_A, 2);
    m.a(&ptr(Q), 60, [1, 2, 3, 4]);
    m.record(&ptr(Q), TYPE_AAAA, CLASS_IN, 60, &[0; 4]);
    let msg = parse_response(&m.buf).unwrap();
    assert!(msg.incomplete);
    assert_eq!(msg.answers.len(), 1);
    assert_eq!(
        msg.answers[0].data,
        RecordData::A(Ipv4Addr::new(1, 2, 3, 4))
    );

    // A CNAME whose target overruns its rdata.
    let mut m = Msg::response("x.test", TYPE_A, 1);
    let target = enc("longer.test");
    m.raw(&ptr(Q))
        .u16(TYPE_CNAME)
        .u16(CLASS_IN)
        .raw(&[0, 0, 0, 1])
        .u16(3)
        .raw(&target);
    assert_eq!(parse_response(&m.buf), Err(WireError::BadRecordLength));
}

/// Deterministic xorshift generator for garbage inputs.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn garbage_never_panics() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut seed = Msg::response("www.example.com", TYPE_A, 2);
    seed.cname(&ptr(Q), 60, &enc("b.example"));
    seed.a(&enc("b.example"), 60, [1, 2, 3, 4]);
    let mut accepted = 0;
    for round in 0..20_000 {
        let mut bytes = if round % 2 == 0 {
            let len = (rng.next() % 300) as usize;
            (0..len).map(|_| rng.next() as u8).collect::<Vec<u8>>()
        } else {
            // Mutate a valid message: valid structure reaches deeper code.
            let mut b = seed.buf.clone();
            for _ in 0..(1 + rng.next() % 4) {
                let i = (rng.next() as usize) % b.len();
                b[i] = rng.next() as u8;
            }
            b
        };
        if let Ok(m) = parse_response(&bytes) {
            accepted += 1;
            let _ = resolve(&m);
        }
        // Also through the IP/UDP layer.
        let proto = if round % 3 == 0 { ETH_P_IPV6 } else { ETH_P_IP };
        bytes.truncate(400);
        let _ = decode_packet(proto, PACKET_HOST, &bytes);
    }
    assert!(
        accepted > 0,
        "mutations of a valid message should sometimes parse"
    );
}

// ---- IP / UDP ----

fn ipv4_udp(src: SocketAddr, dst: SocketAddr, payload: &[u8], options: &[u8]) -> Vec<u8> {
    let (IpAddr::V4(s), IpAddr::V4(d)) = (src.ip(), dst.ip()) else {
        panic!("v4 only")
    };
    assert_eq!(options.len() % 4, 0);
    let ihl = 20 + options.len();
    let total = ihl + 8 + payload.len();
    let mut p = vec![0x40 | (ihl / 4) as u8, 0];
    p.extend((total as u16).to_be_bytes());
    p.extend([0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend(s.octets());
    p.extend(d.octets());
    p.extend(options);
    p.extend(src.port().to_be_bytes());
    p.extend(dst.port().to_be_bytes());
    p.extend(((8 + payload.len()) as u16).to_be_bytes());
    p.extend([0, 0]);
    p.extend(payload);
    p
}

fn ipv6_udp(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let (IpAddr::V6(s), IpAddr::V6(d)) = (src.ip(), dst.ip()) else {
        panic!("v6 only")
    };
    let mut p = vec![0x60, 0, 0, 0];
    p.extend(((8 + payload.len()) as u16).to_be_bytes());
    p.extend([17, 64]);
    p.extend(s.octets());
    p.extend(d.octets());
    p.extend(src.port().to_be_bytes());
    p.extend(dst.port().to_be_bytes());
    p.extend(((8 + payload.len()) as u16).to_be_bytes());
    p.extend([0, 0]);
    p.extend(payload);
    p
}

fn sample_dns() -> Vec<u8> {
    let mut m = Msg::response("api.example.com", TYPE_A, 1);
    m.a(&ptr(Q), 30, [203, 0, 113, 7]);
    m.buf
}

fn ep(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn decodes_ipv4_and_ipv6_responses() {
    let server = ep("192.0.2.53:53");
    let client = ep("192.0.2.2:40000");
    for options in [&[][..], &[1, 1, 1, 0][..]] {
        let pkt = ipv4_udp(server, client, &sample_dns(), options);
        let r = decode_packet(ETH_P_IP, PACKET_HOST, &pkt).unwrap();
        assert_eq!((r.client, r.server), (client, server));
        assert_eq!(r.name.domain(), "api.example.com");
        assert_eq!(
            r.addresses,
            vec![Address {
                ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7)),
                ttl: 30
            }]
        );
        assert!(!r.truncated);
    }
    let server6 = ep("[2001:db8::53]:53");
    let client6 = ep("[2001:db8::2]:41000");
    let r = decode_packet(
        ETH_P_IPV6,
        PACKET_HOST,
        &ipv6_udp(server6, client6, &sample_dns()),
    )
    .unwrap();
    assert_eq!((r.client, r.server), (client6, server6));
    assert_eq!(r.addresses.len(), 1);
}

#[test]
fn packet_drop_reasons() {
    let server = ep("192.0.2.53:53");
    let client = ep("192.0.2.2:40000");
    let good = ipv4_udp(server, client, &sample_dns(), &[]);
    let err = |proto, ty, p: &[u8]| decode_packet(proto, ty, p).unwrap_err();

    assert_eq!(err(ETH_P_IP, PACKET_OUTGOING, &good), DropReason::Outgoing);
    assert_eq!(err(0x0806, PACKET_HOST, &good), DropReason::NotIp);
    assert_eq!(err(ETH_P_IPV6, PACKET_HOST, &good), DropReason::NotIp);
    assert_eq!(
        err(ETH_P_IP, PACKET_HOST, &good[..10]),
        DropReason::BadIpHeader
    );
    let mut bad_ihl = good.clone();
    bad_ihl[0] = 0x44;
    assert_eq!(
        err(ETH_P_IP, PACKET_HOST, &bad_ihl),
        DropReason::BadIpHeader
    );
    let mut huge_ihl = good.clone();
    huge_ihl[0] = 0x4F;
    huge_ihl.truncate(40);
    assert_eq!(
        err(ETH_P_IP, PACKET_HOST, &huge_ihl),
        DropReason::BadIpHeader
    );
    let mut tcp = good.clone();
    tcp[9] = 6;
    assert_eq!(err(ETH_P_IP, PACKET_HOST, &tcp), DropReason::NotUdp);
    let mut frag = good.clone();
    frag[6] = 0x00;
    frag[7] = 0x10;
    assert_eq!(err(ETH_P_IP, PACKET_HOST, &frag), DropReason::Fragment);
    let not53 = ipv4_udp(ep("192.0.2.53:5353"), client, &sample_dns(), &[]);
    assert_eq!(err(ETH_P_IP, PACKET_HOST, &not53), DropReason::NotDnsPort);
    let mut short_udp = good.clone();
    short_udp[24..26].copy_from_slice(&4u16.to_be_bytes());
    assert_eq!(
        err(ETH_P_IP, PACKET_HOST, &short_udp),
        DropReason::BadUdpHeader
    );
    assert_eq!(
        err(ETH_P_IP, PACKET_HOST, &good[..24]),
        DropReason::BadUdpHeader
    );
    let mut query = good.clone();
    query[28 + 2] &= 0x7F;
    assert_eq!(
        err(ETH_P_IP, PACKET_HOST, &query),
        DropReason::Dns(WireError::NotResponse)
    );
}

#[test]
fn snaplen_cut_response_keeps_leading_answers() {
    let mut m = Msg::response("many.test", TYPE_A, 20);
    for i in 0..20u8 {
        m.a(&ptr(Q), 60, [10, 0, 0, i]);
    }
    let pkt = ipv4_udp(ep("192.0.2.53:53"), ep("192.0.2.2:40000"), &m.buf, &[]);
    let full = decode_packet(ETH_P_IP, PACKET_HOST, &pkt).unwrap();
    assert_eq!(full.addresses.len(), 20);
    assert!(!full.truncated);
    let cut = decode_packet(ETH_P_IP, PACKET_HOST, &pkt[..128]).unwrap();
    assert!(cut.truncated);
    assert!(!cut.addresses.is_empty() && cut.addresses.len() < 20);
    assert_eq!(cut.addresses[..], full.addresses[..cut.addresses.len()]);
}

#[test]
fn drop_reason_table_is_consistent() {
    for (i, r) in DropReason::ALL.iter().enumerate() {
        assert_eq!(r.index(), i, "{r:?}");
    }
    let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), DropReason::COUNT);
}

// ---- classic BPF filter, run by a small interpreter ----

/// Runs a classic BPF program over `pkt` the way the kernel does for a
/// cooked socket, supporting the instructions the filter uses.
fn run_bpf(prog: &[crate::sys::packet::BpfInsn], pkt: &[u8], protocol: u16, pkttype: u8) -> u32 {
    use libc::*;
    let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
    let load = |off: u32, size: usize| -> Option<u32> {
        let off = off as i32;
        if off == SKF_AD_OFF + SKF_AD_PROTOCOL {
            return Some(u32::from(protocol));
        }
        if off == SKF_AD_OFF + SKF_AD_PKTTYPE {
            return Some(u32::from(pkttype));
        }
        let off = usize::try_from(off).ok()?;
        let b = pkt.get(off..off + size)?;
        Some(b.iter().fold(0u32, |acc, v| (acc << 8) | u32::from(*v)))
    };
    loop {
        let i = prog[pc];
        pc += 1;
        let code = u32::from(i.code);
        let size = |code: u32| match code & 0x18 {
            BPF_W => 4,
            BPF_H => 2,
            _ => 1,
        };
        match code {
            c if c == BPF_LD | BPF_ABS | (c & 0x18) => match load(i.k, size(c)) {
                Some(v) => a = v,
                None => return 0,
            },
            c if c == BPF_LD | BPF_IND | (c & 0x18) => match load(x.wrapping_add(i.k), size(c)) {
                Some(v) => a = v,
                None => return 0,
            },
            c if c == BPF_LDX | BPF_B | BPF_MSH => match pkt.get(i.k as usize) {
                Some(b) => x = u32::from(b & 0xF) * 4,
                None => return 0,
            },
            c if c == BPF_JMP | BPF_JEQ | BPF_K => {
                pc += usize::from(if a == i.k { i.jt } else { i.jf })
            }
            c if c == BPF_JMP | BPF_JSET | BPF_K => {
                pc += usize::from(if a & i.k != 0 { i.jt } else { i.jf })
            }
            c if c == BPF_RET | BPF_K => return i.k,
            other => panic!("instruction {other:#x} not supported by the test interpreter"),
        }
    }
}

#[test]
fn kernel_filter_accepts_only_incoming_dns_responses() {
    const SNAP: u32 = 1024;
    let prog = filter_program(SNAP);
    let server = ep("192.0.2.53:53");
    let client = ep("192.0.2.2:40000");
    let dns = sample_dns();
    let v4 = ipv4_udp(server, client, &dns, &[]);
    let v4_opts = ipv4_udp(server, client, &dns, &[1, 1, 1, 1, 1, 1, 1, 0]);
    let v6 = ipv6_udp(ep("[2001:db8::53]:53"), ep("[2001:db8::2]:40000"), &dns);
    assert_eq!(run_bpf(&prog, &v4, ETH_P_IP, PACKET_HOST), SNAP);
    assert_eq!(run_bpf(&prog, &v4_opts, ETH_P_IP, PACKET_HOST), SNAP);
    assert_eq!(run_bpf(&prog, &v6, ETH_P_IPV6, PACKET_HOST), SNAP);

    assert_eq!(
        run_bpf(&prog, &v4, ETH_P_IP, PACKET_OUTGOING),
        0,
        "outgoing copy"
    );
    assert_eq!(run_bpf(&prog, &v4, 0x0806, PACKET_HOST), 0, "not IP");
    let query = ipv4_udp(client, server, &dns, &[]);
    assert_eq!(
        run_bpf(&prog, &query, ETH_P_IP, PACKET_HOST),
        0,
        "to port 53, not from"
    );
    let mut tcp = v4.clone();
    tcp[9] = 6;
    assert_eq!(run_bpf(&prog, &tcp, ETH_P_IP, PACKET_HOST), 0, "TCP");
    let mut frag = v4.clone();
    frag[6] = 0x20;
    frag[7] = 0x01;
    assert_eq!(
        run_bpf(&prog, &frag, ETH_P_IP, PACKET_HOST),
        0,
        "non-first fragment"
    );
    let mut first_frag = v4.clone();
    first_frag[6] = 0x20;
    first_frag[7] = 0x00;
    assert_eq!(
        run_bpf(&prog, &first_frag, ETH_P_IP, PACKET_HOST),
        SNAP,
        "first fragment"
    );
    let mut v6_tcp = v6.clone();
    v6_tcp[6] = 6;
    assert_eq!(
        run_bpf(&prog, &v6_tcp, ETH_P_IPV6, PACKET_HOST),
        0,
        "IPv6 TCP"
    );
    let v6_query = ipv6_udp(ep("[2001:db8::2]:40000"), ep("[2001:db8::53]:53"), &dns);
    assert_eq!(
        run_bpf(&prog, &v6_query, ETH_P_IPV6, PACKET_HOST),
        0,
        "IPv6 query"
    );
    assert_eq!(
        run_bpf(&prog, &v4[..21], ETH_P_IP, PACKET_HOST),
        0,
        "short packet"
    );
}

// ---- table ----

const SEC: u64 = 1_000_000_000;

fn response(client: &str, name: &str, ips: &[&str], ttl: u32) -> DnsResponse {
    DnsResponse {
        client: ep(client),
        server: ep("192.0.2.53:53"),
        id: 1,
        rcode: 0,
        qtype: TYPE_A,
        name: Arc::new(DnsName::new(vec![name.to_string()])),
        addresses: ips
            .iter()
            .map(|s| Address {
                ip: s.parse().unwrap(),
                ttl,
            })
            .collect(),
        truncated: false,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn domain(t: &DnsTable, now: u64, pid: u32, addr: &str) -> Option<(String, MatchSource)> {
    t.lookup(now, pid, ip(addr))
        .map(|m| (m.domain().to_string(), m.source))
}

#[test]
fn observe_then_claim_moves_answers_to_the_process() {
    let mut t = DnsTable::new(TableLimits::default());
    t.observe_response(
        0,
        &response("192.0.2.2:40000", "a.test", &["10.0.0.1", "10.0.0.2"], 300),
    );
    assert_eq!(
        domain(&t, SEC, 100, "10.0.0.1"),
        Some(("a.test".into(), MatchSource::Host))
    );
    t.claim(SEC, ep("192.0.2.2:40000"), 100);
    assert_eq!(
        domain(&t, 2 * SEC, 100, "10.0.0.1"),
        Some(("a.test".into(), MatchSource::Process))
    );
    assert_eq!(
        domain(&t, 2 * SEC, 100, "10.0.0.2"),
        Some(("a.test".into(), MatchSource::Process))
    );
    assert_eq!(
        domain(&t, 2 * SEC, 200, "10.0.0.1"),
        Some(("a.test".into(), MatchSource::Host))
    );
    assert_eq!(domain(&t, 2 * SEC, 100, "10.0.0.3"), None);
    let s = t.stats();
    assert_eq!(
        (s.claimed_later, s.answers_kept, s.pending_clients),
        (1, 2, 0)
    );
    assert_eq!((s.processes, s.process_entries, s.host_entries), (1, 2, 2));
}

#[test]
fn claim_then_observe_goes_straight_to_the_process() {
    let mut t = DnsTable::new(TableLimits::default());
    t.claim(0, ep("192.0.2.2:40000"), 7);
    t.observe_response(
        SEC,
        &response("192.0.2.2:40000", "b.test", &["10.0.0.9"], 30),
    );
    assert_eq!(
        domain(&t, SEC, 7, "10.0.0.9"),
        Some(("b.test".into(), MatchSource::Process))
    );
    assert_eq!(t.stats().claimed_on_arrival, 1);
    // After the claim window, responses are parked again.
    t.observe_response(
        20 * SEC,
        &response("192.0.2.2:40000", "c.test", &["10.0.0.10"], 30),
    );
    assert_eq!(
        domain(&t, 20 * SEC, 7, "10.0.0.10"),
        Some(("c.test".into(), MatchSource::Host))
    );
    assert_eq!(t.stats().pending_clients, 1);
}

#[test]
fn process_answer_wins_over_host_answer() {
    let mut t = DnsTable::new(TableLimits::default());
    t.claim(0, ep("192.0.2.2:1000"), 1);
    t.observe_response(
        0,
        &response("192.0.2.2:1000", "mine.test", &["10.1.1.1"], 60),
    );
    // Another client later resolves a different name to the same address.
    t.observe_response(
        SEC,
        &response("192.0.2.2:2000", "theirs.test", &["10.1.1.1"], 60),
    );
    assert_eq!(
        domain(&t, 2 * SEC, 1, "10.1.1.1"),
        Some(("mine.test".into(), MatchSource::Process))
    );
    assert_eq!(
        domain(&t, 2 * SEC, 2, "10.1.1.1"),
        Some(("theirs.test".into(), MatchSource::Host))
    );
    assert!(t.lookup_counted(2 * SEC, 1, ip("10.1.1.1")).is_some());
    assert!(t.lookup_counted(2 * SEC, 2, ip("10.1.1.1")).is_some());
    assert!(t.lookup_counted(2 * SEC, 2, ip("10.9.9.9")).is_none());
    let s = t.stats();
    assert_eq!((s.lookups_process, s.lookups_host), (1, 1));
}

#[test]
fn wildcard_and_mapped_claims() {
    let mut t = DnsTable::new(TableLimits::default());
    t.observe_response(0, &response("192.0.2.2:5000", "w.test", &["10.2.2.2"], 60));
    t.observe_response(
        0,
        &response("[2001:db8::2]:5000", "w6.test", &["2001:db8::99"], 60),
    );
    t.claim(SEC, ep("0.0.0.0:5000"), 42);
    assert_eq!(
        domain(&t, SEC, 42, "10.2.2.2"),
        Some(("w.test".into(), MatchSource::Process))
    );
    assert_eq!(
        domain(&t, SEC, 42, "2001:db8::99"),
        Some(("w6.test".into(), MatchSource::Host)),
        "a v4 wildcard does not claim v6 responses"
    );
    // A dual-stack socket reports v4 peers as v4-mapped addresses.
    t.claim(SEC, ep("[::ffff:192.0.2.2]:6000"), 43);
    t.observe_response(
        SEC,
        &response("192.0.2.2:6000", "m.test", &["10.3.3.3"], 60),
    );
    assert_eq!(
        domain(&t, SEC, 43, "::ffff:10.3.3.3"),
        Some(("m.test".into(), MatchSource::Process))
    );
}

#[test]
fn retention_is_clamped_ttl() {
    let limits = TableLimits {
        min_retention: Duration::from_secs(60),
        max_retention: Duration::from_secs(600),
        ..TableLimits::default()
    };
    let mut t = DnsTable::new(limits);
    t.claim(0, ep("192.0.2.2:1"), 1);
    t.observe_response(0, &response("192.0.2.2:1", "short.test", &["10.0.0.1"], 5));
    t.observe_response(0, &response("192.0.2.2:1", "mid.test", &["10.0.0.2"], 120));
    t.observe_response(
        0,
        &response("192.0.2.2:1", "long.test", &["10.0.0.3"], 86_400),
    );
    assert!(domain(&t, 59 * SEC, 1, "10.0.0.1").is_some());
    assert!(domain(&t, 61 * SEC, 1, "10.0.0.1").is_none());
    assert!(domain(&t, 119 * SEC, 1, "10.0.0.2").is_some());
    assert!(domain(&t, 121 * SEC, 1, "10.0.0.2").is_none());
    assert!(domain(&t, 599 * SEC, 1, "10.0.0.3").is_some());
    assert!(domain(&t, 601 * SEC, 1, "10.0.0.3").is_none());
    t.expire(121 * SEC);
    let s = t.stats();
    assert_eq!((s.process_entries, s.host_entries, s.processes), (1, 1, 1));
    assert!(s.approx_bytes > 0);
    t.expire(601 * SEC);
    let s = t.stats();
    assert_eq!(
        (s.process_entries, s.host_entries, s.processes, s.claims),
        (0, 0, 0, 0)
    );
}

#[test]
fn unclaimed_responses_expire_from_the_pending_window() {
    let mut t = DnsTable::new(TableLimits::default());
    t.observe_response(0, &response("192.0.2.2:1", "late.test", &["10.0.0.1"], 300));
    t.claim(11 * SEC, ep("192.0.2.2:1"), 5);
    assert_eq!(
        domain(&t, 11 * SEC, 5, "10.0.0.1"),
        Some(("late.test".into(), MatchSource::Host))
    );
    assert_eq!(t.stats().pending_expired, 1);
    t.observe_response(
        20 * SEC,
        &response("192.0.2.2:2", "gone.test", &["10.0.0.2"], 300),
    );
    t.expire(31 * SEC);
    let s = t.stats();
    assert_eq!((s.pending_expired, s.pending_clients), (2, 0));
}

#[test]
fn fork_inherits_and_exit_forgets() {
    let mut t = DnsTable::new(TableLimits::default());
    t.claim(0, ep("192.0.2.2:1"), 10);
    t.observe_response(0, &response("192.0.2.2:1", "p.test", &["10.0.0.1"], 300));
    t.fork(SEC, 10, 11);
    assert_eq!(
        domain(&t, SEC, 11, "10.0.0.1"),
        Some(("p.test".into(), MatchSource::Process))
    );
    // Later answers of the parent are its own.
    t.observe_response(
        2 * SEC,
        &response("192.0.2.2:1", "q.test", &["10.0.0.2"], 300),
    );
    assert_eq!(
        domain(&t, 2 * SEC, 11, "10.0.0.2").map(|d| d.1),
        Some(MatchSource::Host)
    );
    t.on_exit(10);
    assert_eq!(
        domain(&t, 3 * SEC, 10, "10.0.0.1").map(|d| d.1),
        Some(MatchSource::Host)
    );
    assert_eq!(
        domain(&t, 3 * SEC, 11, "10.0.0.1").map(|d| d.1),
        Some(MatchSource::Process)
    );
    // The exited process's claim is gone: new responses are parked.
    t.observe_response(
        3 * SEC,
        &response("192.0.2.2:1", "r.test", &["10.0.0.3"], 300),
    );
    let s = t.stats();
    assert_eq!((s.claims, s.pending_clients, s.processes), (0, 1, 1));
}

#[test]
fn release_forgets_the_claim() {
    let mut t = DnsTable::new(TableLimits::default());
    t.claim(0, ep("192.0.2.2:1"), 10);
    t.release(ep("192.0.2.2:1"));
    t.observe_response(0, &response("192.0.2.2:1", "x.test", &["10.0.0.1"], 300));
    assert_eq!(
        domain(&t, 0, 10, "10.0.0.1").map(|d| d.1),
        Some(MatchSource::Host)
    );
}

#[test]
fn bounds_are_enforced_and_counted() {
    let limits = TableLimits {
        max_entries_per_process: 4,
        max_process_entries: 6,
        max_host_entries: 5,
        max_pending_clients: 2,
        max_responses_per_client: 2,
        ..TableLimits::default()
    };
    let mut t = DnsTable::new(limits);
    t.claim(0, ep("192.0.2.2:1"), 1);
    for i in 0..6u64 {
        let a = format!("10.0.0.{i}");
        // Later addresses get longer TTLs, so the per-process eviction
        // (earliest expiry) drops the first ones.
        t.observe_response(
            i,
            &response("192.0.2.2:1", "n.test", &[a.as_str()], 100 + i as u32 * 100),
        );
    }
    let s = t.stats();
    assert_eq!((s.process_entries, s.host_entries), (4, 5));
    assert_eq!((s.process_evictions, s.host_evictions), (2, 1));
    assert!(domain(&t, 10, 1, "10.0.0.1").map(|d| d.1) != Some(MatchSource::Process));
    assert_eq!(
        domain(&t, 10, 1, "10.0.0.5").map(|d| d.1),
        Some(MatchSource::Process)
    );

    // The global bound evicts the oldest entries of any process.
    t.claim(0, ep("192.0.2.2:2"), 2);
    t.observe_response(
        10,
        &response(
            "192.0.2.2:2",
            "o.test",
            &["10.1.0.1", "10.1.0.2", "10.1.0.3"],
            300,
        ),
    );
    let s = t.stats();
    assert_eq!(s.process_entries, 6);
    assert_eq!(s.process_evictions, 3);
    assert_eq!(s.processes, 2);

    // Pending: two clients, two responses each.
    for port in 10..13u16 {
        for k in 0..3 {
            t.observe_response(
                20,
                &response(
                    &format!("192.0.2.2:{port}"),
                    "p.test",
                    &["10.2.0.1"],
                    300 + k,
                ),
            );
        }
    }
    let s = t.stats();
    assert_eq!(s.pending_clients, 2);
    // 3 clients x 1 per-client overflow + the first client's 2 responses.
    assert_eq!(s.pending_evictions, 5);
}

#[test]
fn responses_without_addresses_are_counted_not_stored() {
    let mut t = DnsTable::new(TableLimits::default());
    t.observe_response(0, &response("192.0.2.2:1", "nx.test", &[], 0));
    let s = t.stats();
    assert_eq!(
        (
            s.responses_observed,
            s.responses_without_addresses,
            s.pending_clients
        ),
        (1, 1, 0)
    );
}

#[test]
fn config_errors() {
    let mut cfg = crate::config::DnsConfig {
        kind: "pcap".into(),
        ..Default::default()
    };
    assert!(matches!(
        DnsCapture::open(&cfg),
        Err(DnsError::UnsupportedType { .. })
    ));
    cfg.kind = "af_packet".into();
    cfg.af_packet.snaplen = 16;
    assert!(matches!(
        DnsCapture::open(&cfg),
        Err(DnsError::Snaplen { .. })
    ));
    cfg.af_packet.snaplen = 1024;
    cfg.af_packet.interface = "no-such-if0".into();
    assert!(matches!(
        DnsCapture::open(&cfg),
        Err(DnsError::Socket { .. })
    ));
    cfg.enabled = false;
    assert!(DnsCapture::open_if_enabled(&cfg).unwrap().is_none());
}
