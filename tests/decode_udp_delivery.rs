//! UDP delivery samples (`udp_in` on `__udp_enqueue_schedule_skb`) and
//! TCP-only ingress packets, decoded from records laid out by formats and
//! header bytes recorded on Debian 5.10 (bullseye), 6.1 (bookworm) and
//! 7.2 (sid).

use sockscope::decode::{Decoder, DecoderKind, EventDesc, Format, IpFamily};
use sockscope::model::{EventKind, Packet, PacketDir, RawSample, Transport};

const UDP_IN_5_10: &str = include_str!("fixtures/udp_in/5.10.format");
const UDP_IN_7_2: &str = include_str!("fixtures/udp_in/7.2.format");
const IP_IN_6_1: &str = include_str!("fixtures/6.1/ip_in.format");

/// `hdr` of a datagram from the host through qemu's forwarding to a server
/// bound to 10.0.2.15:9181 (virtio-net): Ethernet, IPv4, UDP, then the
/// 200-byte payload starts.
const V4_HDR: [u8; 64] = [
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 82, 84, 0, 18, 52, 86, 82,
    85, 10, 0, 2, 2, 8, 0, 69, 0, 0, 228, 3, 202, 0, 0, 64, 17, 94, 47, 10, 0, 2, 2, 10, 0, 2, 15,
    195, 130, 35, 221, 0, 208, 84, 51,
];
/// `hdr` of a 100-byte datagram over ::1 to port 9182.
const V6_HDR: [u8; 64] = [
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 134, 221, 96, 13, 109, 191, 0, 108, 17, 64, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 151,
    121, 35, 222, 0, 108, 0, 127,
];
/// What `ip_local_deliver` saw of the IPv4 datagram on 5.10: the IP header,
/// then zeros where the UDP header should be (still in a page fragment).
const V4_AT_IP_LAYER: [u8; 28] = [
    69, 0, 0, 228, 3, 206, 0, 0, 64, 17, 94, 43, 10, 0, 2, 2, 10, 0, 2, 15, 0, 0, 0, 0, 0, 0, 0, 0,
];
/// `common_flags` bit of a sample taken in softirq context.
const FLAG_SOFTIRQ: u8 = 0x10;

fn offset(format: &str, name: &str) -> usize {
    Format::parse(format).unwrap().field(name).unwrap().offset as usize
}

fn record(format: &str, size: usize) -> Vec<u8> {
    let mut r = vec![0u8; size];
    let id = Format::parse(format).unwrap().id as u16;
    r[0..2].copy_from_slice(&id.to_le_bytes());
    r[2] = FLAG_SOFTIRQ;
    r
}

fn udp_in(sk: u64, len: u32, hdr: &[u8; 64]) -> Vec<u8> {
    udp_in_as(UDP_IN_5_10, sk, len, hdr)
}

fn udp_in_as(format: &str, sk: u64, len: u32, hdr: &[u8; 64]) -> Vec<u8> {
    let mut r = record(format, 96);
    let (s, l, h) = (
        offset(format, "sk"),
        offset(format, "len"),
        offset(format, "hdr"),
    );
    r[s..s + 8].copy_from_slice(&sk.to_le_bytes());
    r[l..l + 4].copy_from_slice(&len.to_le_bytes());
    r[h..h + 64].copy_from_slice(hdr);
    r
}

fn decoder() -> Decoder {
    Decoder::new(&[
        EventDesc {
            kind: DecoderKind::UdpDeliver,
            task_context: false,
            format: UDP_IN_5_10,
        },
        EventDesc {
            kind: DecoderKind::TcpIngress {
                family: IpFamily::V4,
            },
            task_context: false,
            format: IP_IN_6_1,
        },
    ])
    .unwrap()
}

fn decode(dec: &Decoder, event: u32, data: &[u8]) -> Option<EventKind> {
    let s = RawSample {
        event,
        time: 7,
        cpu: 1,
        pid: 416,
        tid: 416,
        data,
    };
    dec.decode(&s).unwrap().map(|e| {
        assert_eq!(e.task, None, "delivery samples carry no task");
        e.kind
    })
}

