//! `struct sk_buff`: length, data and head pointers and the network and
//! transport header offsets, found from a UDP datagram of random
//! length seen leaving and arriving on loopback.

use std::net::IpAddr;

use crate::probe::guess::net;
use crate::probe::guess::search::{find_u16, find_u32, u64_at, Intersection, Offsets as Cands};
use crate::probe::guess::session::GuessProbe;
use crate::probe::guess::{Ctx, GuessError, GuessRecord, Known};

use super::{be16, deref, dump, v4_of, MAX_PAYLOAD, WORD};

/// Words of an `sk_buff` dumped (covers every field used on 5.x–7.x).
const SKB_WORDS: u32 = 32;
/// Bytes read behind each `sk_buff` word: IPv4 header + UDP header.
const SKB_POINTEE: u32 = 28;
/// IPv4 header without options.
const IPV4_HEADER: u32 = 20;
/// UDP header.
const UDP_HEADER: u32 = 8;
/// Smallest kernel address: the x86-64 upper half with 5-level paging
/// (0xff00…; 4-level kernels start higher, at 0xffff8…).
const KERNEL_ADDR_MIN: u64 = 0xff00_0000_0000_0000;

/// Fields of the `sk_buff` guess, with their sizes in bytes.
pub(super) const SKB_FIELDS: &[(&str, u32)] = &[
    ("sk_buff.len", 4),
    ("sk_buff.data", 8),
    ("sk_buff.head", 8),
    ("sk_buff.network_header", 2),
    ("sk_buff.transport_header", 2),
];

fn skb_args(skb: &str) -> String {
    let mut v = vec![dump("s", skb, 0, SKB_WORDS)];
    v.extend(
        (0..SKB_WORDS).map(|i| format!("d{i}=+0({}):u8[{SKB_POINTEE}]", deref(i * WORD, skb))),
    );
    v.join(" ")
}

/// Probes of the `sk_buff` guess.
pub(super) fn skb_probes(_: &Known) -> Result<Vec<GuessProbe>, GuessError> {
    Ok(vec![
        GuessProbe {
            name: "g_ip_out",
            functions: &["ip_output"],
            fetchargs: skb_args("$arg3"),
        },
        GuessProbe {
            name: "g_ip_in",
            functions: &["ip_local_deliver"],
            fetchargs: skb_args("$arg1"),
        },
    ])
}

/// Word indexes whose pointee is the IPv4/UDP header we sent.
fn header_words(ctx: &Ctx<'_, '_>, r: &GuessRecord, hdr: &[(usize, &[u8])]) -> Vec<u32> {
    (0..SKB_WORDS)
        .filter(|i| {
            let d = ctx.field(r, &format!("d{i}"));
            hdr.iter()
                .all(|(at, want)| d.get(*at..*at + want.len()) == Some(*want))
        })
        .collect()
}

/// One repetition of the `sk_buff` guess: trigger, read, add candidates.
pub(super) fn skb_rep(ctx: &mut Ctx<'_, '_>, x: &mut Intersection) -> Result<(), GuessError> {
    let (rx, dst) = net::udp_socket(IpAddr::V4(net::random_v4()), 0, false)?;
    // Odd repetitions send without checksum offload so that csum_start
    // (equal to the transport header offset otherwise) is told apart.
    let (tx, src) = net::udp_socket(IpAddr::V4(net::random_v4()), 0, ctx.rep % 2 == 1)?;
    let payload = fastrand::usize(1..=MAX_PAYLOAD);
    let ip_len = IPV4_HEADER + UDP_HEADER + payload as u32;
    net::send_to(&tx, dst, payload)?;
    let tot_len = be16(ip_len as u16);
    let (s, d) = (v4_of(src), v4_of(dst));
    let (sp, dp) = (be16(src.port()), be16(dst.port()));
    let hdr: [(usize, &[u8]); 6] = [
        (0, &[0x45]),
        (2, &tot_len),
        (12, &s),
        (16, &d),
        (20, &sp),
        (22, &dp),
    ];
    let mut seen = [false; 2];
    let mut recs = Vec::new();
    // Egress and ingress may land on different CPUs and in either order.
    while !(seen[0] && seen[1]) {
        let got = ctx.collect("UDP datagram", |r| {
            r.probe < 2 && !seen[r.probe] && !header_words(ctx, r, &hdr).is_empty()
        })?;
        for r in got {
            if let Some(f) = seen.get_mut(r.probe) {
                *f = true;
            }
            recs.push(r);
        }
    }
    net::drain(&rx);
    for r in &recs {
        let sd = ctx.field(r, "s");
        let words = header_words(ctx, r, &hdr);
        x.add("sk_buff.data", words.iter().map(|i| i * WORD).collect());
        x.add("sk_buff.len", find_u32(sd, ip_len));
        let (mut head, mut nh, mut th) = (Cands::new(), Cands::new(), Cands::new());
        for &w in &words {
            let Some(data) = u64_at(sd, (w * WORD) as usize) else {
                continue;
            };
            for h in (0..SKB_WORDS).filter(|&h| h != w) {
                let Some(p) = u64_at(sd, (h * WORD) as usize) else {
                    continue;
                };
                if p < KERNEL_ADDR_MIN || p >= data {
                    continue;
                }
                let Ok(off) = u16::try_from(data - p) else {
                    continue;
                };
                let n = find_u16(sd, off);
                let t = find_u16(sd, off.saturating_add(IPV4_HEADER as u16));
                if !n.is_empty() && !t.is_empty() {
                    head.insert(h * WORD);
                    nh.extend(n);
                    th.extend(t);
                }
            }
        }
        x.add("sk_buff.head", head);
        x.add("sk_buff.network_header", nh);
        x.add("sk_buff.transport_header", th);
    }
    Ok(())
}
