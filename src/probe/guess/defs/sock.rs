//! `struct sock` and the `sock_common` at its start: the base of
//! `__sk_common`, the addresses, ports and family of a connection, and
//! the socket type and protocol (two `u16`, or bitfields before 5.6).

use std::net::IpAddr;

use crate::probe::btf::Field;
use crate::probe::guess::net::{self, IPPROTO_UDPLITE};
use crate::probe::guess::search::{
    find_bytes, find_u16, find_u8, u16_at, Intersection, Resolution,
};
use crate::probe::guess::session::GuessProbe;
use crate::probe::guess::{need, Ctx, GuessError, GuessRecord, Known};

use super::{be16, dump, joined, plain, unique, v4_of, v6_of};
use super::{AF_INET, AF_INET6, DUMP_BYTES, DUMP_WORDS, MAX_PAYLOAD, SOCK_DGRAM, SOCK_STREAM};

/// SOCK_RAW.
const SOCK_RAW: u16 = 3;
/// Range of random protocol numbers for the raw socket (unassigned and
/// experimental numbers, never TCP/UDP).
const RAW_PROTO_MIN: u8 = 143;
/// Upper end of the raw protocol range.
const RAW_PROTO_MAX: u8 = 254;
/// IPPROTO_TCP.
const IPPROTO_TCP: u8 = 6;
/// IPPROTO_UDP.
const IPPROTO_UDP: u8 = 17;
/// Bits per byte.
const BITS: u32 = 8;

/// Fields of the `sock_common_base` guess, with their sizes in bytes.
pub(super) const SK_COMMON: &[(&str, u32)] = &[("sock.__sk_common", 0)];

/// Fields of the `sock_common_base` guess from its final candidates.
pub(super) fn sk_common_finish(_: &Intersection) -> Result<Vec<(&'static str, Field)>, GuessError> {
    // struct sock starts with struct sock_common on every kernel; its size
    // is not observable and is reported as 0.
    Ok(vec![("sock.__sk_common", plain(0, 0))])
}

/// Fields of the `sock_addresses` guess, with their sizes in bytes.
pub(super) const SOCK_ADDR_FIELDS: &[(&str, u32)] = &[
    ("sock_common.skc_family", 2),
    ("sock_common.skc_daddr", 4),
    ("sock_common.skc_rcv_saddr", 4),
    ("sock_common.skc_dport", 2),
    ("sock_common.skc_num", 2),
    ("sock_common.skc_v6_daddr", 16),
    ("sock_common.skc_v6_rcv_saddr", 16),
];

/// Probes of the `sock_addresses` guess.
pub(super) fn sock_addr_probes(_: &Known) -> Result<Vec<GuessProbe>, GuessError> {
    Ok(vec![GuessProbe {
        name: "g_connect",
        functions: &["tcp_connect"],
        fetchargs: dump("a", "$arg1", 0, DUMP_WORDS),
    }])
}

/// One repetition of the `sock_addresses` guess: trigger, read, add candidates.
pub(super) fn sock_addr_rep(ctx: &mut Ctx<'_, '_>, x: &mut Intersection) -> Result<(), GuessError> {
    let dst4 = net::v4(net::random_v4(), net::random_port());
    let (fd4, src4) = net::tcp_connect(IpAddr::V4(net::random_v4()), dst4)?;
    let daddr = v4_of(dst4);
    let r4 = ctx.collect("IPv4 connect", |r| {
        r.probe == 0 && !find_bytes(ctx.field(r, "a"), &daddr, 4).is_empty()
    })?;
    drop(fd4);
    let a6 = ctx.pool.fresh()?;
    let dst6 = net::v6(ctx.pool.fresh()?, net::random_port());
    let (fd6, src6) = net::tcp_connect(IpAddr::V6(a6), dst6)?;
    let daddr6 = v6_of(dst6);
    let r6 = ctx.collect("IPv6 connect", |r| {
        r.probe == 0 && !find_bytes(ctx.field(r, "a"), &daddr6, 4).is_empty()
    })?;
    drop(fd6);
    for r in &r4 {
        let d = ctx.field(r, "a");
        x.add("sock_common.skc_daddr", find_bytes(d, &daddr, 4));
        x.add("sock_common.skc_rcv_saddr", find_bytes(d, &v4_of(src4), 4));
        x.add(
            "sock_common.skc_dport",
            find_bytes(d, &be16(dst4.port()), 2),
        );
        x.add("sock_common.skc_num", find_u16(d, src4.port()));
        x.add("sock_common.skc_family", find_u16(d, AF_INET));
    }
    for r in &r6 {
        let d = ctx.field(r, "a");
        x.add("sock_common.skc_v6_daddr", find_bytes(d, &daddr6, 4));
        x.add(
            "sock_common.skc_v6_rcv_saddr",
            find_bytes(d, &v6_of(src6), 4),
        );
        x.add(
            "sock_common.skc_dport",
            find_bytes(d, &be16(dst6.port()), 2),
        );
        x.add("sock_common.skc_num", find_u16(d, src6.port()));
        x.add("sock_common.skc_family", find_u16(d, AF_INET6));
    }
    // The kernel mirrors IPv4 addresses into the IPv6 fields as v4-mapped
    // addresses (sk_daddr_set, sk_rcv_saddr_set): not the IPv4 fields.
    for (v4f, v6f) in [
        ("sock_common.skc_daddr", "sock_common.skc_v6_daddr"),
        ("sock_common.skc_rcv_saddr", "sock_common.skc_v6_rcv_saddr"),
    ] {
        if let Resolution::Unique(o) = x.resolution(v6f) {
            x.remove_within(v4f, o, 16);
        }
    }
    Ok(())
}

