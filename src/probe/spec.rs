//! The probe set: which kernel functions and tracepoints are used, what each
//! fetches, and how its samples are decoded.
//!
//! | probe            | function (alternatives)          | fetches                                   | task |
//! |------------------|----------------------------------|-------------------------------------------|------|
//! | `sock_create`    | `sock_init_data(sock, sk)`       | sk, sk family, socket type, sk_prot->name | yes  |
//! | `tcp_connect`    | `tcp_connect(sk)`                | sk, family, both addresses and ports      | yes  |
//! | `tcp_accept`     | `inet_csk_accept` return         | `$retval` sock, family, addresses, ports  | yes  |
//! | `sock_close`     | `inet_release(socket)`           | socket->sk, family                        | yes  |
//! | `tcp_send`, `tcp_recv` | `tcp_sendmsg`, `tcp_recvmsg` (retired: installed in no mode, replays old recordings) | sk | yes |
//! | `udp_send(6)`    | `udp_sendmsg`/`udpv6_sendmsg` (retired, as above) | sk, msg_namelen, msg_name family/port/addr| yes  |
//! | `udp_recv(6)`    | `udp_recvmsg`/`udpv6_recvmsg` (retired, as above) | sock fields (bound local address, port)   | yes  |
//! | `ip_out`         | `ip_output(net, sk, skb)`        | sk, skb->len, 64 bytes at skb->data (IPv4 header + ports) | when sent in a syscall |
//! | `ip6_out`        | `ip6_output(net, sk, skb)`       | sk, skb->len, 64 bytes at skb->data (IPv6 header + ports) | when sent in a syscall |
//! | `ip_in`          | `ip_local_deliver(skb)`, filtered to TCP | skb->len, 64 bytes at skb->data, the protocol byte | no  |
//! | `ip6_in`         | `ip6_input(skb)`, filtered to TCP | skb->len, 64 bytes at skb->data, the next header byte | no  |
//! | `udp_in`         | `__udp_enqueue_schedule_skb(sk, skb)` | sk, skb->len, 64 bytes before skb->data (IP + UDP headers) | no |
//! | `creds`          | `commit_creds(new)`              | uid, gid, euid, egid                      | yes  |
//! | `tcp_end`        | `tcp_v4_destroy_sock(sk)` (IPv6 sockets too) | sock fields, the socket's byte and segment counters, `sk_flags` | no |
//! | `udp_out(6)`     | `ip_send_skb(net, skb)`/`ip6_send_skb(skb)`, filtered to UDP | as `ip_out` (socket from `skb->sk`), and the protocol byte | when sent in a syscall |
//! | `exec/fork/exit` | `sched:sched_process_*`          | tracepoint fields                         | yes  |
//! | `exec_args`      | `start_thread(regs, ip, sp)` (x86-64 ELF loader) | argc, argv[0..4] from the new user stack | yes |
//!
//! At the packet probes `skb->data` points at the IP header (egress: after
//! the header was pushed; ingress: before it is pulled), so the header and
//! the first four transport bytes (the ports) are at fixed offsets from it;
//! the decoder validates the version nibble, IHL and next header.
//!
//! No probe fires per send or receive call: a socket's user is known from
//! its creation, connect or accept, from its egress packets (sampled in the
//! task that sent them when that is a syscall; the decoder gives a sample
//! flagged as softirq, hard IRQ or NMI no task) and from the start-up
//! socket snapshot.
//!
//! Which probes are installed depends on `socket.accounting`: per-packet
//! accounting (the default) installs all but `tcp_end` and `udp_out(6)`;
//! socket-counter accounting counts TCP from `tcp_end` alone, so it leaves
//! out the TCP
//! ingress probes (`ip_in`, `ip6_in`) and the egress probes of every
//! protocol (`ip_out`, `ip6_out`), which `udp_out(6)` replace: functions
//! datagrams leave through and TCP segments never do, with an in-kernel
//! filter that discards all but UDP before a sample is written. Ingress
//! UDP is counted at `udp_in` instead: at the IP layer a datagram's UDP
//! header may not be in the linear part of the skb yet (virtio-net with GRO
//! on 5.10 leaves it in a page fragment, so the bytes read there are not
//! the ports); when the datagram is queued on its socket, `skb->data`
//! points at the payload with both headers pulled right before it, and the
//! receiving socket is known.

