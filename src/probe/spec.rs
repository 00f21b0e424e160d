//! The probe set: which kernel functions and tracepoints are used, what each
//! fetches, and how its samples are decoded.
//!
//! | probe            | function (alternatives)          | fetches                                   | task |
//! |------------------|----------------------------------|-------------------------------------------|------|
//! | `sock_create`    | `sock_init_data(sock, sk)`       | sk, sk family, socket type, sk_prot->name | yes  |
//! | `tcp_connect`    | `tcp_connect(sk)`                | sk, family, both addresses and ports      | yes  |
//! | `tcp_accept`     | `inet_csk_accept` return         | `$retval` sock, family, addresses, ports  | yes  |
//! | `sock_close`     | `inet_release(socket)`           | socket->sk, family                        | yes  |
//! | `tcp_send`       | `tcp_sendmsg`                    | sk                                        | yes  |
//! | `tcp_recv`       | `tcp_recvmsg` (retired: installed in no mode, replays old recordings) | sk | yes |
//! | `udp_send(6)`    | `udp_sendmsg`/`udpv6_sendmsg`    | sk, msg_namelen, msg_name family/port/addr| yes  |
//! | `udp_recv(6)`    | `udp_recvmsg`/`udpv6_recvmsg`    | sock fields (bound local address, port)   | yes  |
//! | `ip_out`         | `ip_output(net, sk, skb)`        | sk, skb->len, 64 bytes at skb->data (IPv4 header + ports) | no |
//! | `ip6_out`        | `ip6_output(net, sk, skb)`       | sk, skb->len, 64 bytes at skb->data (IPv6 header + ports) | no |
//! | `ip_in`          | `ip_local_deliver(skb)`          | skb->len, 64 bytes at skb->data (TCP only) | no  |
//! | `ip6_in`         | `ip6_input(skb)`                 | skb->len, 64 bytes at skb->data (TCP only) | no  |
//! | `udp_in`         | `__udp_enqueue_schedule_skb(sk, skb)` | sk, skb->len, 64 bytes before skb->data (IP + UDP headers) | no |
//! | `creds`          | `commit_creds(new)`              | uid, gid, euid, egid                      | yes  |
//! | `tcp_end`        | `tcp_set_state(sk, state)`, filtered to `TCP_CLOSE` | sock fields, state, the socket's byte and segment counters, `sk_flags` | no |
//! | `udp_out(6)`     | `ip_output`/`ip6_output`, filtered to UDP | as `ip_out`, and the protocol byte | no |
//! | `exec/fork/exit` | `sched:sched_process_*`          | tracepoint fields                         | yes  |
//!
//! At the packet probes `skb->data` points at the IP header (egress: after
//! the header was pushed; ingress: before it is pulled), so the header and
//! the first four transport bytes (the ports) are at fixed offsets from it;
//! the decoder validates the version nibble, IHL and next header.
//!
//! Which probes are installed depends on `socket.accounting`: per-packet
//! accounting (the default) installs all but `tcp_end` and `udp_out(6)`;
//! socket-counter accounting counts TCP from `tcp_end` alone, so it leaves
//! out the per-syscall TCP probe (`tcp_send`), the TCP
//! ingress probes (`ip_in`, `ip6_in`) and the egress probes of every
//! protocol (`ip_out`, `ip6_out`), which `udp_out(6)` replace: the same
//! functions, with an in-kernel filter that discards all but UDP before a
//! sample is written. Ingress
//! UDP is counted at `udp_in` instead: at the IP layer a datagram's UDP
//! header may not be in the linear part of the skb yet (virtio-net with GRO
//! on 5.10 leaves it in a page fragment, so the bytes read there are not
//! the ports); when the datagram is queued on its socket, `skb->data`
//! points at the payload with both headers pulled right before it, and the
//! receiving socket is known.

use std::collections::HashSet;

use crate::model::{PacketDir, SockOp, Transport};
pub use crate::schema::PACKET_HEADER_BYTES;
use crate::schema::{DecoderKind, IpFamily, SampleField as F, UDP_DELIVER_WINDOW};

