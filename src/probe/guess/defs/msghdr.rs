//! `struct msghdr` and the socket addresses it points at: `msg_name`,
//! `msg_namelen` and the port and address of `sockaddr_in` and
//! `sockaddr_in6`, found from UDP sends to random destinations.

use std::net::IpAddr;

use crate::probe::guess::net;
use crate::probe::guess::search::{
    find_bytes, find_u32, u16_at, u64_at, Intersection, Offsets as Cands,
};
use crate::probe::guess::session::GuessProbe;
use crate::probe::guess::{Ctx, GuessError, GuessRecord, Known};

use super::{
    be16, deref, dump, kernel_words, mine, pointer_words, v4_of, v6_of, word_names, Resolved,
    AF_INET, AF_INET6, MAX_PAYLOAD, WORD,
};

/// Words of a `msghdr` dumped.
const MSGHDR_WORDS: u32 = 8;
/// Bytes read behind each `msghdr` word (a `sockaddr_in6` is 28).
const MSGHDR_POINTEE: u32 = 32;
/// sizeof(struct sockaddr_in).
const SOCKADDR_IN_LEN: u32 = 16;
/// sizeof(struct sockaddr_in6).
const SOCKADDR_IN6_LEN: u32 = 28;
/// Candidates of the pointer pre-pass.
const POINTERS: &str = "msghdr.pointers";
/// Names of the `msghdr` words found to hold kernel addresses.
const MSGHDR_WORD_NAMES: [&str; MSGHDR_WORDS as usize] = word_names!("msghdr": 0 1 2 3 4 5 6 7);

/// Fields of the `msghdr` guess, with their sizes in bytes.
pub(super) const MSGHDR_FIELDS: &[(&str, u32)] = &[
    ("msghdr.msg_name", 8),
    ("msghdr.msg_namelen", 4),
    ("sockaddr_in.sin_port", 2),
    ("sockaddr_in.sin_addr", 4),
    ("sockaddr_in6.sin6_port", 2),
    ("sockaddr_in6.sin6_addr", 16),
];

/// The `msghdr` words, and the pointee of each word the pre-pass found
/// holding a kernel address (`known`).
fn msghdr_args(known: &Known) -> String {
    let mut v = vec![dump("m", "$arg2", 0, MSGHDR_WORDS)];
    v.extend(
        (0..MSGHDR_WORDS)
            .filter(|&i| known.contains_key(MSGHDR_WORD_NAMES[i as usize]))
            .map(|i| format!("n{i}=+0({}):u8[{MSGHDR_POINTEE}]", deref(i * WORD, "$arg2"))),
    );
    v.join(" ")
}

/// The probes of both `msghdr` passes, fetching `args`.
fn msghdr_guess_probes(args: &str) -> Vec<GuessProbe> {
    vec![
        GuessProbe {
            name: "g_udp_send",
            functions: &["udp_sendmsg"],
            fetchargs: args.to_string(),
        },
        GuessProbe {
            name: "g_udp6_send",
            functions: &["udpv6_sendmsg"],
            fetchargs: args.to_string(),
        },
    ]
}

/// Probes of the `msghdr` pointer pre-pass: the words and the `msghdr`
/// address itself.
pub(super) fn msghdr_pointer_probes(_: &Known) -> Result<Vec<GuessProbe>, GuessError> {
    Ok(msghdr_guess_probes(&format!(
        "{} p=$arg2:x64",
        dump("m", "$arg2", 0, MSGHDR_WORDS)
    )))
}

/// One repetition of the pointer pre-pass: a v4 and a v6 `sendto`; the
/// words holding kernel addresses in the `msghdr` of each.
pub(super) fn msghdr_pointer_rep(
    ctx: &mut Ctx<'_, '_>,
    x: &mut Intersection,
) -> Result<(), GuessError> {
    let (fd, _) = net::udp_socket(IpAddr::V4(net::random_v4()), 0, false)?;
    let dst = net::v4(net::random_v4(), net::random_port());
    net::send_to(&fd, dst, fastrand::usize(1..=MAX_PAYLOAD))?;
    let mut recs = ctx.collect("UDP send", |r| mine(ctx, r, 0))?;
    drop(fd);
    let (fd, _) = net::udp_socket(IpAddr::V6(ctx.pool.fresh()?), 0, false)?;
    let dst = net::v6(ctx.pool.fresh()?, net::random_port());
    net::send_to(&fd, dst, fastrand::usize(1..=MAX_PAYLOAD))?;
    recs.extend(ctx.collect("UDPv6 send", |r| mine(ctx, r, 1))?);
    for r in &recs {
        let own = u64_at(ctx.field(r, "p"), 0).unwrap_or(0);
        x.add(POINTERS, kernel_words(ctx.field(r, "m"), own));
    }
    Ok(())
}

