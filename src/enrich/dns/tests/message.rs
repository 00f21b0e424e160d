//! The DNS message parser: answers, CNAME chains, name decoding and
//! every way a malformed message is rejected.

use super::*;
use crate::enrich::dns::datagram::resolve;
use crate::enrich::dns::message::{parse_response, read_name, Message, RecordData};

const TYPE_MX: u16 = 15;
const CLASS_CH: u16 = 3;

fn addrs(m: &Message) -> Vec<(IpAddr, u32)> {
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