use std::collections::HashSet;

use crate::model::{PacketDir, SockOp, Transport};
pub use crate::schema::PACKET_HEADER_BYTES;
use crate::schema::{DecoderKind, IpFamily};

use super::btf::{Offsets, Provenance};
use super::error::ProbeError;
pub use super::fetch::Fetch;
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
/// IPPROTO_UDP in the IPv4 protocol / IPv6 next header byte.
const UDP_FILTER: &str = "proto == 17";
/// IPPROTO_TCP in the IPv4 protocol / IPv6 next header byte.
const TCP_FILTER: &str = "proto == 6";
/// Offset of the protocol byte in an IPv4 header.
const IPV4_PROTOCOL_OFFSET: u32 = 9;
/// Offset of the next header byte in an IPv6 header.
const IPV6_NEXT_HEADER_OFFSET: u32 = 6;

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

/// A probe on the egress packet path. A packet sent in a syscall (a send,
/// a connect's SYN, a receive's window update, a close's FIN) is sampled in
/// the task that holds its socket, which is then the socket's user; one
/// sent from a softirq or a timer is flagged so in `common_flags` and the
/// decoder gives it no task.
const fn egress(
    name: &'static str,
    funcs: &'static [&'static str],
    fetch: Fetch,
    decoder: DecoderKind,
) -> ProbeDecl {
    kprobe(name, funcs, fetch, decoder)
}