use super::btf::{Field, Offsets, Provenance, TcpCounterOffsets};
use super::error::ProbeError;
use super::group::GROUP_PREFIX;
use crate::config::AccountingMode;

/// Most fetch arguments one probe may have (kernels oops beyond ~128).
pub const MAX_FETCHARGS: usize = 128;
/// Concurrent instances of a return probe (blocked `accept` calls each
/// hold one).
pub const KRETPROBE_MAXACTIVE: u32 = 256;
/// AF_INET.
pub const AF_INET: u16 = 2;
/// AF_INET6.
pub const AF_INET6: u16 = 10;

/// How a probe attaches to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// Entry kprobe on the first available function of the list.
    Kprobe(&'static [&'static str]),
    /// Return probe on the first available function of the list.
    Kretprobe(&'static [&'static str]),
    /// A static tracepoint.
    Tracepoint {
        /// Tracepoint system (`sched`).
        system: &'static str,
        /// Tracepoint name.
        event: &'static str,
    },
}

/// One probe of the set, before its function name is resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    /// Event name inside our group (unique, short).
    pub name: &'static str,
    /// Where it attaches.
    pub attach: Attach,
    /// kprobe fetch arguments (`name=FETCHARG:TYPE …`); empty for tracepoints.
    pub fetchargs: String,
    /// Whether the sample's pid/tid is the task that caused the event.
    pub task_context: bool,
    /// How samples are decoded.
    pub decoder: DecoderKind,
    /// In-kernel filter for the perf events (PERF_EVENT_IOC_SET_FILTER).
    pub filter: Option<&'static str>,
    /// Only installed when IPv6 is monitored.
    pub ipv6_only: bool,
}

/// A spec whose kernel function was resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedProbe {
    /// The spec.
    pub spec: ProbeSpec,
    /// The kernel function chosen (None for tracepoints).
    pub function: Option<&'static str>,
}

impl ResolvedProbe {
    /// The `kprobe_events` line defining this probe in `group`, or None for
    /// tracepoints.
    pub fn definition(&self, group: &str) -> Option<String> {
        let func = self.function?;
        let head = match self.spec.attach {
            Attach::Kprobe(_) => "p".to_string(),
            Attach::Kretprobe(_) => format!("r{KRETPROBE_MAXACTIVE}"),
            Attach::Tracepoint { .. } => return None,
        };
        Some(format!(
            "{head}:{group}/{} {func} {}",
            self.spec.name, self.spec.fetchargs
        ))
    }
}

const FAMILY_FILTER: &str = "family == 2 || family == 10";
/// `tcp_set_state` moving a socket to `TCP_CLOSE` (7).
const TCP_CLOSE_FILTER: &str = "newstate == 7";
/// IPPROTO_UDP in the IPv4 protocol / IPv6 next header byte.
const UDP_FILTER: &str = "proto == 17";
/// Offset of the protocol byte in an IPv4 header.
const IPV4_PROTOCOL_OFFSET: u32 = 9;
/// Offset of the next header byte in an IPv6 header.
const IPV6_NEXT_HEADER_OFFSET: u32 = 6;

fn deref(off: u32, inner: &str) -> String {
    format!("+{off}({inner})")
}

/// One fetch argument: the declared field `f` fetched by `expr` as `ty`.
fn arg(f: F, expr: &str, ty: &str) -> String {
    format!("{}={expr}:{ty}", f.name())
}

/// The declared field `f` read from the struct member `m` of `base`.
fn member(f: F, m: Field, base: &str) -> String {
    arg(f, &deref(m.offset, base), &m.fetch_type())
}

/// The declared field `f` as a byte array at `expr`.
fn bytes(f: F, expr: &str, len: usize) -> String {
    arg(f, expr, &format!("u8[{len}]"))
}

/// A pointer-sized field (a kernel address).
fn pointer(f: F, expr: &str) -> String {
    arg(f, expr, "x64")
}

