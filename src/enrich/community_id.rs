//! Community ID flow hashing, version 1.
//!
//! The hash is SHA-1 over, in order: the 16-bit seed (network order), the
//! source address bytes, the destination address bytes, the IP protocol
//! number, one zero byte of padding, the source port and the destination
//! port (both network order). Before hashing, the endpoints are ordered so
//! that the smaller (address, port) pair comes first; this makes both
//! directions of a flow hash alike. The result is base64 (standard alphabet,
//! padded) behind the version prefix `1:`.

use std::net::IpAddr;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha1::{Digest, Sha1};

use crate::model::Transport;

/// Version prefix of every Community ID v1 string.
pub const PREFIX: &str = "1:";

/// The seed sockscope uses (the specification's default).
pub const DEFAULT_SEED: u16 = 0;

/// Bytes of an address as the specification hashes them: 4 for IPv4,
/// 16 for IPv6.
fn addr_bytes(ip: &IpAddr) -> ([u8; 16], usize) {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (out, 4)
        }
        IpAddr::V6(v6) => {
            out.copy_from_slice(&v6.octets());
            (out, 16)
        }
    }
}

/// Community ID v1 of a TCP or UDP 5-tuple with the given seed.
///
/// Mixed families (one IPv4 and one IPv6 end) never occur on the wire; if
/// they are passed anyway the shorter encoding sorts first, which keeps the
/// result deterministic.
pub fn community_id_v1(
    seed: u16,
    transport: Transport,
    src: IpAddr,
    src_port: u16,
    dst: IpAddr,
    dst_port: u16,
) -> String {
    let (sb, sl) = addr_bytes(&src);
    let (db, dl) = addr_bytes(&dst);
    let s = (&sb[..sl], src_port);
    let d = (&db[..dl], dst_port);
    // Order the endpoints: smaller address first, ports break ties.
    let (a, b) = if (s.0, s.1) <= (d.0, d.1) {
        (s, d)
    } else {
        (d, s)
    };

    let mut h = Sha1::new();
    h.update(seed.to_be_bytes());
    h.update(a.0);
    h.update(b.0);
    h.update([transport.number(), 0]);
    h.update(a.1.to_be_bytes());
    h.update(b.1.to_be_bytes());
    let digest = h.finalize();

    let mut out = String::with_capacity(PREFIX.len() + 28);
    out.push_str(PREFIX);
    STANDARD.encode_string(digest, &mut out);
    out
}

/// Community ID v1 with the default seed 0.
pub fn community_id(
    transport: Transport,
    src: IpAddr,
    src_port: u16,
    dst: IpAddr,
    dst_port: u16,
) -> String {
    community_id_v1(DEFAULT_SEED, transport, src, src_port, dst, dst_port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cid(t: Transport, s: &str, sp: u16, d: &str, dp: u16) -> String {
        community_id(t, s.parse().unwrap(), sp, d.parse().unwrap(), dp)
    }

    // Vectors from the specification's published baseline (seed 0).
    #[test]
    fn baseline_tcp_v4_both_directions() {
        let want = "1:LQU9qZlK+B5F3KDmev6m5PMibrg=";
        assert_eq!(
            cid(
                Transport::Tcp,
                "128.232.110.120",
                34855,
                "66.35.250.204",
                80
            ),
            want
        );
        assert_eq!(
            cid(
                Transport::Tcp,
                "66.35.250.204",
                80,
                "128.232.110.120",
                34855
            ),
            want
        );
    }

    #[test]
    fn baseline_udp_v4_both_directions() {
        let want = "1:d/FP5EW3wiY1vCndhwleRRKHowQ=";
        assert_eq!(
            cid(Transport::Udp, "192.168.1.52", 54585, "8.8.8.8", 53),
            want
        );
        assert_eq!(
            cid(Transport::Udp, "8.8.8.8", 53, "192.168.1.52", 54585),
            want
        );
    }

    #[test]
    fn baseline_tcp_v6_both_directions() {
        let want = "1:/qFaeAR+gFe1KYjMzVDsMv+wgU4=";
        let a = "2001:470:e5bf:dead:4957:2174:e82c:4887";
        let b = "2607:f8b0:400c:c03::1a";
        assert_eq!(cid(Transport::Tcp, a, 63943, b, 25), want);
        assert_eq!(cid(Transport::Tcp, b, 25, a, 63943), want);
    }

    #[test]
    fn spec_readme_examples() {
        assert_eq!(
            cid(Transport::Tcp, "1.2.3.4", 1122, "5.6.7.8", 3344),
            "1:wCb3OG7yAFWelaUydu0D+125CLM="
        );
        assert_eq!(
            cid(Transport::Udp, "1.2.3.4", 1122, "5.6.7.8", 3344),
            "1:0Mu9InQx6z4ZiCZM/7HXi2WMhOg="
        );
    }

    #[test]
    fn seed_document_example() {
        assert_eq!(
            cid(Transport::Tcp, "10.0.2.15", 40192, "151.101.66.217", 80),
            "1:jdjL1TkdpF1v1GM0+JxRRp+V7KI="
        );
    }

    #[test]
    fn seed_changes_hash_and_same_ip_orders_by_port() {
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        assert_ne!(
            community_id_v1(1, Transport::Tcp, a, 1, a, 2),
            community_id_v1(0, Transport::Tcp, a, 1, a, 2)
        );
        assert_eq!(
            community_id(Transport::Tcp, a, 1, a, 2),
            community_id(Transport::Tcp, a, 2, a, 1)
        );
    }
}
