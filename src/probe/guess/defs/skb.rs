//! `struct sk_buff`: length, data and head pointers and the network and
//! transport header offsets, found from a UDP datagram of random
//! length seen leaving and arriving on loopback.

use std::net::IpAddr;

use crate::probe::guess::net;
use crate::probe::guess::search::{find_u16, find_u32, u64_at, Intersection, Offsets as Cands};
use crate::probe::guess::session::GuessProbe;
use crate::probe::guess::{Ctx, GuessError, GuessRecord, Known};

use super::{
    be16, deref, dump, kernel_words, pointer_words, v4_of, word_names, Resolved,
    KERNEL_HALF_5LEVEL, MAX_PAYLOAD, WORD,
};

/// Words of an `sk_buff` dumped (covers every field used on 5.x–7.x).
const SKB_WORDS: u32 = 32;
/// Bytes read behind each `sk_buff` word: IPv4 header + UDP header.
const SKB_POINTEE: u32 = 28;
/// IPv4 header without options.
const IPV4_HEADER: u32 = 20;
/// UDP header.
const UDP_HEADER: u32 = 8;
/// Candidates of the pointer pre-pass.
const POINTERS: &str = "sk_buff.pointers";
/// Names of the `sk_buff` words found to hold kernel addresses.
const SKB_WORD_NAMES: [&str; SKB_WORDS as usize] = word_names!("sk_buff":
    0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31);

/// Fields of the `sk_buff` guess, with their sizes in bytes.
pub(super) const SKB_FIELDS: &[(&str, u32)] = &[
    ("sk_buff.len", 4),
    ("sk_buff.data", 8),
    ("sk_buff.head", 8),
    ("sk_buff.network_header", 2),
    ("sk_buff.transport_header", 2),
];

/// The `sk_buff` words, and the pointee of each word the pre-pass found
/// holding a kernel address (`known`).
fn skb_args(skb: &str, known: &Known) -> String {
    let mut v = vec![dump("s", skb, 0, SKB_WORDS)];
    v.extend(
        (0..SKB_WORDS)
            .filter(|&i| known.contains_key(SKB_WORD_NAMES[i as usize]))
            .map(|i| format!("d{i}=+0({}):u8[{SKB_POINTEE}]", deref(i * WORD, skb))),
    );
    v.join(" ")
}

/// The probes of both `sk_buff` passes: `args` for `ip_output`'s and
/// `ip_local_deliver`'s `skb` argument.
fn skb_guess_probes(args: impl Fn(&str) -> String) -> Vec<GuessProbe> {
    vec![
        GuessProbe {
            name: "g_ip_out",
            functions: &["ip_output"],
            fetchargs: args("$arg3"),
        },
        GuessProbe {
            name: "g_ip_in",
            functions: &["ip_local_deliver"],
            fetchargs: args("$arg1"),
        },
    ]
}

/// Probes of the `sk_buff` pointer pre-pass: the words and the `skb`
/// address itself.
pub(super) fn skb_pointer_probes(_: &Known) -> Result<Vec<GuessProbe>, GuessError> {
    Ok(skb_guess_probes(|skb| {
        format!("{} p={skb}:x64", dump("s", skb, 0, SKB_WORDS))
    }))
}

/// One repetition of the pointer pre-pass: a datagram out and in; every
/// `sk_buff` seen (ours or not: `data` and `head` point into the kernel in
/// each) keeps the words holding kernel addresses.
pub(super) fn skb_pointer_rep(
    ctx: &mut Ctx<'_, '_>,
    x: &mut Intersection,
) -> Result<(), GuessError> {
    let (rx, dst) = net::udp_socket(IpAddr::V4(net::random_v4()), 0, false)?;
    let (tx, _) = net::udp_socket(IpAddr::V4(net::random_v4()), 0, false)?;
    net::send_to(&tx, dst, fastrand::usize(1..=MAX_PAYLOAD))?;
    let mut seen = [false; 2];
    while !(seen[0] && seen[1]) {
        for r in ctx.collect("UDP datagram", |r| r.probe < 2 && !seen[r.probe])? {
            if let Some(f) = seen.get_mut(r.probe) {
                *f = true;
            }
            let own = u64_at(ctx.field(&r, "p"), 0).unwrap_or(0);
            x.add(POINTERS, kernel_words(ctx.field(&r, "s"), own));
        }
    }
    net::drain(&rx);
    Ok(())
}

/// The pre-pass's result: one field per word to dereference.
pub(super) fn skb_pointers(x: &Intersection) -> Result<Resolved, GuessError> {
    pointer_words("sk_buff_pointers", POINTERS, &SKB_WORD_NAMES, x)
}

/// Probes of the `sk_buff` guess.
pub(super) fn skb_probes(known: &Known) -> Result<Vec<GuessProbe>, GuessError> {
    Ok(skb_guess_probes(|skb| skb_args(skb, known)))
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
                if p < KERNEL_HALF_5LEVEL || p >= data {
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
