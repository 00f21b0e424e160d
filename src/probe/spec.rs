//! The probe set: which kernel functions and tracepoints are used, what each
//! fetches, and how its samples are decoded.
//!
//! | probe            | function (alternatives)          | fetches                                   | task |
//! |------------------|----------------------------------|-------------------------------------------|------|
//! | `sock_create`    | `sock_init_data(sock, sk)`       | sk, sk family, socket type, sk_prot->name | yes  |
//! | `tcp_connect`    | `tcp_connect(sk)`                | sk, family, both addresses and ports      | yes  |
//! | `tcp_accept`     | `inet_csk_accept` return         | `$retval` sock, family, addresses, ports  | yes  |
//! | `sock_close`     | `inet_release(socket)`           | socket->sk, family                        | yes  |
//! | `tcp_send/recv`  | `tcp_sendmsg`/`tcp_recvmsg`      | sk                                        | yes  |
//! | `udp_send(6)`    | `udp_sendmsg`/`udpv6_sendmsg`    | sk, msg_namelen, msg_name family/port/addr| yes  |
//! | `udp_recv(6)`    | `udp_recvmsg`/`udpv6_recvmsg`    | sock fields (bound local address, port)   | yes  |
//! | `ip_out`         | `ip_output(net, sk, skb)`        | sk, skb->len, 64 bytes at skb->data (IPv4 header + ports) | no |
//! | `ip6_out`        | `ip6_output(net, sk, skb)`       | sk, skb->len, 64 bytes at skb->data (IPv6 header + ports) | no |
//! | `ip_in`          | `ip_local_deliver(skb)`          | skb->len, 64 bytes at skb->data (TCP only) | no  |
//! | `ip6_in`         | `ip6_input(skb)`                 | skb->len, 64 bytes at skb->data (TCP only) | no  |
//! | `udp_in`         | `__udp_enqueue_schedule_skb(sk, skb)` | sk, skb->len, 64 bytes before skb->data (IP + UDP headers) | no |
//! | `creds`          | `commit_creds(new)`              | uid, gid, euid, egid                      | yes  |
//! | `exec/fork/exit` | `sched:sched_process_*`          | tracepoint fields                         | yes  |
//!
//! At the packet probes `skb->data` points at the IP header (egress: after
//! the header was pushed; ingress: before it is pulled), so the header and
//! the first four transport bytes (the ports) are at fixed offsets from it;
//! the decoder validates the version nibble, IHL and next header. Ingress
//! UDP is counted at `udp_in` instead: at the IP layer a datagram's UDP
//! header may not be in the linear part of the skb yet (virtio-net with GRO
//! on 5.10 leaves it in a page fragment, so the bytes read there are not
//! the ports); when the datagram is queued on its socket, `skb->data`
//! points at the payload with both headers pulled right before it, and the
//! receiving socket is known.

use std::collections::HashSet;

use crate::decode::{DecoderKind, IpFamily, UDP_DELIVER_WINDOW};
use crate::model::{PacketDir, SockOp, Transport};

use super::btf::{Field, Offsets};
use super::error::ProbeError;

/// Most fetch arguments one probe may have (kernels oops beyond ~128).
pub const MAX_FETCHARGS: usize = 128;
/// Bytes of packet fetched from the IP header on: a maximal IPv4 header
/// (60 bytes) plus the transport ports (4 bytes). Also the kernel's
/// largest fetch array.
pub const PACKET_HEADER_BYTES: usize = 64;
/// Concurrent instances of a return probe (blocked `accept` calls each
/// hold one).
pub const KRETPROBE_MAXACTIVE: u32 = 256;
/// AF_INET.
pub const AF_INET: u16 = 2;
/// AF_INET6.
pub const AF_INET6: u16 = 10;

/// How a probe attaches to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
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

fn deref(off: u32, inner: &str) -> String {
    format!("+{off}({inner})")
}

fn get(name: &str, off: Field, base: &str) -> String {
    format!("{name}={}:{}", deref(off.offset, base), off.fetch_type())
}

