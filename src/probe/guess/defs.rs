//! The guesses, in dependency order, and how their results become
//! [`Offsets`].
//!
//! | guess              | probe (argument dumped)                     | trigger                                   | fields |
//! |--------------------|---------------------------------------------|-------------------------------------------|--------|
//! | `sock_common_base` | —                                           | —                                         | sock.__sk_common (first member: 0) |
//! | `sock_addresses`   | `tcp_connect` (first 512 bytes of sock)     | TCP connect v4 and v6, random addr/ports  | skc_family, skc_daddr, skc_rcv_saddr, skc_dport, skc_num, skc_v6_daddr, skc_v6_rcv_saddr |
//! | `sock_type`        | `tcp_connect`, `udp_sendmsg` (1 KiB of sock)| TCP connect, UDP and UDP-Lite sends       | sk_type, sk_protocol |
//! | `proto_name`       | `@tcp_prot`, `@udp_prot` memory             | TCP connect                               | proto.name |
//! | `sock_prot`        | `tcp_connect`, `udp_sendmsg`: name via each word | TCP v4/v6 connect, UDP send          | skc_prot |
//! | `socket`           | `inet_release` (socket), sk from connect/send | TCP connect + close, UDP send + close   | socket.sk, socket.type |
//! | `sk_buff`          | `ip_output`, `ip_local_deliver` (skb + each word's pointee) | UDP datagram of random length | len, data, head, network_header, transport_header |
//! | `cred`             | `commit_creds` (cred)                       | thread changes to random ids              | uid, gid, euid, egid |
//! | `msghdr`           | `udp_sendmsg`, `udpv6_sendmsg` (msghdr + pointees) | UDP sendto v4 and v6               | msg_name, msg_namelen, sin(6)_port, sin(6)_addr |
//!
//! No probe of the set hooks a system call, so no syscall argument
//! convention needs guessing.

use std::net::{IpAddr, SocketAddr};

use super::net::{self, IPPROTO_UDPLITE};
use super::search::{
    find_bytes, find_u16, find_u32, find_u64, find_u8, u16_at, u32_at, u64_at, Intersection,
    Offsets as Cands, Resolution,
};
use super::session::GuessProbe;
use super::{need, Ctx, GuessError, Known, Rec};
use crate::probe::btf::{Field, Offsets, Provenance};

/// Words of a memory dump per fetch argument (the kernel's largest array).
const DUMP_WORDS: u32 = 64;
/// Bytes per dumped word.
const WORD: u32 = 8;
/// Bytes covered by one `u64[DUMP_WORDS]` fetch argument.
const DUMP_BYTES: u32 = DUMP_WORDS * WORD;
/// Words of an `sk_buff` dumped (covers every field used on 5.x–7.x).
const SKB_WORDS: u32 = 32;
/// Bytes read behind each `sk_buff` word: IPv4 header + UDP header.
const SKB_POINTEE: u32 = 28;
/// Words of a `struct socket` dumped.
const SOCKET_WORDS: u32 = 16;
/// Words of a `msghdr` dumped.
const MSGHDR_WORDS: u32 = 8;
/// Bytes read behind each `msghdr` word (a `sockaddr_in6` is 28).
const MSGHDR_POINTEE: u32 = 32;
/// u32 words of a `cred` dumped.
const CRED_WORDS: u32 = 64;
/// Bytes of `struct proto` dumped (`name` lies within).
const PROTO_DUMP_BYTES: u32 = DUMP_BYTES + DUMP_BYTES / 2;
/// Size of `proto.name` (`char name[32]` on every kernel).
const PROTO_NAME_LEN: u32 = 32;
/// IPv4 header without options.
const IPV4_HEADER: u32 = 20;
/// UDP header.
const UDP_HEADER: u32 = 8;
/// Largest random UDP payload (well under the loopback MTU).
const MAX_PAYLOAD: usize = 1200;
/// Range of random user/group ids (never 0 nor -1).
const ID_MIN: u32 = 100_000;
/// Upper end of the random id range.
const ID_MAX: u32 = 2_000_000_000;
/// Smallest kernel address: the x86-64 upper half with 5-level paging
/// (0xff00…; 4-level kernels start higher, at 0xffff8…).
const KERNEL_ADDR_MIN: u64 = 0xff00_0000_0000_0000;
/// AF_INET.
const AF_INET: u16 = 2;
/// AF_INET6.
const AF_INET6: u16 = 10;
/// SOCK_STREAM.
const SOCK_STREAM: u16 = 1;
/// SOCK_DGRAM.
const SOCK_DGRAM: u16 = 2;
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
/// sizeof(struct sockaddr_in).
const SOCKADDR_IN_LEN: u32 = 16;
/// sizeof(struct sockaddr_in6).
const SOCKADDR_IN6_LEN: u32 = 28;
/// Bits per byte.
const BITS: u32 = 8;