/// Fields of the `sock_type` guess, with their sizes in bytes.
pub(super) const SOCK_TYPE_FIELDS: &[(&str, u32)] = &[("sock.sk_type", 2), ("sock.sk_protocol", 2)];
/// Internal: offsets where the protocol is a full u16 (next byte zero).
const PROTOCOL_WIDE: &str = "sock.sk_protocol(u16)";

fn sock_dump_args() -> String {
    format!(
        "{} {}",
        dump("a", "$arg1", 0, DUMP_WORDS),
        dump("b", "$arg1", DUMP_BYTES, DUMP_WORDS)
    )
}

/// Probes of the `sock_type` guess.
pub(super) fn sock_type_probes(_: &Known) -> Result<Vec<GuessProbe>, GuessError> {
    Ok(vec![
        GuessProbe {
            name: "g_connect",
            functions: &["tcp_connect"],
            fetchargs: sock_dump_args(),
        },
        GuessProbe {
            name: "g_udp_send",
            functions: &["udp_sendmsg"],
            fetchargs: sock_dump_args(),
        },
        GuessProbe {
            name: "g_raw_send",
            functions: &["raw_sendmsg"],
            fetchargs: sock_dump_args(),
        },
    ])
}

/// One repetition of the `sock_type` guess: trigger, read, add candidates.
pub(super) fn sock_type_rep(ctx: &mut Ctx<'_, '_>, x: &mut Intersection) -> Result<(), GuessError> {
    let num = need(ctx.known, ctx.guess, "sock_common.skc_num")?.offset as usize;
    let at_port = |ctx: &Ctx<'_, '_>, r: &GuessRecord, port: u16| {
        u16_at(ctx.field(r, "a"), num) == Some(port)
    };
    let mut observe = |ctx: &Ctx<'_, '_>, r: &GuessRecord, ty: u16, proto: u8| {
        let d = joined(ctx, r, &["a", "b"]);
        x.add("sock.sk_type", find_u16(&d, ty));
        x.add("sock.sk_protocol", find_u8(&d, proto));
        x.add(PROTOCOL_WIDE, find_u16(&d, u16::from(proto)));
    };
    let (fd, src) = net::tcp_connect(
        IpAddr::V4(net::random_v4()),
        net::v4(net::random_v4(), net::random_port()),
    )?;
    for r in ctx.collect("TCP connect", |r| {
        r.probe == 0 && at_port(ctx, r, src.port())
    })? {
        observe(ctx, &r, SOCK_STREAM, IPPROTO_TCP);
    }
    drop(fd);
    for (proto, proto_num) in [(0, IPPROTO_UDP), (IPPROTO_UDPLITE, IPPROTO_UDPLITE as u8)] {
        let (fd, src) = match net::udp_socket(IpAddr::V4(net::random_v4()), proto, false) {
            Ok(v) => v,
            // UDP-Lite may be compiled out; plain UDP must work.
            Err(e) if proto == IPPROTO_UDPLITE => {
                tracing::debug!(error = %e, "no UDP-Lite socket for the sk_type guess");
                ctx.note("UDP-Lite unavailable".into());
                continue;
            }
            Err(e) => return Err(e),
        };
        net::send_to(
            &fd,
            net::v4(net::random_v4(), net::random_port()),
            fastrand::usize(1..=MAX_PAYLOAD),
        )?;
        for r in ctx.collect("UDP send", |r| r.probe == 1 && at_port(ctx, r, src.port()))? {
            observe(ctx, &r, SOCK_DGRAM, proto_num);
        }
    }
    // A raw socket adds a third type and a random protocol; it needs
    // CAP_NET_RAW and is skipped without it.
    let saddr = need(ctx.known, ctx.guess, "sock_common.skc_rcv_saddr")?.offset as usize;
    let ip = net::random_v4();
    let proto = fastrand::u8(RAW_PROTO_MIN..=RAW_PROTO_MAX);
    match net::raw_socket(ip, i32::from(proto)) {
        Err(e) => {
            tracing::debug!(error = %e, "no raw socket for the sk_type guess");
            ctx.note("raw socket unavailable (CAP_NET_RAW?): sk_type from TCP/UDP only".into());
        }
        Ok(fd) => {
            net::send_to(
                &fd,
                net::v4(net::random_v4(), 0),
                fastrand::usize(1..=MAX_PAYLOAD),
            )?;
            let bound = |ctx: &Ctx<'_, '_>, r: &GuessRecord| {
                r.probe == 2 && ctx.field(r, "a").get(saddr..saddr + 4) == Some(&ip.octets()[..])
            };
            for r in ctx.collect("raw send", |r| bound(ctx, r))? {
                observe(ctx, &r, SOCK_RAW, proto);
            }
        }
    }
    // sk_type and sk_protocol are neighbours in every known layout (type
    // before protocol on 5.6-6.x, after it on 7.x, and the byte after an
    // 8-bit protocol before 5.6): without the raw socket's third sample,
    // a tie is broken only when exactly one candidate is a neighbour.
    if let (Resolution::Unique(p), Resolution::Ambiguous(c)) = (
        x.resolution("sock.sk_protocol"),
        x.resolution("sock.sk_type"),
    ) {
        let wide = x.get(PROTOCOL_WIDE).is_some_and(|s| s.contains(&p));
        let near: Vec<u32> = if wide {
            [p.checked_sub(2), p.checked_add(2)]
                .into_iter()
                .flatten()
                .collect()
        } else {
            vec![p + 1]
        };
        let hits: Vec<u32> = c.iter().copied().filter(|o| near.contains(o)).collect();
        if let [a] = hits[..] {
            x.add("sock.sk_type", [a].into());
            ctx.note(format!(
                "sk_type candidates {c:?}: took {a}, next to sk_protocol"
            ));
        }
    }
    Ok(())
}