/// Fetch arguments describing a `struct sock *` expression.
fn sock_fields(o: &Offsets, sk: &str) -> String {
    [
        format!("sk={sk}:x64"),
        get("family", o.skc_family, sk),
        get("sport", o.skc_num, sk),
        get("dport", o.skc_dport, sk),
        get("saddr", o.skc_rcv_saddr, sk),
        get("daddr", o.skc_daddr, sk),
        format!("saddr6={}:u8[16]", deref(o.skc_v6_rcv_saddr.offset, sk)),
        format!("daddr6={}:u8[16]", deref(o.skc_v6_daddr.offset, sk)),
    ]
    .join(" ")
}

fn packet_fields(o: &Offsets, skb: &str, sk: Option<&str>) -> String {
    let data = deref(o.skb_data.offset, skb);
    let mut v = Vec::new();
    if let Some(sk) = sk {
        v.push(format!("sk={sk}:x64"));
    }
    v.push(get("len", o.skb_len, skb));
    v.push(format!("hdr=+0({data}):u8[{PACKET_HEADER_BYTES}]"));
    v.join(" ")
}

/// Fields of the UDP delivery probe (`sk`, `skb` arguments): the socket,
/// the payload length and the bytes before the payload (UDP and IP
/// headers).
fn udp_delivery_fields(o: &Offsets) -> String {
    let data = deref(o.skb_data.offset, "$arg2");
    [
        "sk=$arg1:x64".to_string(),
        get("len", o.skb_len, "$arg2"),
        format!("hdr=-{UDP_DELIVER_WINDOW}({data}):u8[{UDP_DELIVER_WINDOW}]"),
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
        "sk=$arg1:x64".to_string(),
        get("namelen", o.msg_namelen, "$arg2"),
        format!("nfamily=+0({name}):u16"),
        format!("nport={}:u16", deref(port.offset, &name)),
    ];
    if v6 {
        v.push(format!("naddr6={}:u8[16]", deref(addr.offset, &name)));
    } else {
        v.push(format!("naddr={}:u32", deref(addr.offset, &name)));
    }
    v.join(" ")
}

fn kprobe(
    name: &'static str,
    funcs: &'static [&'static str],
    fetchargs: String,
    task_context: bool,
    decoder: DecoderKind,
) -> ProbeSpec {
    ProbeSpec {
        name,
        attach: Attach::Kprobe(funcs),
        fetchargs,
        task_context,
        decoder,
        filter: None,
        ipv6_only: false,
    }
}

fn tracepoint(name: &'static str, event: &'static str, decoder: DecoderKind) -> ProbeSpec {
    ProbeSpec {
        name,
        attach: Attach::Tracepoint {
            system: "sched",
            event,
        },
        fetchargs: String::new(),
        task_context: true,
        decoder,
        filter: None,
        ipv6_only: false,
    }
}

fn activity(transport: Transport, op: SockOp, family: Option<IpFamily>) -> DecoderKind {
    DecoderKind::SockActivity {
        transport,
        op,
        peer: family,
    }
}