/// Fetch arguments describing a `struct sock *` expression.
fn sock_fields(o: &Offsets, sk: &str) -> String {
    [
        pointer(F::Sk, sk),
        member(F::Family, o.skc_family, sk),
        member(F::Sport, o.skc_num, sk),
        member(F::Dport, o.skc_dport, sk),
        member(F::Saddr, o.skc_rcv_saddr, sk),
        member(F::Daddr, o.skc_daddr, sk),
        bytes(F::Saddr6, &deref(o.skc_v6_rcv_saddr.offset, sk), 16),
        bytes(F::Daddr6, &deref(o.skc_v6_daddr.offset, sk), 16),
    ]
    .join(" ")
}

fn packet_fields(o: &Offsets, skb: &str, sk: Option<&str>) -> String {
    let data = deref(o.skb_data.offset, skb);
    let mut v = Vec::new();
    if let Some(sk) = sk {
        v.push(pointer(F::Sk, sk));
    }
    v.push(member(F::Len, o.skb_len, skb));
    v.push(bytes(F::Hdr, &format!("+0({data})"), PACKET_HEADER_BYTES));
    v.join(" ")
}

/// Fields of the UDP delivery probe (`sk`, `skb` arguments): the socket,
/// the payload length and the bytes before the payload (UDP and IP
/// headers).
fn udp_delivery_fields(o: &Offsets) -> String {
    let data = deref(o.skb_data.offset, "$arg2");
    [
        pointer(F::Sk, "$arg1"),
        member(F::Len, o.skb_len, "$arg2"),
        bytes(
            F::Hdr,
            &format!("-{UDP_DELIVER_WINDOW}({data})"),
            UDP_DELIVER_WINDOW,
        ),
    ]
    .join(" ")
}

/// Fields of the TCP close probe (`tcp_set_state(sk, state)`).
fn tcp_close_fields(o: &Offsets, t: &TcpCounterOffsets) -> String {
    [
        sock_fields(o, "$arg1"),
        arg(F::NewState, "$arg2", "u32"),
        member(F::BytesReceived, t.bytes_received, "$arg1"),
        member(F::BytesSent, t.bytes_sent, "$arg1"),
        member(F::BytesRetrans, t.bytes_retrans, "$arg1"),
        member(F::SegsIn, t.segs_in, "$arg1"),
        member(F::SegsOut, t.segs_out, "$arg1"),
        member(F::SkFlags, t.sk_flags, "$arg1"),
    ]
    .join(" ")
}

fn udp_send_fields(o: &Offsets, v6: bool) -> String {
    let name = deref(o.msg_name.offset, "$arg2");
    let (port, addr) = if v6 {
        (o.sin6_port, o.sin6_addr)
    } else {
        (o.sin_port, o.sin_addr)
    };
    let mut v = vec![
        pointer(F::Sk, "$arg1"),
        member(F::Namelen, o.msg_namelen, "$arg2"),
        arg(F::Nfamily, &format!("+0({name})"), "u16"),
        arg(F::Nport, &deref(port.offset, &name), "u16"),
    ];
    if v6 {
        v.push(bytes(F::Naddr6, &deref(addr.offset, &name), 16));
    } else {
        v.push(arg(F::Naddr, &deref(addr.offset, &name), "u32"));
    }
    v.join(" ")
}

