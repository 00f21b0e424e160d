//! Decoder unit tests: datagram windows recorded from real kernels, and
//! random windows that must never panic.

use super::sample::{ip_protocol, parse_udp_delivery};
use super::*;

/// The window a `udp_in` sample carries: `bytes` right-aligned (the
/// probe reads the bytes that end at the payload).
fn window(bytes: &[u8]) -> Vec<u8> {
    let mut w = vec![0u8; UDP_DELIVER_WINDOW - bytes.len()];
    w.extend_from_slice(bytes);
    w
}

// Recorded on Debian 5.10 (virtio-net, datagram from the host through
// qemu's forwarding): Ethernet, IPv4 and UDP headers before a 200-byte
// payload.
const V4_VIRTIO_5_10: [u8; 42] = [
    82, 84, 0, 18, 52, 86, 82, 85, 10, 0, 2, 2, 8, 0, 69, 0, 0, 228, 3, 192, 0, 0, 64, 17, 94, 57,
    10, 0, 2, 2, 10, 0, 2, 15, 207, 96, 35, 221, 0, 208, 72, 85,
];
// Recorded on Debian 5.10 (loopback ::1): IPv6 and UDP headers before a
// 100-byte payload.
const V6_LOOPBACK_5_10: [u8; 48] = [
    96, 1, 128, 163, 0, 108, 17, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 185, 47, 35, 222, 0, 108, 0, 127,
];

#[test]
fn delivered_ipv4_datagram_recorded_on_5_10() {
    let (src, dst, len) = parse_udp_delivery(&window(&V4_VIRTIO_5_10), 200, 1).unwrap();
    assert_eq!(src, "10.0.2.2:53088".parse().unwrap());
    assert_eq!(dst, "10.0.2.15:9181".parse().unwrap());
    assert_eq!(len, 228);
}

#[test]
fn delivered_ipv6_datagram_recorded_on_5_10() {
    let (src, dst, len) = parse_udp_delivery(&window(&V6_LOOPBACK_5_10), 100, 1).unwrap();
    assert_eq!(src, "[::1]:47407".parse().unwrap());
    assert_eq!(dst, "[::1]:9182".parse().unwrap());
    assert_eq!(len, 148);
}

#[test]
fn delivered_ipv4_datagram_with_options() {
    // IHL 7: 8 bytes of options (NOPs) between the addresses and UDP.
    let mut b = vec![0x47, 0, 0, 28 + 8 + 10, 0, 0, 0, 0, 64, 17, 0, 0];
    b.extend_from_slice(&[192, 168, 1, 1, 192, 168, 1, 2]);
    b.extend_from_slice(&[1; 8]);
    b.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 18, 0, 0]);
    let (src, dst, len) = parse_udp_delivery(&window(&b), 10, 1).unwrap();
    assert_eq!(src, "192.168.1.1:12345".parse().unwrap());
    assert_eq!(dst, "192.168.1.2:53".parse().unwrap());
    assert_eq!(len, 46);
}

#[test]
fn inconsistent_delivery_windows_are_errors() {
    // UDP length larger than the payload says.
    assert!(parse_udp_delivery(&window(&V4_VIRTIO_5_10), 100, 1).is_err());
    // No IP header before the UDP header.
    assert!(parse_udp_delivery(&window(&V4_VIRTIO_5_10[20..]), 200, 1).is_err());
    // IPv4 total length that does not match the UDP length.
    let mut b = V4_VIRTIO_5_10;
    b[17] = 229;
    assert!(parse_udp_delivery(&window(&b), 200, 1).is_err());
    // All zeros (a read past the linear data).
    assert!(parse_udp_delivery(&[0; UDP_DELIVER_WINDOW], 200, 1).is_err());
    // Too short, and random windows never panic.
    assert!(parse_udp_delivery(&[0; 8], 0, 1).is_err());
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..10_000 {
        let w: Vec<u8> = (0..UDP_DELIVER_WINDOW)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let _ = parse_udp_delivery(&w, seed % 70_000, 1);
    }
}

#[test]
fn ip_protocol_reads_the_next_header() {
    assert_eq!(ip_protocol(&V4_VIRTIO_5_10[14..], IpFamily::V4), Some(17));
    assert_eq!(ip_protocol(&V6_LOOPBACK_5_10, IpFamily::V6), Some(17));
    assert_eq!(ip_protocol(&V6_LOOPBACK_5_10, IpFamily::V4), None);
    assert_eq!(ip_protocol(&[], IpFamily::V4), None);
}

#[test]
fn tcp_flags_come_from_the_fetched_header() {
    use super::sample::parse_ip;
    use crate::model::Transport;
    // IPv4 (IHL 5) + TCP header with SYN|ACK; then with IHL 15 the flags
    // byte (60 + 13) lies beyond a 64-byte fetch.
    let mut h = vec![0u8; 64];
    h[0] = 0x45;
    h[9] = 6;
    h[20..24].copy_from_slice(&[0x1f, 0x90, 0xa0, 0x28]);
    h[33] = 0x12;
    let (t, src, _, flags, _) = parse_ip(&h, IpFamily::V4, 1).unwrap().unwrap();
    assert_eq!((t, src.port(), flags), (Transport::Tcp, 8080, Some(0x12)));
    h[0] = 0x4f;
    h[60..64].copy_from_slice(&[0x1f, 0x90, 0xa0, 0x28]);
    let (_, _, _, flags, seq) = parse_ip(&h, IpFamily::V4, 1).unwrap().unwrap();
    assert_eq!((flags, seq), (None, None));
    // UDP carries none.
    h[0] = 0x45;
    h[9] = 17;
    let (_, _, _, flags, seq) = parse_ip(&h, IpFamily::V4, 1).unwrap().unwrap();
    assert_eq!((flags, seq), (None, None));
}

#[test]
fn tcp_sequence_numbers_come_from_the_fetched_header() {
    use super::sample::parse_ip;
    // IPv4 (IHL 5) + TCP header, seq 0xfffffff0, data offset 8 (32 bytes
    // with options): the payload starts at 52.
    let mut h = vec![0u8; 64];
    h[0] = 0x45;
    h[9] = 6;
    h[20..24].copy_from_slice(&[0x1f, 0x90, 0xa0, 0x28]);
    h[24..28].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
    h[32] = 0x80;
    let (_, _, _, _, seq) = parse_ip(&h, IpFamily::V4, 1).unwrap().unwrap();
    assert_eq!(seq, Some((0xffff_fff0, 52)));
    // A data offset below 5 is no TCP header.
    h[32] = 0x40;
    let (_, _, _, _, seq) = parse_ip(&h, IpFamily::V4, 1).unwrap().unwrap();
    assert_eq!(seq, None);
    // IPv6 + TCP: the data offset byte at 40 + 12 is within 64 bytes.
    let mut h = vec![0u8; 64];
    h[0] = 0x60;
    h[6] = 6;
    h[40..44].copy_from_slice(&[0x1f, 0x90, 0xa0, 0x28]);
    h[44..48].copy_from_slice(&7u32.to_be_bytes());
    h[52] = 0x50;
    let (_, _, _, _, seq) = parse_ip(&h, IpFamily::V6, 1).unwrap().unwrap();
    assert_eq!(seq, Some((7, 60)));
}
