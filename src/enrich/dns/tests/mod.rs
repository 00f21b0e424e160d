//! Tests on hand-built DNS messages and packets, one file per concern;
//! the builders of messages and IP/UDP datagrams they share live here.

mod bpf;
mod capture;
mod datagram;
mod message;
mod table;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::datagram::{decode_packet, ETH_P_IP, ETH_P_IPV6, PACKET_OUTGOING};
use super::message::{WireError, CLASS_IN, TYPE_A, TYPE_AAAA, TYPE_CNAME};
use super::*;

const PACKET_HOST: u8 = libc::PACKET_HOST;
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
