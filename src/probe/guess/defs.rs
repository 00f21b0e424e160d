//! The guesses, in dependency order, and how their results become
//! [`Offsets`].
//!
//! | guess              | probe (argument dumped)                     | trigger                                   | fields |
//! |--------------------|---------------------------------------------|-------------------------------------------|--------|
//! | `sock_common_base` | —                                           | —                                         | sock.__sk_common (first member: 0) |
//! | `sock_addresses`   | `tcp_connect` (first 512 bytes of sock)     | TCP connect v4 and v6, random addr/ports  | skc_family, skc_daddr, skc_rcv_saddr, skc_dport, skc_num, skc_v6_daddr, skc_v6_rcv_saddr |
//! | `sock_type`        | `tcp_connect`, `udp_sendmsg` (1 KiB of sock)| TCP connect, UDP and UDP-Lite sends       | sk_type, sk_protocol |
//! | `proto_name`       | `@tcp_prot`, `@udp_prot` memory             | TCP connect                               | proto.name |
//! | `sock_prot`        | `tcp_connect`, `udp_sendmsg`: the word equal to `tcp_prot`/`tcpv6_prot`/`udp_prot` (`/proc/kallsyms`); name via each word when addresses are hidden | TCP v4/v6 connect, UDP send | skc_prot |
//! | `socket`           | `inet_release` (socket), sk from connect/send | TCP connect + close, UDP send + close   | socket.sk, socket.type |
//! | `sk_buff_pointers` | `ip_output`, `ip_local_deliver` (skb words) | UDP datagram                              | the words holding kernel addresses in every sample |
//! | `sk_buff`          | `ip_output`, `ip_local_deliver` (skb + the pointee of each of those words) | UDP datagram of random length | len, data, head, network_header, transport_header |
//! | `cred`             | `commit_creds` (cred)                       | thread changes to random ids              | uid, gid, euid, egid |
//! | `msghdr_pointers`  | `udp_sendmsg`, `udpv6_sendmsg` (msghdr words) | UDP sendto v4 and v6                    | the words holding kernel addresses in every sample |
//! | `msghdr`           | `udp_sendmsg`, `udpv6_sendmsg` (msghdr + the pointee of each of those words) | UDP sendto v4 and v6 | msg_name, msg_namelen, sin(6)_port, sin(6)_addr |
//!
//! A guess reads a pointee only where its pre-pass (`*_pointers`) saw a
//! kernel address in that word of every sample ([`kernel_words`]).
//!
//! No probe of the set hooks a system call, so no syscall argument
//! convention needs guessing.
//!
//! Each guess's probes, trigger and candidate search live in a child
//! module per kernel struct (`sock`, `proto`, `socket`, `skb`, `cred`,
//! `msghdr`); this module holds the dump helpers they share, the list of
//! guesses and the assembly of [`Offsets`].

mod cred;
mod msghdr;
mod proto;
mod skb;
mod sock;
mod socket;

use std::net::{IpAddr, SocketAddr};

use super::search::{self, Intersection, Resolution};
use super::session::GuessProbe;
use super::{need, Ctx, GuessError, GuessRecord, Known};
use crate::probe::btf::{Field, Offsets, Provenance};

use cred::{cred_probes, cred_rep, CRED_FIELDS};
use msghdr::{
    msghdr_pointer_probes, msghdr_pointer_rep, msghdr_pointers, msghdr_probes, msghdr_rep,
    MSGHDR_FIELDS,
};
use proto::{
    proto_name_probes, proto_name_rep, sock_prot_probes, sock_prot_rep, PROTO_NAME_FIELDS,
    SOCK_PROT_FIELDS,
};
use skb::{skb_pointer_probes, skb_pointer_rep, skb_pointers, skb_probes, skb_rep, SKB_FIELDS};
use sock::{
    sk_common_finish, sock_addr_probes, sock_addr_rep, sock_type_finish, sock_type_probes,
    sock_type_rep, SK_COMMON, SOCK_ADDR_FIELDS, SOCK_TYPE_FIELDS,
};
use socket::{socket_probes, socket_rep, SOCKET_FIELDS};

/// Words of a memory dump per fetch argument (the kernel's largest array).
const DUMP_WORDS: u32 = 64;
/// Bytes per dumped word.
const WORD: u32 = 8;
/// Bytes covered by one `u64[DUMP_WORDS]` fetch argument.
const DUMP_BYTES: u32 = DUMP_WORDS * WORD;
/// Largest random UDP payload (well under the loopback MTU).
const MAX_PAYLOAD: usize = 1200;
/// AF_INET.
const AF_INET: u16 = 2;
/// AF_INET6.
const AF_INET6: u16 = 10;
/// SOCK_STREAM.
const SOCK_STREAM: u16 = 1;
/// SOCK_DGRAM.
const SOCK_DGRAM: u16 = 2;

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
fn joined(ctx: &Ctx<'_, '_>, r: &GuessRecord, names: &[&str]) -> Vec<u8> {
    names
        .iter()
        .flat_map(|n| ctx.field(r, n).to_vec())
        .collect()
}

