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

use crate::model::{PacketDir, SockOp, Transport};
pub use crate::schema::PACKET_HEADER_BYTES;
use crate::schema::{DecoderKind, IpFamily, SampleField as F, UDP_DELIVER_WINDOW};

use super::btf::{Field, Offsets};
use super::error::ProbeError;

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
                [
                    pointer(F::Sk, "$arg2"),
                    member(F::Family, o.skc_family, "$arg2"),
                    member(F::SockType, o.socket_type, "$arg1"),
                    arg(F::Prot, &proto_name, "string"),
                ]
                .join(" "),
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
                [
                    pointer(F::Sk, &sk_of_socket),
                    member(F::Family, o.skc_family, &sk_of_socket),
                ]
                .join(" "),
                true,
                DecoderKind::SockClose,
            )
        },
        kprobe(
            "tcp_send",
            &["tcp_sendmsg"],
            pointer(F::Sk, "$arg1"),
            true,
            activity(Transport::Tcp, SockOp::Send, None),
        ),
        kprobe(
            "tcp_recv",
            &["tcp_recvmsg"],
            pointer(F::Sk, "$arg1"),
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
                member(F::Uid, o.cred_uid, "$arg1"),
                member(F::Gid, o.cred_gid, "$arg1"),
                member(F::Euid, o.cred_euid, "$arg1"),
                member(F::Egid, o.cred_egid, "$arg1"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::btf::Provenance;
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
        for spec in probe_set(&offsets()) {
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
    fn stored_bytes_reads_every_fetch_type_used() {
        assert_eq!(stored_bytes("x64"), Some(8));
        assert_eq!(stored_bytes("u16"), Some(2));
        assert_eq!(stored_bytes("u8[64]"), Some(64));
        assert_eq!(stored_bytes("b8@8/32"), Some(4));
        assert_eq!(stored_bytes("string"), None);
    }
}