/// Fields resolved by a guess.
pub(crate) type Resolved = Vec<(&'static str, Field)>;
/// Builds the probes of a guess from earlier results.
type ProbesFn = fn(&Known) -> Result<Vec<GuessProbe>, GuessError>;
/// Turns final candidates into fields.
type FinishFn = fn(&Intersection) -> Result<Resolved, GuessError>;

/// One guess.
pub(crate) struct Def {
    /// Name in reports.
    pub name: &'static str,
    /// Fields resolved, with their sizes in bytes.
    pub fields: &'static [(&'static str, u32)],
    /// Repetitions to run at least.
    pub min_reps: u32,
    /// The probes to install (None: nothing to trace).
    pub probes_fn: Option<ProbesFn>,
    /// One repetition: trigger, read, add candidates.
    pub rep: fn(&mut Ctx<'_, '_>, &mut Intersection) -> Result<(), GuessError>,
    /// Turns the final candidates into fields (None: one plain field per
    /// entry of `fields`).
    pub custom_finish: Option<FinishFn>,
}

impl Def {
    pub(crate) fn finish(
        &self,
        x: &Intersection,
        _known: &Known,
    ) -> Result<Vec<(&'static str, Field)>, GuessError> {
        if let Some(f) = self.custom_finish {
            return f(x);
        }
        self.fields
            .iter()
            .map(|&(name, size)| Ok((name, plain(unique(self.name, x, name)?, size))))
            .collect()
    }
}

fn plain(offset: u32, size: u32) -> Field {
    Field {
        offset,
        size,
        bits: None,
    }
}

fn unique(guess: &'static str, x: &Intersection, field: &'static str) -> Result<u32, GuessError> {
    match x.resolution(field) {
        Resolution::Unique(o) => Ok(o),
        Resolution::Ambiguous(candidates) => Err(GuessError::Ambiguous {
            guess,
            field,
            candidates,
            repetitions: 0,
        }),
        Resolution::None | Resolution::Unseen => Err(GuessError::NoCandidate {
            guess,
            field,
            repetitions: 0,
        }),
    }
}

fn no_rep(_: &mut Ctx<'_, '_>, _: &mut Intersection) -> Result<(), GuessError> {
    Ok(())
}

/// `name=+off(base):u64[words]`.
fn dump(name: &str, base: &str, off: u32, words: u32) -> String {
    format!("{name}={}:u64[{words}]", deref(off, base))
}

fn deref(off: u32, base: &str) -> String {
    format!("+{off}({base})")
}

/// Concatenation of the named dump fields of a record.
fn joined(ctx: &Ctx<'_, '_>, r: &Rec, names: &[&str]) -> Vec<u8> {
    names
        .iter()
        .flat_map(|n| ctx.field(r, n).to_vec())
        .collect()
}

fn mine(ctx: &Ctx<'_, '_>, r: &Rec, probe: usize) -> bool {
    r.probe == probe && r.pid == ctx.tid
}

fn v4_of(a: SocketAddr) -> [u8; 4] {
    match a.ip() {
        IpAddr::V4(v) => v.octets(),
        IpAddr::V6(v) => v.to_ipv4_mapped().map_or([0; 4], |m| m.octets()),
    }
}

fn v6_of(a: SocketAddr) -> [u8; 16] {
    match a.ip() {
        IpAddr::V6(v) => v.octets(),
        IpAddr::V4(v) => v.to_ipv6_mapped().octets(),
    }
}