/// The pre-pass's result: one field per word to dereference.
pub(super) fn msghdr_pointers(x: &Intersection) -> Result<Resolved, GuessError> {
    pointer_words("msghdr_pointers", POINTERS, &MSGHDR_WORD_NAMES, x)
}

/// Probes of the `msghdr` guess.
pub(super) fn msghdr_probes(known: &Known) -> Result<Vec<GuessProbe>, GuessError> {
    Ok(msghdr_guess_probes(&msghdr_args(known)))
}

/// (word index, port offsets, address offsets) of pointees holding the
/// destination we sent to.
fn name_words(
    ctx: &Ctx<'_, '_>,
    r: &GuessRecord,
    family: u16,
    port: [u8; 2],
    addr: &[u8],
) -> Vec<(u32, Cands, Cands)> {
    (0..MSGHDR_WORDS)
        .filter_map(|i| {
            let n = ctx.field(r, &format!("n{i}"));
            let p = find_bytes(n, &port, 2);
            let a = find_bytes(n, addr, 4);
            (u16_at(n, 0) == Some(family) && !p.is_empty() && !a.is_empty()).then_some((i, p, a))
        })
        .collect()
}

/// One repetition of the `msghdr` guess: trigger, read, add candidates.
pub(super) fn msghdr_rep(ctx: &mut Ctx<'_, '_>, x: &mut Intersection) -> Result<(), GuessError> {
    let (fd, _) = net::udp_socket(IpAddr::V4(net::random_v4()), 0, false)?;
    let dst = net::v4(net::random_v4(), net::random_port());
    net::send_to(&fd, dst, fastrand::usize(1..=MAX_PAYLOAD))?;
    let (port, addr) = (be16(dst.port()), v4_of(dst));
    for r in ctx.collect("UDP send", |r| {
        mine(ctx, r, 0) && !name_words(ctx, r, AF_INET, port, &addr).is_empty()
    })? {
        let words = name_words(ctx, &r, AF_INET, port, &addr);
        x.add(
            "msghdr.msg_name",
            words.iter().map(|w| w.0 * WORD).collect(),
        );
        x.add(
            "sockaddr_in.sin_port",
            words.iter().flat_map(|w| w.1.clone()).collect(),
        );
        x.add(
            "sockaddr_in.sin_addr",
            words.iter().flat_map(|w| w.2.clone()).collect(),
        );
        x.add(
            "msghdr.msg_namelen",
            find_u32(ctx.field(&r, "m"), SOCKADDR_IN_LEN),
        );
    }
    drop(fd);
    let (fd, _) = net::udp_socket(IpAddr::V6(ctx.pool.fresh()?), 0, false)?;
    let dst = net::v6(ctx.pool.fresh()?, net::random_port());
    net::send_to(&fd, dst, fastrand::usize(1..=MAX_PAYLOAD))?;
    let (port, addr) = (be16(dst.port()), v6_of(dst));
    for r in ctx.collect("UDPv6 send", |r| {
        mine(ctx, r, 1) && !name_words(ctx, r, AF_INET6, port, &addr).is_empty()
    })? {
        let words = name_words(ctx, &r, AF_INET6, port, &addr);
        x.add(
            "msghdr.msg_name",
            words.iter().map(|w| w.0 * WORD).collect(),
        );
        x.add(
            "sockaddr_in6.sin6_port",
            words.iter().flat_map(|w| w.1.clone()).collect(),
        );
        x.add(
            "sockaddr_in6.sin6_addr",
            words.iter().flat_map(|w| w.2.clone()).collect(),
        );
        x.add(
            "msghdr.msg_namelen",
            find_u32(ctx.field(&r, "m"), SOCKADDR_IN6_LEN),
        );
    }
    Ok(())
}
