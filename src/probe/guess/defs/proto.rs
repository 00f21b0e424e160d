//! `struct proto`: the offset of `name`, read from `tcp_prot` and
//! `udp_prot`, and then `sock_common.skc_prot`, the word of a `sock`
//! whose pointee holds that name.

use std::net::IpAddr;

use crate::probe::guess::net;
use crate::probe::guess::search::{find_bytes, u32_at, Intersection, Offsets as Cands};
use crate::probe::guess::session::GuessProbe;
use crate::probe::guess::{need, Ctx, GuessError, GuessRecord, Known};

use super::{deref, joined, mine, DUMP_BYTES, DUMP_WORDS, WORD};

/// Bytes of `struct proto` dumped (`name` lies within).
const PROTO_DUMP_BYTES: u32 = DUMP_BYTES + DUMP_BYTES / 2;
/// Size of `proto.name` (`char name[32]` on every kernel).
pub(super) const PROTO_NAME_LEN: u32 = 32;

/// Fields of the `proto_name` guess, with their sizes in bytes.
pub(super) const PROTO_NAME_FIELDS: &[(&str, u32)] = &[("proto.name", PROTO_NAME_LEN)];

/// Probes of the `proto_name` guess.
pub(super) fn proto_name_probes(_: &Known) -> Result<Vec<GuessProbe>, GuessError> {
    let sym = |name: &str, sym: &str| {
        format!(
            "{name}0=@{sym}:u64[{DUMP_WORDS}] {name}1=@{sym}+{DUMP_BYTES}:u64[{}]",
            (PROTO_DUMP_BYTES - DUMP_BYTES) / WORD
        )
    };
    Ok(vec![GuessProbe {
        name: "g_connect",
        functions: &["tcp_connect"],
        fetchargs: format!("{} {}", sym("t", "tcp_prot"), sym("u", "udp_prot")),
    }])
}

/// One repetition of the `proto_name` guess: trigger, read, add candidates.
pub(super) fn proto_name_rep(
    ctx: &mut Ctx<'_, '_>,
    x: &mut Intersection,
) -> Result<(), GuessError> {
    let (fd, _) = net::tcp_connect(
        IpAddr::V4(net::random_v4()),
        net::v4(net::random_v4(), net::random_port()),
    )?;
    let recs = ctx.collect("TCP connect", |r| mine(ctx, r, 0))?;
    drop(fd);
    for r in &recs {
        let t = joined(ctx, r, &["t0", "t1"]);
        let u = joined(ctx, r, &["u0", "u1"]);
        x.add("proto.name", find_bytes(&t, b"TCP\0", 1));
        x.add("proto.name", find_bytes(&u, b"UDP\0", 1));
    }
    Ok(())
}

/// Fields of the `sock_prot` guess, with their sizes in bytes.
pub(super) const SOCK_PROT_FIELDS: &[(&str, u32)] = &[("sock_common.skc_prot", 8)];

fn prot_args(name_off: u32) -> String {
    (0..DUMP_WORDS)
        .map(|i| format!("p{i}=+{name_off}({}):u32", deref(i * WORD, "$arg1")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Probes of the `sock_prot` guess.
pub(super) fn sock_prot_probes(known: &Known) -> Result<Vec<GuessProbe>, GuessError> {
    let name = need(known, "sock_prot", "proto.name")?.offset;
    Ok(vec![
        GuessProbe {
            name: "g_connect",
            functions: &["tcp_connect"],
            fetchargs: prot_args(name),
        },
        GuessProbe {
            name: "g_udp_send",
            functions: &["udp_sendmsg"],
            fetchargs: prot_args(name),
        },
    ])
}

fn prot_cands(ctx: &Ctx<'_, '_>, r: &GuessRecord, want: &[u8; 4]) -> Cands {
    let v = u32::from_le_bytes(*want);
    (0..DUMP_WORDS)
        .filter(|i| u32_at(ctx.field(r, &format!("p{i}")), 0) == Some(v))
        .map(|i| i * WORD)
        .collect()
}

/// One repetition of the `sock_prot` guess: trigger, read, add candidates.
pub(super) fn sock_prot_rep(ctx: &mut Ctx<'_, '_>, x: &mut Intersection) -> Result<(), GuessError> {
    const F: &str = "sock_common.skc_prot";
    let (fd, _) = net::tcp_connect(
        IpAddr::V4(net::random_v4()),
        net::v4(net::random_v4(), net::random_port()),
    )?;
    for r in ctx.collect("TCP connect", |r| mine(ctx, r, 0))? {
        x.add(F, prot_cands(ctx, &r, b"TCP\0"));
    }
    drop(fd);
    let a6 = ctx.pool.fresh()?;
    let dst6 = net::v6(ctx.pool.fresh()?, net::random_port());
    let (fd, _) = net::tcp_connect(IpAddr::V6(a6), dst6)?;
    for r in ctx.collect("TCPv6 connect", |r| mine(ctx, r, 0))? {
        x.add(F, prot_cands(ctx, &r, b"TCPv"));
    }
    drop(fd);
    let (fd, _) = net::udp_socket(IpAddr::V4(net::random_v4()), 0, false)?;
    net::send_to(&fd, net::v4(net::random_v4(), net::random_port()), 1)?;
    for r in ctx.collect("UDP send", |r| mine(ctx, r, 1))? {
        x.add(F, prot_cands(ctx, &r, b"UDP\0"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependent_guesses_need_their_inputs() {
        let e = sock_prot_probes(&Known::new()).unwrap_err();
        assert!(
            matches!(
                e,
                GuessError::Dependency {
                    field: "proto.name",
                    ..
                }
            ),
            "{e}"
        );
    }
}
