//! IP and UDP decoding of captured datagrams into DNS responses, and
//! the reasons a datagram is dropped.

use super::*;
use crate::enrich::dns::datagram::DropReason;

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