#[test]
fn delivered_datagrams_carry_their_socket_and_headers() {
    let dec = decoder();
    let v4 = decode(&dec, 0, &udp_in(0xffff_9c39_ffe1_9200, 200, &V4_HDR));
    assert_eq!(
        v4,
        Some(EventKind::Packet(Packet {
            sock: Some(0xffff_9c39_ffe1_9200),
            dir: PacketDir::Ingress,
            transport: Transport::Udp,
            src: "10.0.2.2:50050".parse().unwrap(),
            dst: "10.0.2.15:9181".parse().unwrap(),
            ip_len: 228,
            tcp_flags: None,
            tcp_seq: None,
        }))
    );
    let v6 = decode(&dec, 0, &udp_in(0xffff_9c39_ffbc_ca80, 100, &V6_HDR));
    assert_eq!(
        v6,
        Some(EventKind::Packet(Packet {
            sock: Some(0xffff_9c39_ffbc_ca80),
            dir: PacketDir::Ingress,
            transport: Transport::Udp,
            src: "[::1]:38777".parse().unwrap(),
            dst: "[::1]:9182".parse().unwrap(),
            ip_len: 148,
            tcp_flags: None,
            tcp_seq: None,
        }))
    );
}

#[test]
fn malformed_delivery_windows_are_counted_errors() {
    let dec = decoder();
    fn s(data: &[u8]) -> RawSample<'_> {
        RawSample {
            event: 0,
            time: 7,
            cpu: 1,
            pid: 0,
            tid: 0,
            data,
        }
    }
    // The payload length disagrees with the UDP header.
    assert!(dec.decode(&s(&udp_in(1, 10, &V4_HDR))).is_err());
    // Nothing but zeros.
    assert!(dec.decode(&s(&udp_in(1, 200, &[0; 64]))).is_err());
    // Cut short.
    assert!(dec.decode(&s(&udp_in(1, 200, &V4_HDR)[..40])).is_err());
    assert_eq!(dec.error_counts().iter().map(|(_, n)| n).sum::<u64>(), 3);
}

#[test]
fn ingress_at_the_ip_layer_reports_tcp_only() {
    let dec = decoder();
    let h = offset(IP_IN_6_1, "hdr");
    let l = offset(IP_IN_6_1, "len");
    let mut r = record(IP_IN_6_1, 128);
    r[l..l + 4].copy_from_slice(&228u32.to_le_bytes());
    r[h..h + V4_AT_IP_LAYER.len()].copy_from_slice(&V4_AT_IP_LAYER);
    // UDP: left to udp_in, not an error.
    assert_eq!(decode(&dec, 1, &r), None);
    assert!(dec.error_counts().iter().all(|(_, n)| *n == 0));
    // The same header as TCP is reported.
    r[h + 9] = 6;
    r[h + 20..h + 24].copy_from_slice(&[0x01, 0xbb, 0xc3, 0x50]);
    match decode(&dec, 1, &r) {
        Some(EventKind::Packet(p)) => {
            assert_eq!(p.transport, Transport::Tcp);
            assert_eq!(p.src, "10.0.2.2:443".parse().unwrap());
            assert_eq!(p.dst, "10.0.2.15:50000".parse().unwrap());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_7_2_format_decodes_the_same() {
    let dec = Decoder::new(&[EventDesc {
        kind: DecoderKind::UdpDeliver,
        task_context: false,
        format: UDP_IN_7_2,
    }])
    .unwrap();
    match decode(&dec, 0, &udp_in_as(UDP_IN_7_2, 0xff37, 100, &V6_HDR)) {
        Some(EventKind::Packet(p)) => {
            assert_eq!(p.sock, Some(0xff37));
            assert_eq!(p.dst, "[::1]:9182".parse().unwrap());
            assert_eq!(p.ip_len, 148);
        }
        other => panic!("{other:?}"),
    }
}
