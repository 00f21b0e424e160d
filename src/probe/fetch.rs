//! What each probe fetches: fetch arguments (`name=FETCHARG:TYPE`) built
//! from the kernel's struct offsets, one per field its decoder kind
//! declares ([`crate::schema`]).

use crate::schema::{SampleField as F, EXEC_ARGV, PACKET_HEADER_BYTES, UDP_DELIVER_WINDOW};

use super::btf::{Field, Offsets, TcpCounterOffsets};

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

/// The protocol (IPv4) or next header (IPv6) byte at `at` of the IP header
/// at `skb->data`.
fn proto_field(o: &Offsets, skb: &str, at: u32) -> String {
    let data = deref(o.skb_data.offset, skb);
    arg(F::Proto, &format!("+{at}({data})"), "u8")
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

/// Fields of the TCP end probe (`tcp_v4_destroy_sock(sk)`).
fn tcp_close_fields(o: &Offsets, t: &TcpCounterOffsets) -> String {
    [
        sock_fields(o, "$arg1"),
        member(F::BytesReceived, t.bytes_received, "$arg1"),
        member(F::BytesSent, t.bytes_sent, "$arg1"),
        member(F::BytesRetrans, t.bytes_retrans, "$arg1"),
        member(F::SegsIn, t.segs_in, "$arg1"),
        member(F::SegsOut, t.segs_out, "$arg1"),
        member(F::SkFlags, t.sk_flags, "$arg1"),
        member(F::InetSport, t.inet_sport, "$arg1"),
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
    /// A packet delivered at the IP layer: the fields of [`Fetch::Packet`]
    /// without a socket, and the protocol byte at `at` of the IP header,
    /// fetched apart so that the kernel can filter on it.
    ReceivedPacket {
        /// The `struct sk_buff *` argument.
        skb: &'static str,
        /// Offset of the protocol (IPv4) or next header (IPv6) byte.
        at: u32,
    },
    /// `__udp_enqueue_schedule_skb(sk, skb)`.
    UdpDeliver,
    /// `tcp_v4_destroy_sock(sk)`: the socket and its counters.
    TcpClose,
    /// A datagram leaving through `ip_send_skb(net, skb)` or
    /// `ip6_send_skb(skb)`: the socket (`skb->sk`), the length, the
    /// headers as [`Fetch::Packet`], and the protocol byte at `at` of the
    /// IP header. `skb->sk` comes from BTF only.
    SentDatagram {
        /// The `struct sk_buff *` argument.
        skb: &'static str,
        /// Offset of the protocol (IPv4) or next header (IPv6) byte.
        at: u32,
    },
    /// `commit_creds(new)`.
    Creds,
    /// `start_thread(regs, new_ip, new_sp)`: `argc` and the leading
    /// `argv` strings of the new image, read from user memory at `new_sp`
    /// (`argc`, then the `argv` pointers), where the ELF loader has just
    /// laid them out. Entries past `argc` are read too (the NULL after
    /// the last one fails to read, an environment string may follow): the
    /// decoder keeps only the first `argc`.
    ExecArgs,
}

/// Bytes of a user-space word (`argc`, an `argv` pointer) on x86-64.
const USER_WORD: u32 = 8;

/// Fields of the exec argument probe (`start_thread(regs, ip, sp)`).
fn exec_args_fields() -> String {
    let sp = "$arg3";
    let mut v = vec![arg(F::Argc, &format!("+u0({sp})"), "u32")];
    v.extend(EXEC_ARGV.iter().zip(1u32..).map(|(&f, slot)| {
        let ptr = format!("+u{}({sp})", slot * USER_WORD);
        arg(f, &format!("+u0({ptr})"), "string")
    }));
    v.join(" ")
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
            Fetch::ReceivedPacket { skb, at } => {
                [packet_fields(o, skb, None), proto_field(o, skb, at)].join(" ")
            }
            Fetch::UdpDeliver => udp_delivery_fields(o),
            Fetch::Creds => [
                member(F::Uid, o.cred_uid, "$arg1"),
                member(F::Gid, o.cred_gid, "$arg1"),
                member(F::Euid, o.cred_euid, "$arg1"),
                member(F::Egid, o.cred_egid, "$arg1"),
            ]
            .join(" "),
            Fetch::TcpClose => tcp_close_fields(o, o.tcp.as_ref()?),
            Fetch::ExecArgs => exec_args_fields(),
            Fetch::SentDatagram { skb, at } => {
                let sk = deref(o.tcp.as_ref()?.skb_sk.offset, skb);
                [packet_fields(o, skb, Some(&sk)), proto_field(o, skb, at)].join(" ")
            }
        })
    }
}