/// What a probe fetches, said in terms of its kernel function's arguments;
/// [`Fetch::args`] turns it into fetch arguments for a kernel's offsets,
/// one per field its [`DecoderKind`] declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// A tracepoint: the kernel defines the fields.
    Tracepoint,
    /// `sock_init_data(sock, sk)`: sk, family, socket type, protocol name.
    SockCreate,
    /// The fields of the `struct sock *` this expression yields.
    Sock(&'static str),
    /// `inet_release(socket)`: `socket->sk` and its family.
    SockOfSocket,
    /// Only the `struct sock *` in this argument.
    Sk(&'static str),
    /// `udp(v6)_sendmsg(sk, msg)`: sk and the destination of `msg_name`.
    UdpSend {
        /// `sockaddr_in6` rather than `sockaddr_in`.
        v6: bool,
    },
    /// A packet at the IP layer: `skb`, and its socket when given.
    Packet {
        /// The `struct sk_buff *` argument.
        skb: &'static str,
        /// The `struct sock *` argument, when the function has one.
        sk: Option<&'static str>,
    },
    /// `__udp_enqueue_schedule_skb(sk, skb)`.
    UdpDeliver,
    /// `tcp_set_state(sk, state)`: the socket, the new state and the
    /// socket's counters.
    TcpClose,
    /// `ip_output`/`ip6_output(net, sk, skb)` as [`Fetch::Packet`], and the
    /// protocol byte at this offset of the IP header.
    PacketProto {
        /// Offset of the protocol (IPv4) or next header (IPv6) byte.
        at: u32,
    },
    /// `commit_creds(new)`.
    Creds,
}

impl Fetch {
    /// The fetch arguments for a kernel with these offsets; None when
    /// they lack what this fetch needs (the TCP socket counters, which
    /// only BTF gives).
    pub fn args(self, o: &Offsets) -> Option<String> {
        Some(match self {
            Fetch::Tracepoint => String::new(),
            Fetch::SockCreate => {
                let proto_name = deref(o.proto_name.offset, &deref(o.skc_prot.offset, "$arg2"));
                [
                    pointer(F::Sk, "$arg2"),
                    member(F::Family, o.skc_family, "$arg2"),
                    member(F::SockType, o.socket_type, "$arg1"),
                    arg(F::Prot, &proto_name, "string"),
                ]
                .join(" ")
            }
            Fetch::Sock(sk) => sock_fields(o, sk),
            Fetch::SockOfSocket => {
                let sk = deref(o.socket_sk.offset, "$arg1");
                [pointer(F::Sk, &sk), member(F::Family, o.skc_family, &sk)].join(" ")
            }
            Fetch::Sk(sk) => pointer(F::Sk, sk),
            Fetch::UdpSend { v6 } => udp_send_fields(o, v6),
            Fetch::Packet { skb, sk } => packet_fields(o, skb, sk),
            Fetch::UdpDeliver => udp_delivery_fields(o),
            Fetch::Creds => [
                member(F::Uid, o.cred_uid, "$arg1"),
                member(F::Gid, o.cred_gid, "$arg1"),
                member(F::Euid, o.cred_euid, "$arg1"),
                member(F::Egid, o.cred_egid, "$arg1"),
            ]
            .join(" "),
            Fetch::TcpClose => tcp_close_fields(o, o.tcp.as_ref()?),
            Fetch::PacketProto { at } => {
                let data = deref(o.skb_data.offset, "$arg3");
                [
                    packet_fields(o, "$arg3", Some("$arg2")),
                    arg(F::Proto, &format!("+{at}({data})"), "u8"),
                ]
                .join(" ")
            }
        })
    }
}

/// One probe of the set, as declared: everything but the offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeDecl {
    /// Event name inside our group (unique, short).
    pub name: &'static str,
    /// Where it attaches.
    pub attach: Attach,
    /// What it fetches.
    pub fetch: Fetch,
    /// Whether the sample's pid/tid is the task that caused the event.
    pub task_context: bool,
    /// How samples are decoded.
    pub decoder: DecoderKind,
    /// In-kernel filter for the perf events (PERF_EVENT_IOC_SET_FILTER).
    pub filter: Option<&'static str>,
    /// Only installed when IPv6 is monitored.
    pub ipv6_only: bool,
    /// The accounting modes it is installed in.
    pub modes: Modes,
}

/// The accounting modes a probe is installed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modes {
    /// Every mode.
    All,
    /// Per-packet accounting only.
    Packets,
    /// Socket-counter accounting only.
    SocketCounters,
    /// No mode installs it any more; declared so that recordings made
    /// with it still replay.
    Retired,
}

impl Modes {
    /// Whether a probe of these modes is installed in `mode`.
    pub fn includes(self, mode: AccountingMode) -> bool {
        match self {
            Modes::All => true,
            Modes::Packets => mode == AccountingMode::Packets,
            Modes::SocketCounters => mode == AccountingMode::SocketCounters,
            Modes::Retired => false,
        }
    }
}

