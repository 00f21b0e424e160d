//! `struct socket`: its `sk` pointer and `type`, found in the socket
//! released after a TCP connection and a UDP send.

use std::net::IpAddr;

use crate::probe::guess::net;
use crate::probe::guess::search::{find_u16, find_u64, u64_at, Intersection};
use crate::probe::guess::session::GuessProbe;
use crate::probe::guess::{Ctx, GuessError, GuessRecord, Known};

use super::{dump, mine, SOCK_DGRAM, SOCK_STREAM};

/// Words of a `struct socket` dumped.
const SOCKET_WORDS: u32 = 16;

/// Fields of the `socket` guess, with their sizes in bytes.
pub(super) const SOCKET_FIELDS: &[(&str, u32)] = &[("socket.sk", 8), ("socket.type", 2)];

/// Probes of the `socket` guess.
pub(super) fn socket_probes(_: &Known) -> Result<Vec<GuessProbe>, GuessError> {
    Ok(vec![
        GuessProbe {
            name: "g_connect",
            functions: &["tcp_connect"],
            fetchargs: "sk=$arg1:u64".into(),
        },
        GuessProbe {
            name: "g_udp_send",
            functions: &["udp_sendmsg"],
            fetchargs: "sk=$arg1:u64".into(),
        },
        GuessProbe {
            name: "g_release",
            functions: &["inet_release"],
            fetchargs: dump("s", "$arg1", 0, SOCKET_WORDS),
        },
    ])
}

fn sk_of(ctx: &Ctx<'_, '_>, recs: &[GuessRecord]) -> Option<u64> {
    recs.iter().find_map(|r| u64_at(ctx.field(r, "sk"), 0))
}

/// One repetition of the `socket` guess: trigger, read, add candidates.
pub(super) fn socket_rep(ctx: &mut Ctx<'_, '_>, x: &mut Intersection) -> Result<(), GuessError> {
    let (fd, _) = net::tcp_connect(
        IpAddr::V4(net::random_v4()),
        net::v4(net::random_v4(), net::random_port()),
    )?;
    let sk = sk_of(ctx, &ctx.collect("TCP connect", |r| mine(ctx, r, 0))?).unwrap_or(0);
    drop(fd);
    let has_sk = |ctx: &Ctx<'_, '_>, r: &GuessRecord, sk: u64| {
        mine(ctx, r, 2) && !find_u64(ctx.field(r, "s"), sk).is_empty()
    };
    for r in ctx.collect("TCP close", |r| has_sk(ctx, r, sk))? {
        let d = ctx.field(&r, "s");
        x.add("socket.sk", find_u64(d, sk));
        x.add("socket.type", find_u16(d, SOCK_STREAM));
    }
    let (fd, _) = net::udp_socket(IpAddr::V4(net::random_v4()), 0, false)?;
    net::send_to(&fd, net::v4(net::random_v4(), net::random_port()), 1)?;
    let sk = sk_of(ctx, &ctx.collect("UDP send", |r| mine(ctx, r, 1))?).unwrap_or(0);
    drop(fd);
    for r in ctx.collect("UDP close", |r| has_sk(ctx, r, sk))? {
        let d = ctx.field(&r, "s");
        x.add("socket.sk", find_u64(d, sk));
        x.add("socket.type", find_u16(d, SOCK_DGRAM));
    }
    Ok(())
}