fn be16(v: u16) -> [u8; 2] {
    v.to_be_bytes()
}

// --- sock.__sk_common --------------------------------------------------------

const SK_COMMON: &[(&str, u32)] = &[("sock.__sk_common", 0)];

fn sk_common_finish(_: &Intersection) -> Result<Vec<(&'static str, Field)>, GuessError> {
    // struct sock starts with struct sock_common on every kernel; its size
    // is not observable and is reported as 0.
    Ok(vec![("sock.__sk_common", plain(0, 0))])
}

// --- sock_common addresses, ports, family --------------------------------------

const SOCK_ADDR_FIELDS: &[(&str, u32)] = &[
    ("sock_common.skc_family", 2),
    ("sock_common.skc_daddr", 4),
    ("sock_common.skc_rcv_saddr", 4),
    ("sock_common.skc_dport", 2),
    ("sock_common.skc_num", 2),
    ("sock_common.skc_v6_daddr", 16),
    ("sock_common.skc_v6_rcv_saddr", 16),
];

fn sock_addr_probes(_: &Known) -> Result<Vec<GuessProbe>, GuessError> {
    Ok(vec![GuessProbe {
        name: "g_connect",
        functions: &["tcp_connect"],
        fetchargs: dump("a", "$arg1", 0, DUMP_WORDS),
    }])
}