impl ProbeDecl {
    /// The spec for a kernel with these offsets, or None when they lack
    /// what the probe fetches.
    pub fn spec(&self, o: &Offsets) -> Option<ProbeSpec> {
        Some(ProbeSpec {
            name: self.name,
            attach: self.attach,
            fetchargs: self.fetch.args(o)?,
            task_context: self.task_context,
            decoder: self.decoder,
            filter: self.filter,
            ipv6_only: self.ipv6_only,
        })
    }

    /// The declaration of a recorded or installed event: `group/name` of a
    /// kprobe of ours (or its bare name), or `system/event` of a tracepoint.
    pub fn of_event(event: &str) -> Option<&'static ProbeDecl> {
        let (system, name) = event.split_once('/').unwrap_or(("", event));
        PROBES.iter().find(|d| match d.attach {
            Attach::Tracepoint {
                system: s,
                event: e,
            } => s == system && e == name,
            Attach::Kprobe(_) | Attach::Kretprobe(_) => {
                d.name == name && (system.is_empty() || system.starts_with(GROUP_PREFIX))
            }
        })
    }
}

/// An entry kprobe, in syscall context unless said otherwise.
const fn kprobe(
    name: &'static str,
    funcs: &'static [&'static str],
    fetch: Fetch,
    decoder: DecoderKind,
) -> ProbeDecl {
    ProbeDecl {
        name,
        attach: Attach::Kprobe(funcs),
        fetch,
        task_context: true,
        decoder,
        filter: None,
        ipv6_only: false,
        modes: Modes::All,
    }
}

/// A probe on the packet path: no task context.
const fn packet(
    name: &'static str,
    funcs: &'static [&'static str],
    fetch: Fetch,
    decoder: DecoderKind,
) -> ProbeDecl {
    ProbeDecl {
        task_context: false,
        ..kprobe(name, funcs, fetch, decoder)
    }
}

const fn tracepoint(name: &'static str, event: &'static str, decoder: DecoderKind) -> ProbeDecl {
    ProbeDecl {
        name,
        attach: Attach::Tracepoint {
            system: "sched",
            event,
        },
        fetch: Fetch::Tracepoint,
        task_context: true,
        decoder,
        filter: None,
        ipv6_only: false,
        modes: Modes::All,
    }
}

const fn activity(transport: Transport, op: SockOp, family: Option<IpFamily>) -> DecoderKind {
    DecoderKind::SockActivity {
        transport,
        op,
        peer: family,
    }
}

const fn ipv6_only(d: ProbeDecl) -> ProbeDecl {
    ProbeDecl {
        ipv6_only: true,
        ..d
    }
}

/// Installed in per-packet accounting only.
const fn per_packet(d: ProbeDecl) -> ProbeDecl {
    ProbeDecl {
        modes: Modes::Packets,
        ..d
    }
}

/// Installed in no mode (see [`Modes::Retired`]).
const fn retired(d: ProbeDecl) -> ProbeDecl {
    ProbeDecl {
        modes: Modes::Retired,
        ..d
    }
}

/// Installed in socket-counter accounting only.
const fn counters_only(d: ProbeDecl) -> ProbeDecl {
    ProbeDecl {
        modes: Modes::SocketCounters,
        ..d
    }
}

const fn filtered(d: ProbeDecl, filter: &'static str) -> ProbeDecl {
    ProbeDecl {
        filter: Some(filter),
        ..d
    }
}