/// Fields of the `sock_type` guess from its final candidates.
pub(super) fn sock_type_finish(x: &Intersection) -> Result<Vec<(&'static str, Field)>, GuessError> {
    const G: &str = "sock_type";
    let proto = unique(G, x, "sock.sk_protocol")?;
    let ty = unique(G, x, "sock.sk_type")?;
    let wide = x.get(PROTOCOL_WIDE).is_some_and(|s| s.contains(&proto));
    if wide {
        return Ok(vec![
            ("sock.sk_type", plain(ty, 2)),
            ("sock.sk_protocol", plain(proto, 2)),
        ]);
    }
    // Before 5.6 both are bitfields of one 32-bit unit (protocol 8 bits,
    // type 16 bits).
    let unit = |o: u32| Field {
        offset: o / 4 * 4,
        size: 4,
        bits: Some(((o % 4) * BITS, 0)),
    };
    let mut p = unit(proto);
    p.bits = p.bits.map(|(b, _)| (b, BITS));
    let mut t = unit(ty);
    t.bits = t.bits.map(|(b, _)| (b, 2 * BITS));
    Ok(vec![("sock.sk_type", t), ("sock.sk_protocol", p)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::guess::search::Offsets as Cands;

    #[test]
    fn modern_sock_type_is_two_plain_u16() {
        let mut x = Intersection::default();
        x.add("sock.sk_protocol", [574].into());
        x.add(PROTOCOL_WIDE, [574, 600].into());
        x.add("sock.sk_type", [572].into());
        let f = sock_type_finish(&x).unwrap();
        assert_eq!(f[0], ("sock.sk_type", plain(572, 2)));
        assert_eq!(f[1], ("sock.sk_protocol", plain(574, 2)));
    }

    #[test]
    fn old_sock_type_becomes_bitfields_of_one_unit() {
        // Before 5.6: sk_protocol bits 8..16 and sk_type bits 16..32 of the
        // 32-bit unit at 0x1f8 (protocol byte at 0x1f9, type at 0x1fa).
        let mut x = Intersection::default();
        x.add("sock.sk_protocol", [0x1f9].into());
        x.add(PROTOCOL_WIDE, Cands::new());
        x.add("sock.sk_type", [0x1fa].into());
        let f = sock_type_finish(&x).unwrap();
        let t = Field {
            offset: 0x1f8,
            size: 4,
            bits: Some((16, 16)),
        };
        let p = Field {
            offset: 0x1f8,
            size: 4,
            bits: Some((8, 8)),
        };
        assert_eq!(f, vec![("sock.sk_type", t), ("sock.sk_protocol", p)]);
        assert_eq!(p.fetch_type(), "b8@8/32");
    }
}