fn sock_addr_rep(ctx: &mut Ctx<'_, '_>, x: &mut Intersection) -> Result<(), GuessError> {
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

// --- sock.sk_type, sock.sk_protocol ----------------------------------------------

const SOCK_TYPE_FIELDS: &[(&str, u32)] = &[("sock.sk_type", 2), ("sock.sk_protocol", 2)];
/// Internal: offsets where the protocol is a full u16 (next byte zero).
const PROTOCOL_WIDE: &str = "sock.sk_protocol(u16)";

fn sock_dump_args() -> String {
    format!(
        "{} {}",
        dump("a", "$arg1", 0, DUMP_WORDS),
        dump("b", "$arg1", DUMP_BYTES, DUMP_WORDS)
    )
}

fn sock_type_probes(_: &Known) -> Result<Vec<GuessProbe>, GuessError> {
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

fn sock_type_rep(ctx: &mut Ctx<'_, '_>, x: &mut Intersection) -> Result<(), GuessError> {
    let num = need(ctx.known, ctx.guess, "sock_common.skc_num")?.offset as usize;
    let at_port =
        |ctx: &Ctx<'_, '_>, r: &Rec, port: u16| u16_at(ctx.field(r, "a"), num) == Some(port);
    let mut observe = |ctx: &Ctx<'_, '_>, r: &Rec, ty: u16, proto: u8| {
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
            let bound = |ctx: &Ctx<'_, '_>, r: &Rec| {
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

fn sock_type_finish(x: &Intersection) -> Result<Vec<(&'static str, Field)>, GuessError> {
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

// --- proto.name ---------------------------------------------------------------------

const PROTO_NAME_FIELDS: &[(&str, u32)] = &[("proto.name", PROTO_NAME_LEN)];

fn proto_name_probes(_: &Known) -> Result<Vec<GuessProbe>, GuessError> {
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

fn proto_name_rep(ctx: &mut Ctx<'_, '_>, x: &mut Intersection) -> Result<(), GuessError> {
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

// --- sock_common.skc_prot ------------------------------------------------------------

const SOCK_PROT_FIELDS: &[(&str, u32)] = &[("sock_common.skc_prot", 8)];

fn prot_args(name_off: u32) -> String {
    (0..DUMP_WORDS)
        .map(|i| format!("p{i}=+{name_off}({}):u32", deref(i * WORD, "$arg1")))
        .collect::<Vec<_>>()
        .join(" ")
}

fn sock_prot_probes(known: &Known) -> Result<Vec<GuessProbe>, GuessError> {
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

fn prot_cands(ctx: &Ctx<'_, '_>, r: &Rec, want: &[u8; 4]) -> Cands {
    let v = u32::from_le_bytes(*want);
    (0..DUMP_WORDS)
        .filter(|i| u32_at(ctx.field(r, &format!("p{i}")), 0) == Some(v))
        .map(|i| i * WORD)
        .collect()
}

fn sock_prot_rep(ctx: &mut Ctx<'_, '_>, x: &mut Intersection) -> Result<(), GuessError> {
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

// --- struct socket ------------------------------------------------------------------

const SOCKET_FIELDS: &[(&str, u32)] = &[("socket.sk", 8), ("socket.type", 2)];

fn socket_probes(_: &Known) -> Result<Vec<GuessProbe>, GuessError> {
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

fn sk_of(ctx: &Ctx<'_, '_>, recs: &[Rec]) -> Option<u64> {
    recs.iter().find_map(|r| u64_at(ctx.field(r, "sk"), 0))
}

fn socket_rep(ctx: &mut Ctx<'_, '_>, x: &mut Intersection) -> Result<(), GuessError> {
    let (fd, _) = net::tcp_connect(
        IpAddr::V4(net::random_v4()),
        net::v4(net::random_v4(), net::random_port()),
    )?;
    let sk = sk_of(ctx, &ctx.collect("TCP connect", |r| mine(ctx, r, 0))?).unwrap_or(0);
    drop(fd);
    let has_sk = |ctx: &Ctx<'_, '_>, r: &Rec, sk: u64| {
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

// --- sk_buff ------------------------------------------------------------------------

const SKB_FIELDS: &[(&str, u32)] = &[
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

fn skb_probes(_: &Known) -> Result<Vec<GuessProbe>, GuessError> {
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
fn header_words(ctx: &Ctx<'_, '_>, r: &Rec, hdr: &[(usize, &[u8])]) -> Vec<u32> {
    (0..SKB_WORDS)
        .filter(|i| {
            let d = ctx.field(r, &format!("d{i}"));
            hdr.iter()
                .all(|(at, want)| d.get(*at..*at + want.len()) == Some(*want))
        })
        .collect()
}

fn skb_rep(ctx: &mut Ctx<'_, '_>, x: &mut Intersection) -> Result<(), GuessError> {
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

// --- cred ---------------------------------------------------------------------------

const CRED_FIELDS: &[(&str, u32)] = &[
    ("cred.uid", 4),
    ("cred.gid", 4),
    ("cred.euid", 4),
    ("cred.egid", 4),
];

fn cred_probes(_: &Known) -> Result<Vec<GuessProbe>, GuessError> {
    Ok(vec![GuessProbe {
        name: "g_creds",
        functions: &["commit_creds"],
        fetchargs: format!("c=+0($arg1):u32[{CRED_WORDS}]"),
    }])
}

/// `n` distinct random ids.
fn random_ids<const N: usize>() -> [u32; N] {
    let mut out = [0u32; N];
    let mut i = 0;
    while i < N {
        let v = fastrand::u32(ID_MIN..=ID_MAX);
        if !out[..i].contains(&v) {
            out[i] = v;
            i += 1;
        }
    }
    out
}

fn cred_rep(ctx: &mut Ctx<'_, '_>, x: &mut Intersection) -> Result<(), GuessError> {
    let [rg, eg, sg, fsg, ru, eu, su] = random_ids::<7>();
    let ids = crate::sys::trigger::ThreadIds {
        gid: [rg, eg, sg, fsg],
        uid: [ru, eu, su, su],
    };
    // Credentials are per thread in the kernel: a short-lived thread takes
    // the ids and exits; the rest of the process keeps its own.
    let tid = std::thread::spawn(move || {
        let tid = crate::sys::current_tid();
        crate::sys::trigger::set_thread_ids(ids).map(|()| tid)
    })
    .join()
    .map_err(|_| GuessError::NoRecord {
        guess: "cred",
        what: "credential thread (panicked)",
        waited: std::time::Duration::ZERO,
    })??;
    let complete = |ctx: &Ctx<'_, '_>, r: &Rec| {
        let c = ctx.field(r, "c");
        r.pid == tid && [ru, eu, rg, eg].iter().all(|v| !find_u32(c, *v).is_empty())
    };
    for r in ctx.collect("credential change", |r| complete(ctx, r))? {
        let c = ctx.field(&r, "c");
        x.add("cred.uid", find_u32(c, ru));
        x.add("cred.gid", find_u32(c, rg));
        x.add("cred.euid", find_u32(c, eu));
        x.add("cred.egid", find_u32(c, eg));
    }
    Ok(())
}

// --- msghdr and sockaddr ------------------------------------------------------------

const MSGHDR_FIELDS: &[(&str, u32)] = &[
    ("msghdr.msg_name", 8),
    ("msghdr.msg_namelen", 4),
    ("sockaddr_in.sin_port", 2),
    ("sockaddr_in.sin_addr", 4),
    ("sockaddr_in6.sin6_port", 2),
    ("sockaddr_in6.sin6_addr", 16),
];

fn msghdr_args() -> String {
    let mut v = vec![dump("m", "$arg2", 0, MSGHDR_WORDS)];
    v.extend(
        (0..MSGHDR_WORDS)
            .map(|i| format!("n{i}=+0({}):u8[{MSGHDR_POINTEE}]", deref(i * WORD, "$arg2"))),
    );
    v.join(" ")
}

fn msghdr_probes(_: &Known) -> Result<Vec<GuessProbe>, GuessError> {
    Ok(vec![
        GuessProbe {
            name: "g_udp_send",
            functions: &["udp_sendmsg"],
            fetchargs: msghdr_args(),
        },
        GuessProbe {
            name: "g_udp6_send",
            functions: &["udpv6_sendmsg"],
            fetchargs: msghdr_args(),
        },
    ])
}

/// (word index, port offsets, address offsets) of pointees holding the
/// destination we sent to.
fn name_words(
    ctx: &Ctx<'_, '_>,
    r: &Rec,
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

fn msghdr_rep(ctx: &mut Ctx<'_, '_>, x: &mut Intersection) -> Result<(), GuessError> {
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

/// Every guess, in dependency order.
pub(crate) const DEFS: &[Def] = &[
    Def {
        name: "sock_common_base",
        fields: SK_COMMON,
        min_reps: 0,
        probes_fn: None,
        rep: no_rep,
        custom_finish: Some(sk_common_finish),
    },
    Def {
        name: "sock_addresses",
        fields: SOCK_ADDR_FIELDS,
        min_reps: super::MIN_REPETITIONS,
        probes_fn: Some(sock_addr_probes),
        rep: sock_addr_rep,
        custom_finish: None,
    },
    Def {
        name: "sock_type",
        fields: SOCK_TYPE_FIELDS,
        min_reps: super::MIN_REPETITIONS,
        probes_fn: Some(sock_type_probes),
        rep: sock_type_rep,
        custom_finish: Some(sock_type_finish),
    },
    Def {
        name: "proto_name",
        fields: PROTO_NAME_FIELDS,
        min_reps: 1,
        probes_fn: Some(proto_name_probes),
        rep: proto_name_rep,
        custom_finish: None,
    },
    Def {
        name: "sock_prot",
        fields: SOCK_PROT_FIELDS,
        min_reps: super::MIN_REPETITIONS,
        probes_fn: Some(sock_prot_probes),
        rep: sock_prot_rep,
        custom_finish: None,
    },
    Def {
        name: "socket",
        fields: SOCKET_FIELDS,
        min_reps: super::MIN_REPETITIONS,
        probes_fn: Some(socket_probes),
        rep: socket_rep,
        custom_finish: None,
    },
    Def {
        name: "sk_buff",
        fields: SKB_FIELDS,
        min_reps: super::MIN_REPETITIONS + 1,
        probes_fn: Some(skb_probes),
        rep: skb_rep,
        custom_finish: None,
    },
    Def {
        name: "cred",
        fields: CRED_FIELDS,
        min_reps: super::MIN_REPETITIONS,
        probes_fn: Some(cred_probes),
        rep: cred_rep,
        custom_finish: None,
    },
    Def {
        name: "msghdr",
        fields: MSGHDR_FIELDS,
        min_reps: super::MIN_REPETITIONS,
        probes_fn: Some(msghdr_probes),
        rep: msghdr_rep,
        custom_finish: None,
    },
];

/// Builds [`Offsets`] from the guessed fields.
pub(crate) fn offsets_from(k: &Known, provenance: Provenance) -> Result<Offsets, GuessError> {
    let g = |f: &'static str| need(k, "offsets", f);
    Ok(Offsets {
        provenance,
        skc_family: g("sock_common.skc_family")?,
        skc_daddr: g("sock_common.skc_daddr")?,
        skc_rcv_saddr: g("sock_common.skc_rcv_saddr")?,
        skc_dport: g("sock_common.skc_dport")?,
        skc_num: g("sock_common.skc_num")?,
        skc_v6_daddr: g("sock_common.skc_v6_daddr")?,
        skc_v6_rcv_saddr: g("sock_common.skc_v6_rcv_saddr")?,
        skc_prot: g("sock_common.skc_prot")?,
        sk_protocol: g("sock.sk_protocol")?,
        sk_type: g("sock.sk_type")?,
        sk_common: g("sock.__sk_common")?,
        socket_sk: g("socket.sk")?,
        socket_type: g("socket.type")?,
        proto_name: g("proto.name")?,
        skb_len: g("sk_buff.len")?,
        skb_data: g("sk_buff.data")?,
        skb_head: g("sk_buff.head")?,
        skb_network_header: g("sk_buff.network_header")?,
        skb_transport_header: g("sk_buff.transport_header")?,
        cred_uid: g("cred.uid")?,
        cred_gid: g("cred.gid")?,
        cred_euid: g("cred.euid")?,
        cred_egid: g("cred.egid")?,
        msg_name: g("msghdr.msg_name")?,
        msg_namelen: g("msghdr.msg_namelen")?,
        sin_port: g("sockaddr_in.sin_port")?,
        sin_addr: g("sockaddr_in.sin_addr")?,
        sin6_port: g("sockaddr_in6.sin6_port")?,
        sin6_addr: g("sockaddr_in6.sin6_addr")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::spec::MAX_FETCHARGS;

    #[test]
    fn every_guess_probe_fits_the_fetcharg_limit() {
        let mut known = Known::new();
        known.insert("proto.name", plain(408, PROTO_NAME_LEN));
        let mut probes = 0;
        for d in DEFS {
            let Some(f) = d.probes_fn else { continue };
            for p in f(&known).expect(d.name) {
                let args: Vec<&str> = p.fetchargs.split_whitespace().collect();
                assert!(
                    args.len() <= MAX_FETCHARGS,
                    "{} {}: {}",
                    d.name,
                    p.name,
                    args.len()
                );
                let mut names: Vec<&str> =
                    args.iter().filter_map(|a| a.split('=').next()).collect();
                names.sort_unstable();
                names.dedup();
                assert_eq!(
                    names.len(),
                    args.len(),
                    "{} {}: duplicate names",
                    d.name,
                    p.name
                );
                probes += 1;
            }
        }
        assert!(probes >= 10, "{probes}");
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

    #[test]
    fn random_ids_are_distinct_and_in_range() {
        for _ in 0..100 {
            let ids = random_ids::<7>();
            for (i, v) in ids.iter().enumerate() {
                assert!((ID_MIN..=ID_MAX).contains(v));
                assert!(!ids[..i].contains(v));
            }
        }
    }

    #[test]
    fn offsets_need_every_field() {
        let mut k = Known::new();
        for d in DEFS {
            for &(name, size) in d.fields {
                k.insert(name, plain(1, size));
            }
        }
        let why = Provenance::Guess { why: "test".into() };
        let o = offsets_from(&k, why.clone()).unwrap();
        assert_eq!(o.sin6_addr.size, 16);
        assert!(o.to_string().contains("guessed at run time (test)"));
        k.remove("cred.egid");
        let e = offsets_from(&k, why).unwrap_err();
        assert!(matches!(
            e,
            GuessError::Dependency {
                field: "cred.egid",
                ..
            }
        ));
    }
}