/// The full probe set for a kernel with these offsets. IPv6-only probes are
/// marked; [`resolve`] drops them when IPv6 is not monitored.
pub fn probe_set(o: &Offsets) -> Vec<ProbeSpec> {
    let sk_of_socket = deref(o.socket_sk.offset, "$arg1");
    let proto_name = deref(o.proto_name.offset, &deref(o.skc_prot.offset, "$arg2"));
    vec![
        ProbeSpec {
            filter: Some(FAMILY_FILTER),
            ..kprobe(
                "sock_create",
                &["sock_init_data", "sock_init_data_uid"],
                format!(
                    "sk=$arg2:x64 {} {} prot={proto_name}:string",
                    get("family", o.skc_family, "$arg2"),
                    get("type", o.socket_type, "$arg1"),
                ),
                true,
                DecoderKind::SockCreate,
            )
        },
        kprobe(
            "tcp_connect",
            &["tcp_connect"],
            sock_fields(o, "$arg1"),
            true,
            DecoderKind::TcpConnect,
        ),
        ProbeSpec {
            attach: Attach::Kretprobe(&["inet_csk_accept"]),
            ..kprobe(
                "tcp_accept",
                &[],
                sock_fields(o, "$retval"),
                true,
                DecoderKind::TcpAccept,
            )
        },
        ProbeSpec {
            filter: Some(FAMILY_FILTER),
            ..kprobe(
                "sock_close",
                &["inet_release"],
                format!(
                    "sk={sk_of_socket}:x64 {}",
                    get("family", o.skc_family, &sk_of_socket)
                ),
                true,
                DecoderKind::SockClose,
            )
        },
        kprobe(
            "tcp_send",
            &["tcp_sendmsg"],
            "sk=$arg1:x64".into(),
            true,
            activity(Transport::Tcp, SockOp::Send, None),
        ),
        kprobe(
            "tcp_recv",
            &["tcp_recvmsg"],
            "sk=$arg1:x64".into(),
            true,
            activity(Transport::Tcp, SockOp::Recv, None),
        ),
        kprobe(
            "udp_send",
            &["udp_sendmsg"],
            udp_send_fields(o, false),
            true,
            activity(Transport::Udp, SockOp::Send, Some(IpFamily::V4)),
        ),
        kprobe(
            "udp_recv",
            &["udp_recvmsg"],
            sock_fields(o, "$arg1"),
            true,
            DecoderKind::UdpRecv,
        ),
        ProbeSpec {
            ipv6_only: true,
            ..kprobe(
                "udp6_send",
                &["udpv6_sendmsg"],
                udp_send_fields(o, true),
                true,
                activity(Transport::Udp, SockOp::Send, Some(IpFamily::V6)),
            )
        },
        ProbeSpec {
            ipv6_only: true,
            ..kprobe(
                "udp6_recv",
                &["udpv6_recvmsg"],
                sock_fields(o, "$arg1"),
                true,
                DecoderKind::UdpRecv,
            )
        },
        kprobe(
            "ip_out",
            &["ip_output"],
            packet_fields(o, "$arg3", Some("$arg2")),
            false,
            DecoderKind::Packet {
                dir: PacketDir::Egress,
                family: IpFamily::V4,
            },
        ),
        ProbeSpec {
            ipv6_only: true,
            ..kprobe(
                "ip6_out",
                &["ip6_output"],
                packet_fields(o, "$arg3", Some("$arg2")),
                false,
                DecoderKind::Packet {
                    dir: PacketDir::Egress,
                    family: IpFamily::V6,
                },
            )
        },
        kprobe(
            "ip_in",
            &["ip_local_deliver"],
            packet_fields(o, "$arg1", None),
            false,
            DecoderKind::TcpIngress {
                family: IpFamily::V4,
            },
        ),
        ProbeSpec {
            ipv6_only: true,
            ..kprobe(
                "ip6_in",
                &["ip6_input"],
                packet_fields(o, "$arg1", None),
                false,
                DecoderKind::TcpIngress {
                    family: IpFamily::V6,
                },
            )
        },
        kprobe(
            "udp_in",
            &["__udp_enqueue_schedule_skb"],
            udp_delivery_fields(o),
            false,
            DecoderKind::UdpDeliver,
        ),
        kprobe(
            "creds",
            &["commit_creds"],
            [
                get("uid", o.cred_uid, "$arg1"),
                get("gid", o.cred_gid, "$arg1"),
                get("euid", o.cred_euid, "$arg1"),
                get("egid", o.cred_egid, "$arg1"),
            ]
            .join(" "),
            true,
            DecoderKind::Creds,
        ),
        tracepoint("exec", "sched_process_exec", DecoderKind::Exec),
        tracepoint("fork", "sched_process_fork", DecoderKind::Fork),
        tracepoint("exit", "sched_process_exit", DecoderKind::Exit),
    ]
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