/// The probe set (see the module documentation).
pub const PROBES: &[ProbeDecl] = &[
    filtered(
        kprobe(
            "sock_create",
            &["sock_init_data", "sock_init_data_uid"],
            Fetch::SockCreate,
            DecoderKind::SockCreate,
        ),
        FAMILY_FILTER,
    ),
    kprobe(
        "tcp_connect",
        &["tcp_connect"],
        Fetch::Sock("$arg1"),
        DecoderKind::TcpConnect,
    ),
    ProbeDecl {
        attach: Attach::Kretprobe(&["inet_csk_accept"]),
        ..kprobe(
            "tcp_accept",
            &[],
            Fetch::Sock("$retval"),
            DecoderKind::TcpAccept,
        )
    },
    filtered(
        kprobe(
            "sock_close",
            &["inet_release"],
            Fetch::SockOfSocket,
            DecoderKind::SockClose,
        ),
        FAMILY_FILTER,
    ),
    per_packet(kprobe(
        "tcp_send",
        &["tcp_sendmsg"],
        Fetch::Sk("$arg1"),
        activity(Transport::Tcp, SockOp::Send, None),
    )),
    // Fired on every receive call, event loops' empty polls included, for
    // an owner that the accept, the connect, the sends and the start-up
    // socket snapshot already give.
    retired(kprobe(
        "tcp_recv",
        &["tcp_recvmsg"],
        Fetch::Sk("$arg1"),
        activity(Transport::Tcp, SockOp::Recv, None),
    )),
    kprobe(
        "udp_send",
        &["udp_sendmsg"],
        Fetch::UdpSend { v6: false },
        activity(Transport::Udp, SockOp::Send, Some(IpFamily::V4)),
    ),
    kprobe(
        "udp_recv",
        &["udp_recvmsg"],
        Fetch::Sock("$arg1"),
        DecoderKind::UdpRecv,
    ),
    ipv6_only(kprobe(
        "udp6_send",
        &["udpv6_sendmsg"],
        Fetch::UdpSend { v6: true },
        activity(Transport::Udp, SockOp::Send, Some(IpFamily::V6)),
    )),
    ipv6_only(kprobe(
        "udp6_recv",
        &["udpv6_recvmsg"],
        Fetch::Sock("$arg1"),
        DecoderKind::UdpRecv,
    )),
    per_packet(packet(
        "ip_out",
        &["ip_output"],
        Fetch::Packet {
            skb: "$arg3",
            sk: Some("$arg2"),
        },
        DecoderKind::Packet {
            dir: PacketDir::Egress,
            family: IpFamily::V4,
        },
    )),
    per_packet(ipv6_only(packet(
        "ip6_out",
        &["ip6_output"],
        Fetch::Packet {
            skb: "$arg3",
            sk: Some("$arg2"),
        },
        DecoderKind::Packet {
            dir: PacketDir::Egress,
            family: IpFamily::V6,
        },
    ))),
    per_packet(packet(
        "ip_in",
        &["ip_local_deliver"],
        Fetch::Packet {
            skb: "$arg1",
            sk: None,
        },
        DecoderKind::TcpIngress {
            family: IpFamily::V4,
        },
    )),
    per_packet(ipv6_only(packet(
        "ip6_in",
        &["ip6_input"],
        Fetch::Packet {
            skb: "$arg1",
            sk: None,
        },
        DecoderKind::TcpIngress {
            family: IpFamily::V6,
        },
    ))),
    counters_only(filtered(
        packet(
            "udp_out",
            &["ip_output"],
            Fetch::PacketProto {
                at: IPV4_PROTOCOL_OFFSET,
            },
            DecoderKind::UdpEgress {
                family: IpFamily::V4,
            },
        ),
        UDP_FILTER,
    )),
    counters_only(ipv6_only(filtered(
        packet(
            "udp6_out",
            &["ip6_output"],
            Fetch::PacketProto {
                at: IPV6_NEXT_HEADER_OFFSET,
            },
            DecoderKind::UdpEgress {
                family: IpFamily::V6,
            },
        ),
        UDP_FILTER,
    ))),
    counters_only(filtered(
        packet(
            "tcp_end",
            &["tcp_set_state"],
            Fetch::TcpClose,
            DecoderKind::TcpClose,
        ),
        TCP_CLOSE_FILTER,
    )),
    packet(
        "udp_in",
        &["__udp_enqueue_schedule_skb"],
        Fetch::UdpDeliver,
        DecoderKind::UdpDeliver,
    ),
    kprobe("creds", &["commit_creds"], Fetch::Creds, DecoderKind::Creds),
    tracepoint("exec", "sched_process_exec", DecoderKind::Exec),
    tracepoint("fork", "sched_process_fork", DecoderKind::Fork),
    tracepoint("exit", "sched_process_exit", DecoderKind::Exit),
];

/// The per-packet probe set for a kernel with these offsets. IPv6-only
/// probes are marked; [`resolve`] drops them when IPv6 is not monitored.
pub fn probe_set(o: &Offsets) -> Vec<ProbeSpec> {
    PROBES
        .iter()
        .filter(|d| d.modes.includes(AccountingMode::Packets))
        .filter_map(|d| d.spec(o))
        .collect()
}