fn mine(ctx: &Ctx<'_, '_>, r: &GuessRecord, probe: usize) -> bool {
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

/// Lowest address of the kernel half with 4-level paging (48-bit
/// canonical).
const KERNEL_HALF_4LEVEL: u64 = 0xffff_8000_0000_0000;
/// Lowest address of the kernel half with 5-level paging (57-bit
/// canonical); 4-level kernels start higher, at [`KERNEL_HALF_4LEVEL`].
const KERNEL_HALF_5LEVEL: u64 = 0xff00_0000_0000_0000;

/// Names of the dumped words found to hold kernel addresses, `<struct>.word<N>`.
macro_rules! word_names {
    ($prefix:literal: $($i:literal)*) => {
        [$(concat!($prefix, ".word", $i)),*]
    };
}
use word_names;

/// Offsets of the words of `dump` that are addresses in the kernel half of
/// this kernel's address space, told by `own`, an address the kernel is
/// known to use (the dumped struct's own): 4-level paging puts every
/// kernel object at or above [`KERNEL_HALF_4LEVEL`], 5-level puts the
/// direct map below it. Only such words are dereferenced by a guess: a
/// word outside the kernel half is no kernel pointer, and a non-canonical
/// one can pass the kernel's own address check on a CPU whose virtual
/// address width exceeds the paging mode's, so that the read faults with a
/// general protection fault the kernel logs as a warning.
fn kernel_words(dump: &[u8], own: u64) -> search::Offsets {
    let half = if own >= KERNEL_HALF_4LEVEL {
        KERNEL_HALF_4LEVEL
    } else {
        KERNEL_HALF_5LEVEL
    };
    (0..dump.len() / WORD as usize)
        .filter_map(|i| {
            let at = i * WORD as usize;
            let v = search::u64_at(dump, at)?;
            (v >= half).then(|| u32::try_from(at).ok()).flatten()
        })
        .collect()
}

/// The fields a pointer pre-pass resolved: one per word of `field`'s
/// surviving candidates, named from `names` (by word index).
fn pointer_words(
    guess: &'static str,
    field: &'static str,
    names: &[&'static str],
    x: &Intersection,
) -> Result<Resolved, GuessError> {
    let words: Resolved = x
        .get(field)
        .into_iter()
        .flatten()
        .filter_map(|&off| Some((*names.get((off / WORD) as usize)?, plain(off, WORD))))
        .collect();
    if words.is_empty() {
        return Err(GuessError::NoCandidate {
            guess,
            field,
            repetitions: 0,
        });
    }
    Ok(words)
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
        name: "sk_buff_pointers",
        fields: &[],
        min_reps: super::MIN_REPETITIONS,
        probes_fn: Some(skb_pointer_probes),
        rep: skb_pointer_rep,
        custom_finish: Some(skb_pointers),
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
        name: "msghdr_pointers",
        fields: &[],
        min_reps: super::MIN_REPETITIONS,
        probes_fn: Some(msghdr_pointer_probes),
        rep: msghdr_pointer_rep,
        custom_finish: Some(msghdr_pointers),
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
        tcp: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::guess::search::Offsets;
    use crate::probe::spec::MAX_FETCHARGS;
    use proto::PROTO_NAME_LEN;

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
    fn only_words_in_this_kernels_half_are_dereferenced() {
        let words: [u64; 6] = [
            0xffff_8880_0123_4500, // 4-level direct map
            0xff11_0000_0123_4500, // 5-level direct map
            0x8000_0000_0000_0001, // non-canonical either way
            0x0000_7fff_1234_5678, // user space
            0xffff_ffff_8100_0000, // kernel text
            0x0000_0000_0000_05dc, // a length
        ];
        let dump: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let four = kernel_words(&dump, 0xffff_8881_0000_0000);
        assert_eq!(four.into_iter().collect::<Vec<_>>(), [0, 32]);
        let five = kernel_words(&dump, 0xff11_0001_0000_0000);
        assert_eq!(five.into_iter().collect::<Vec<_>>(), [0, 8, 32]);
        // A torn dump: the partial word is not read.
        assert_eq!(kernel_words(&dump[..12], 0xffff_8881_0000_0000).len(), 1);
    }

    #[test]
    fn a_pre_pass_names_each_pointer_word_or_fails() {
        const NAMES: [&str; 4] = word_names!("s": 0 1 2 3);
        let mut x = Intersection::default();
        x.add("s.pointers", [8, 24, 800].into_iter().collect());
        let got = pointer_words("s_pointers", "s.pointers", &NAMES, &x).unwrap();
        let names: Vec<&str> = got.iter().map(|f| f.0).collect();
        assert_eq!(
            names,
            ["s.word1", "s.word3"],
            "a word past the names is dropped"
        );
        assert_eq!(got[1].1.offset, 24);
        x.add("s.pointers", Offsets::new());
        assert!(matches!(
            pointer_words("s_pointers", "s.pointers", &NAMES, &x),
            Err(GuessError::NoCandidate {
                field: "s.pointers",
                ..
            })
        ));
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
