//! The socket filter program, run by a small classic BPF interpreter
//! over accepted and rejected packets.

use super::*;
use crate::enrich::dns::bpf::filter_program;

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