/// A probe on the ingress packet path: no task context.
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
    // The syscall probes below fired on every send or receive call for an
    // owner that the socket's creation, connect or accept, its egress
    // packets sampled in task context and the start-up socket snapshot
    // already give.
    retired(kprobe(
        "tcp_send",
        &["tcp_sendmsg"],
        Fetch::Sk("$arg1"),
        activity(Transport::Tcp, SockOp::Send, None),
    )),
    retired(kprobe(
        "tcp_recv",
        &["tcp_recvmsg"],
        Fetch::Sk("$arg1"),
        activity(Transport::Tcp, SockOp::Recv, None),
    )),
    retired(kprobe(
        "udp_send",
        &["udp_sendmsg"],
        Fetch::UdpSend { v6: false },
        activity(Transport::Udp, SockOp::Send, Some(IpFamily::V4)),
    )),
    retired(kprobe(
        "udp_recv",
        &["udp_recvmsg"],
        Fetch::Sock("$arg1"),
        DecoderKind::UdpRecv,
    )),
    retired(ipv6_only(kprobe(
        "udp6_send",
        &["udpv6_sendmsg"],
        Fetch::UdpSend { v6: true },
        activity(Transport::Udp, SockOp::Send, Some(IpFamily::V6)),
    ))),
    retired(ipv6_only(kprobe(
        "udp6_recv",
        &["udpv6_recvmsg"],
        Fetch::Sock("$arg1"),
        DecoderKind::UdpRecv,
    ))),
    per_packet(egress(
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
    per_packet(ipv6_only(egress(
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
    // Filtered in the kernel to TCP: UDP is counted at `udp_in`, and other
    // protocols are not tracked.
    per_packet(filtered(
        packet(
            "ip_in",
            &["ip_local_deliver"],
            Fetch::ReceivedPacket {
                skb: "$arg1",
                at: IPV4_PROTOCOL_OFFSET,
            },
            DecoderKind::TcpIngress {
                family: IpFamily::V4,
            },
        ),
        TCP_FILTER,
    )),
    per_packet(ipv6_only(filtered(
        packet(
            "ip6_in",
            &["ip6_input"],
            Fetch::ReceivedPacket {
                skb: "$arg1",
                at: IPV6_NEXT_HEADER_OFFSET,
            },
            DecoderKind::TcpIngress {
                family: IpFamily::V6,
            },
        ),
        TCP_FILTER,
    ))),
    // Datagrams leave through these (UDP, and ICMP, raw and ping sockets,
    // which the filter drops); TCP never does, so its packets hit no probe.
    counters_only(filtered(
        egress(
            "udp_out",
            &["ip_send_skb"],
            Fetch::SentDatagram {
                skb: "$arg2",
                at: IPV4_PROTOCOL_OFFSET,
            },
            DecoderKind::UdpEgress {
                family: IpFamily::V4,
            },
        ),
        UDP_FILTER,
    )),
    counters_only(ipv6_only(filtered(
        egress(
            "udp6_out",
            &["ip6_send_skb"],
            Fetch::SentDatagram {
                skb: "$arg1",
                at: IPV6_NEXT_HEADER_OFFSET,
            },
            DecoderKind::UdpEgress {
                family: IpFamily::V6,
            },
        ),
        UDP_FILTER,
    ))),
    // Once per full TCP socket, when it is destroyed: closed by its owner
    // and its connection over (IPv6 sockets are destroyed through it too).
    counters_only(packet(
        "tcp_end",
        &["tcp_v4_destroy_sock"],
        Fetch::TcpClose,
        DecoderKind::TcpClose,
    )),
    packet(
        "udp_in",
        &["__udp_enqueue_schedule_skb"],
        Fetch::UdpDeliver,
        DecoderKind::UdpDeliver,
    ),
    kprobe("creds", &["commit_creds"], Fetch::Creds, DecoderKind::Creds),
    tracepoint("exec", "sched_process_exec", DecoderKind::Exec),
    kprobe(
        "exec_args",
        &["start_thread"],
        Fetch::ExecArgs,
        DecoderKind::ExecArgs,
    ),
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
    use crate::probe::btf::{Field, TcpCounterOffsets};
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
                skb_sk: f(8),
                inet_sport: f(2),
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
    fn egress_probes_keep_their_task_and_tcp_ingress_is_filtered_in_the_kernel() {
        for mode in [AccountingMode::Packets, AccountingMode::SocketCounters] {
            for s in probe_set_for(&offsets(), mode).expect("every offset is known") {
                match s.decoder {
                    DecoderKind::Packet {
                        dir: PacketDir::Egress,
                        ..
                    }
                    | DecoderKind::UdpEgress { .. } => assert!(s.task_context, "{}", s.name),
                    DecoderKind::Packet {
                        dir: PacketDir::Ingress,
                        ..
                    }
                    | DecoderKind::TcpIngress { .. }
                    | DecoderKind::UdpDeliver
                    | DecoderKind::TcpClose => assert!(!s.task_context, "{}", s.name),
                    _ => {}
                }
                if let DecoderKind::TcpIngress { family } = s.decoder {
                    assert_eq!(s.filter, Some(TCP_FILTER), "{}", s.name);
                    let at = match family {
                        IpFamily::V4 => IPV4_PROTOCOL_OFFSET,
                        IpFamily::V6 => IPV6_NEXT_HEADER_OFFSET,
                    };
                    let want = format!("proto=+{at}(");
                    assert!(s.fetchargs.contains(&want), "{}: {}", s.name, s.fetchargs);
                }
            }
        }
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
        for p in ["ip_out", "ip_in"] {
            assert!(packets.contains(&p) && !counters.contains(&p), "{p}");
        }
        for p in [
            "tcp_recv",
            "tcp_send",
            "udp_send",
            "udp_recv",
            "udp6_send",
            "udp6_recv",
        ] {
            assert!(!packets.contains(&p) && !counters.contains(&p), "{p}");
            let d = ProbeDecl::of_event(&format!("sockscope_1/{p}"));
            assert!(d.is_some(), "{p} still replays");
        }
        for p in ["tcp_end", "udp_out"] {
            assert!(counters.contains(&p) && !packets.contains(&p), "{p}");
        }
        for p in ["tcp_connect", "tcp_accept", "udp_in", "exec"] {
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