/// The probe set of an accounting mode for a kernel with these offsets;
/// an error when the offsets lack what one of its probes fetches.
pub fn probe_set_for(o: &Offsets, mode: AccountingMode) -> Result<Vec<ProbeSpec>, ProbeError> {
    PROBES
        .iter()
        .filter(|d| d.modes.includes(mode))
        .map(|d| {
            d.spec(o).ok_or_else(|| ProbeError::CountersUnavailable {
                probe: d.name,
                why: match &o.provenance {
                    Provenance::Btf(p) => format!("the BTF of {} lacks them", p.display()),
                    Provenance::Guess { why } => format!("the offsets were guessed ({why})"),
                },
            })
        })
        .collect()
}

/// Picks, for every spec, the first alternative function present in
/// `available`; drops IPv6-only probes unless `ipv6`. Tracepoints resolve
/// to no function.
pub fn resolve(
    specs: Vec<ProbeSpec>,
    available: &HashSet<String>,
    ipv6: bool,
    functions_path: &std::path::Path,
) -> Result<Vec<ResolvedProbe>, ProbeError> {
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        if spec.ipv6_only && !ipv6 {
            continue;
        }
        let function = match spec.attach {
            Attach::Kprobe(alts) | Attach::Kretprobe(alts) => Some(
                alts.iter()
                    .copied()
                    .find(|f| available.contains(*f))
                    .ok_or_else(|| ProbeError::NoFunction {
                        probe: spec.name,
                        alternatives: alts.to_vec(),
                        path: functions_path.to_path_buf(),
                    })?,
            ),
            Attach::Tracepoint { .. } => None,
        };
        out.push(ResolvedProbe { spec, function });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Width;

    /// Offsets of plausible sizes (the values only need to be distinct).
    fn offsets() -> Offsets {
        let mut next = 0;
        let mut f = |size| {
            next += 8;
            Field {
                offset: next,
                size,
                bits: None,
            }
        };
        Offsets {
            provenance: Provenance::Btf("test".into()),
            skc_family: f(2),
            skc_daddr: f(4),
            skc_rcv_saddr: f(4),
            skc_dport: f(2),
            skc_num: f(2),
            skc_v6_daddr: f(16),
            skc_v6_rcv_saddr: f(16),
            skc_prot: f(8),
            sk_protocol: f(2),
            sk_type: f(2),
            sk_common: f(0),
            socket_sk: f(8),
            socket_type: f(2),
            proto_name: f(32),
            skb_len: f(4),
            skb_data: f(8),
            skb_head: f(8),
            skb_network_header: f(2),
            skb_transport_header: f(2),
            cred_uid: f(4),
            cred_gid: f(4),
            cred_euid: f(4),
            cred_egid: f(4),
            msg_name: f(8),
            msg_namelen: f(4),
            sin_port: f(2),
            sin_addr: f(4),
            sin6_port: f(2),
            sin6_addr: f(16),
            tcp: Some(TcpCounterOffsets {
                bytes_received: f(8),
                bytes_sent: f(8),
                bytes_retrans: f(8),
                segs_in: f(4),
                segs_out: f(4),
                sk_flags: f(8),
            }),
        }
    }

    /// Bytes a fetch type stores in the sample (None: not a fixed size).
    fn stored_bytes(ty: &str) -> Option<u32> {
        if let Some(n) = ty.strip_prefix("u8[") {
            return n.strip_suffix(']')?.parse().ok();
        }
        if let Some(unit) = ty.strip_prefix('b') {
            return unit.rsplit('/').next()?.parse::<u32>().ok().map(|b| b / 8);
        }
        let bits: u32 = ty.get(1..)?.parse().ok()?;
        matches!(ty.as_bytes()[0], b'u' | b's' | b'x').then_some(bits / 8)
    }

    #[test]
    fn every_probe_fetches_its_declared_fields() {
        for d in PROBES {
            let spec = d.spec(&offsets()).expect("every offset is known");
            let declared = spec.decoder.fields();
            if spec.decoder.is_tracepoint() {
                assert!(spec.fetchargs.is_empty(), "{}", spec.name);
                continue;
            }
            let fetched: Vec<(&str, &str)> = spec
                .fetchargs
                .split_whitespace()
                .map(|a| {
                    let (name, rest) = a.split_once('=').expect("name=fetcharg:type");
                    let (_, ty) = rest.rsplit_once(':').expect("fetcharg:type");
                    (name, ty)
                })
                .collect();
            let names: Vec<&str> = fetched.iter().map(|(n, _)| *n).collect();
            let want: Vec<&str> = declared.iter().map(|f| f.name()).collect();
            assert_eq!(
                names, want,
                "probe {} fetches other fields than its kind declares",
                spec.name
            );
            for (field, (_, ty)) in declared.iter().zip(&fetched) {
                match field.width() {
                    Width::Bytes(n) => assert_eq!(
                        stored_bytes(ty),
                        Some(n),
                        "probe {}: {} fetched as {ty}",
                        spec.name,
                        field.name()
                    ),
                    Width::Array => assert!(stored_bytes(ty).is_some(), "{}: {ty}", spec.name),
                    Width::DataLoc => assert_eq!(*ty, "string", "{}", spec.name),
                }
            }
        }
    }

    #[test]
    fn recorded_event_names_find_their_declaration() {
        let name = |e: &str| ProbeDecl::of_event(e).map(|d| d.name);
        assert_eq!(name("sockscope_1098/ip_out"), Some("ip_out"));
        assert_eq!(name("sockscope_7_guess/tcp_accept"), Some("tcp_accept"));
        assert_eq!(name("udp_in"), Some("udp_in"));
        assert_eq!(name("sched/sched_process_exec"), Some("exec"));
        assert_eq!(name("kprobes/ip_out"), None, "another tool's probe");
        assert_eq!(name("sched/exec"), None);
        assert_eq!(name("sockscope_1/no_such_probe"), None);
        let mut names: Vec<&str> = PROBES.iter().map(|d| d.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), PROBES.len(), "probe names are unique");
    }

    #[test]
    fn accounting_modes_choose_their_probes() {
        let names = |mode| -> Vec<&str> {
            probe_set_for(&offsets(), mode)
                .expect("every offset is known")
                .iter()
                .map(|s| s.name)
                .collect()
        };
        let packets = names(AccountingMode::Packets);
        let counters = names(AccountingMode::SocketCounters);
        for p in ["tcp_send", "ip_out", "ip_in"] {
            assert!(packets.contains(&p) && !counters.contains(&p), "{p}");
        }
        assert!(!packets.contains(&"tcp_recv") && !counters.contains(&"tcp_recv"));
        assert!(
            ProbeDecl::of_event("sockscope_1/tcp_recv").is_some(),
            "still replays"
        );
        for p in ["tcp_end", "udp_out"] {
            assert!(counters.contains(&p) && !packets.contains(&p), "{p}");
        }
        for p in ["tcp_connect", "tcp_accept", "udp_in", "udp_send", "exec"] {
            assert!(counters.contains(&p) && packets.contains(&p), "{p}");
        }
        let same: Vec<&str> = probe_set(&offsets()).iter().map(|s| s.name).collect();
        assert_eq!(same, packets);
        let mut guessed = offsets();
        guessed.tcp = None;
        guessed.provenance = Provenance::Guess { why: "test".into() };
        let err = probe_set_for(&guessed, AccountingMode::SocketCounters).unwrap_err();
        assert!(err.to_string().contains("guessed"), "{err}");
        assert!(probe_set_for(&guessed, AccountingMode::Packets).is_ok());
    }

    #[test]
    fn stored_bytes_reads_every_fetch_type_used() {
        assert_eq!(stored_bytes("x64"), Some(8));
        assert_eq!(stored_bytes("u16"), Some(2));
        assert_eq!(stored_bytes("u8[64]"), Some(64));
        assert_eq!(stored_bytes("b8@8/32"), Some(4));
        assert_eq!(stored_bytes("string"), None);
    }
}
