//! `struct proto`: the offset of `name`, read from `tcp_prot` and
//! `udp_prot`, and then `sock_common.skc_prot`: the word of a `sock` equal
//! to the address of `tcp_prot`, `tcpv6_prot` or `udp_prot` as
//! `/proc/kallsyms` lists them, or, where the symbol addresses are hidden,
//! the word whose pointee holds the protocol's name.
//!
//! Reading the pointee of every word is the fallback only: a word that is
//! no pointer but passes the kernel's address check is dereferenced too.
//! A non-canonical value passed it on a 5.10 guest whose CPU reports
//! 57-bit virtual addresses while the kernel runs 4-level paging: the read
//! faulted, was fixed up, and the kernel logged a warning (`General
//! protection fault in user access. Non-canonical address?`, taint W; a
//! panic under `panic_on_warn`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::OnceLock;

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

/// Addresses of the `struct proto` instances a `sock` points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ProtoAddrs {
    tcp: u64,
    tcpv6: Option<u64>,
    udp: u64,
}

/// `tcp_prot`, `tcpv6_prot` and `udp_prot` from `/proc/kallsyms` (read
/// once), `None` when the file is unreadable or hides addresses (zeros
/// under `kptr_restrict`).
fn proto_addrs() -> Option<ProtoAddrs> {
    static ADDRS: OnceLock<Option<ProtoAddrs>> = OnceLock::new();
    *ADDRS.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/kallsyms").ok()?;
        parse_proto_addrs(&text)
    })
}

fn parse_proto_addrs(kallsyms: &str) -> Option<ProtoAddrs> {
    let mut found: HashMap<&str, u64> = HashMap::new();
    for line in kallsyms.lines() {
        let mut it = line.split_whitespace();
        let (Some(addr), Some(_kind), Some(name)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if matches!(name, "tcp_prot" | "tcpv6_prot" | "udp_prot") {
            if let Ok(a) = u64::from_str_radix(addr, 16) {
                found.entry(name).or_insert(a);
            }
        }
    }
    let nonzero = |n: &str| found.get(n).copied().filter(|&a| a != 0);
    Some(ProtoAddrs {
        tcp: nonzero("tcp_prot")?,
        tcpv6: nonzero("tcpv6_prot"),
        udp: nonzero("udp_prot")?,
    })
}

/// Probes of the `sock_prot` guess: the words of the `sock` when the
/// addresses of the protocols are known, else each word's pointee.
pub(super) fn sock_prot_probes(known: &Known) -> Result<Vec<GuessProbe>, GuessError> {
    let name = need(known, "sock_prot", "proto.name")?.offset;
    let args = match proto_addrs() {
        Some(_) => super::dump("w", "$arg1", 0, DUMP_WORDS),
        None => prot_args(name),
    };
    Ok(vec![
        GuessProbe {
            name: "g_connect",
            functions: &["tcp_connect"],
            fetchargs: args.clone(),
        },
        GuessProbe {
            name: "g_udp_send",
            functions: &["udp_sendmsg"],
            fetchargs: args,
        },
    ])
}

/// Offsets of the words of a `sock` dump equal to `addr`.
fn addr_cands(ctx: &Ctx<'_, '_>, r: &GuessRecord, addr: u64) -> Cands {
    ctx.field(r, "w")
        .chunks_exact(WORD as usize)
        .enumerate()
        .filter(|(_, w)| <[u8; 8]>::try_from(*w).is_ok_and(|b| u64::from_le_bytes(b) == addr))
        .map(|(i, _)| i as u32 * WORD)
        .collect()
}

/// Candidates of one record: by address, or by the pointee's name.
fn cands(ctx: &Ctx<'_, '_>, r: &GuessRecord, addr: Option<u64>, name: &[u8; 4]) -> Cands {
    match (proto_addrs(), addr) {
        (Some(_), Some(a)) => addr_cands(ctx, r, a),
        _ => prot_cands(ctx, r, name),
    }
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
    let addrs = proto_addrs();
    match addrs {
        Some(_) => ctx.note("by the protocols' addresses in /proc/kallsyms".into()),
        None => ctx.note("by the pointee's name (/proc/kallsyms hides addresses)".into()),
    }
    let (fd, _) = net::tcp_connect(
        IpAddr::V4(net::random_v4()),
        net::v4(net::random_v4(), net::random_port()),
    )?;
    for r in ctx.collect("TCP connect", |r| mine(ctx, r, 0))? {
        x.add(F, cands(ctx, &r, addrs.map(|a| a.tcp), b"TCP\0"));
    }
    drop(fd);
    let a6 = ctx.pool.fresh()?;
    let dst6 = net::v6(ctx.pool.fresh()?, net::random_port());
    let (fd, _) = net::tcp_connect(IpAddr::V6(a6), dst6)?;
    // Without tcpv6_prot's address (IPv6 as a module) the IPv6 socket
    // adds nothing in the address mode.
    if addrs.is_none() || addrs.and_then(|a| a.tcpv6).is_some() {
        for r in ctx.collect("TCPv6 connect", |r| mine(ctx, r, 0))? {
            x.add(F, cands(ctx, &r, addrs.and_then(|a| a.tcpv6), b"TCPv"));
        }
    }
    drop(fd);
    let (fd, _) = net::udp_socket(IpAddr::V4(net::random_v4()), 0, false)?;
    net::send_to(&fd, net::v4(net::random_v4(), net::random_port()), 1)?;
    for r in ctx.collect("UDP send", |r| mine(ctx, r, 1))? {
        x.add(F, cands(ctx, &r, addrs.map(|a| a.udp), b"UDP\0"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_addresses_come_from_kallsyms_unless_hidden() {
        let text = "ffffffff9d4b1000 D udp_prot\nffffffff9d4b1808 D tcp_prot\n\
                    ffffffff9d4b2000 d tcp_prot_x\nffffffff9d4c0000 D tcpv6_prot\n";
        assert_eq!(
            parse_proto_addrs(text),
            Some(ProtoAddrs {
                tcp: 0xffff_ffff_9d4b_1808,
                tcpv6: Some(0xffff_ffff_9d4c_0000),
                udp: 0xffff_ffff_9d4b_1000,
            })
        );
        let module = "ffffffff9d4b1808 D tcp_prot\nffffffff9d4b1000 D udp_prot\n\
                      ffffffffc0a00000 d tcpv6_prot\t[ipv6]\n";
        assert_eq!(
            parse_proto_addrs(module).map(|a| a.tcpv6),
            Some(Some(0xffff_ffff_c0a0_0000))
        );
        let hidden = "0000000000000000 D udp_prot\n0000000000000000 D tcp_prot\n";
        assert_eq!(parse_proto_addrs(hidden), None);
        assert_eq!(parse_proto_addrs(""), None);
    }

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
