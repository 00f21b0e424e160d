//! The capture socket's classic BPF filter: only DNS responses reach user
//! space.

use super::datagram::{DNS_PORT, ETH_P_IP, ETH_P_IPV6, PACKET_OUTGOING};
use crate::headers::{IPPROTO_UDP, IPV4_FRAG_OFFSET_MASK, IPV6_HEADER_LEN};
use crate::sys::packet::BpfInsn;

const fn stmt(code: u32, k: u32) -> BpfInsn {
    BpfInsn {
        // Classic BPF opcodes fit in 16 bits.
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jump(code: u32, k: u32, jt: u8, jf: u8) -> BpfInsn {
    BpfInsn {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// The classic BPF program attached to the cooked (`SOCK_DGRAM`) capture
/// socket: packet offsets start at the network header whatever the link
/// type, and the link protocol is read from the skb (`SKF_AD_PROTOCOL`), so
/// one program serves Ethernet, loopback, tunnels and `any`. It accepts,
/// truncated to `snaplen` bytes, packets that are not outgoing (on `lo` every
/// packet is seen twice, outgoing then incoming) and are IPv4 or IPv6 UDP
/// with source port 53. IPv4 fragments with a non-zero offset are refused
/// (they carry no UDP header); a first fragment passes and is parsed as a
/// cut-off message. IPv6 packets with extension headers before UDP are
/// refused.
pub fn filter_program(snaplen: u32) -> Vec<BpfInsn> {
    use libc::{
        BPF_ABS, BPF_B, BPF_H, BPF_IND, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_LDX,
        BPF_MSH, BPF_RET, BPF_W, SKF_AD_OFF, SKF_AD_PKTTYPE, SKF_AD_PROTOCOL,
    };
    // Ancillary offsets are negative; the kernel reads k as a signed value.
    let ad_pkttype = (SKF_AD_OFF + SKF_AD_PKTTYPE) as u32;
    let ad_protocol = (SKF_AD_OFF + SKF_AD_PROTOCOL) as u32;
    // Jump offsets are relative to the next instruction; the layout is:
    //  0 ld pkttype        1 jeq OUTGOING -> drop(17)
    //  2 ld protocol       3 jeq IP -> v4(5)       4 jeq IPV6 -> v6(12) else drop
    //  5 ldb [9]           6 jeq UDP else drop     7 ldh [6]
    //  8 jset fragoff -> drop                     9 ldxb 4*([0]&0xf)
    // 10 ldh [x+0]        11 jeq 53 -> accept(16) else drop
    // 12 ldb [6]          13 jeq UDP else drop    14 ldh [40]
    // 15 jeq 53 -> accept else drop
    // 16 ret snaplen      17 ret 0
    vec![
        stmt(BPF_LD | BPF_W | BPF_ABS, ad_pkttype),
        jump(BPF_JMP | BPF_JEQ | BPF_K, u32::from(PACKET_OUTGOING), 15, 0),
        stmt(BPF_LD | BPF_W | BPF_ABS, ad_protocol),
        jump(BPF_JMP | BPF_JEQ | BPF_K, u32::from(ETH_P_IP), 1, 0),
        jump(BPF_JMP | BPF_JEQ | BPF_K, u32::from(ETH_P_IPV6), 7, 12),
        // IPv4
        stmt(BPF_LD | BPF_B | BPF_ABS, 9),
        jump(BPF_JMP | BPF_JEQ | BPF_K, u32::from(IPPROTO_UDP), 0, 10),
        stmt(BPF_LD | BPF_H | BPF_ABS, 6),
        jump(
            BPF_JMP | BPF_JSET | BPF_K,
            u32::from(IPV4_FRAG_OFFSET_MASK),
            8,
            0,
        ),
        stmt(BPF_LDX | BPF_B | BPF_MSH, 0),
        stmt(BPF_LD | BPF_H | BPF_IND, 0),
        jump(BPF_JMP | BPF_JEQ | BPF_K, u32::from(DNS_PORT), 4, 5),
        // IPv6
        stmt(BPF_LD | BPF_B | BPF_ABS, 6),
        jump(BPF_JMP | BPF_JEQ | BPF_K, u32::from(IPPROTO_UDP), 0, 3),
        stmt(BPF_LD | BPF_H | BPF_ABS, IPV6_HEADER_LEN as u32),
        jump(BPF_JMP | BPF_JEQ | BPF_K, u32::from(DNS_PORT), 0, 1),
        stmt(BPF_RET | BPF_K, snaplen),
        stmt(BPF_RET | BPF_K, 0),
    ]
}
