//! The probe event schema: what each kind of probe sample carries.
//!
//! A probe kind ([`DecoderKind`]) is declared once, here: the fields its
//! samples carry ([`DecoderKind::fields`]), each with its name in the
//! tracefs format file and its width ([`SampleField`]). Both sides read the
//! same declaration:
//!
//! * [`crate::probe::spec`] writes one fetch argument per declared field,
//!   named by [`SampleField::name`], and a unit test there checks that every
//!   probe fetches exactly its kind's fields, in order, with the declared
//!   widths;
//! * [`crate::decode`] finds each field in the installed event's format file
//!   by the same [`SampleField`], and refuses (at decoder setup) a field its
//!   kind does not declare.
//!
//! A misspelt field is therefore a compile error (fields are an enum), and a
//! field one side forgets is a unit-test failure, never a silent zero.
//!
//! # Adding a probe
//!
//! 1. Declare its kind here: a [`DecoderKind`] variant and its field list in
//!    [`DecoderKind::fields`] (add [`SampleField`] variants if needed).
//! 2. Add its [`crate::probe::spec::ProbeSpec`] to `probe_set` in
//!    `probe/spec.rs`: the kernel functions to try and one fetch argument
//!    per declared field (the test `every_probe_fetches_its_declared_fields`
//!    says which are missing).
//! 3. Turn its samples into a [`crate::model::EventKind`] in the decoder
//!    (`decode/layout.rs` finds the fields, `decode/mod.rs` reads them).
//! 4. Handle the event in the flow engine.
//!
//! This module depends on [`crate::model`] only, so the probe and decode
//! stages can both use it without depending on each other.

use crate::model::{PacketDir, SockOp, Transport};

/// Bytes of packet fetched from the IP header on: a maximal IPv4 header
/// (60 bytes) plus the transport ports (4 bytes). Also the kernel's largest
/// fetch array.
pub const PACKET_HEADER_BYTES: usize = 64;
/// Bytes fetched before a delivered datagram's payload: the UDP header and
/// the IP header before it (an IPv4 header with up to 36 bytes of options,
/// or an IPv6 header without extension headers). The kernel's largest
/// fetch array.
pub const UDP_DELIVER_WINDOW: usize = 64;

/// IP version of a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// How wide a field is in the sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// Exactly this many bytes.
    Bytes(u32),
    /// A byte array whose length the probe chooses (checked by the
    /// decoder against what it needs).
    Array,
    /// A `__data_loc` string (4 bytes: offset and length).
    DataLoc,
}

/// A field of a probe sample, by its name in the event's format file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SampleField {
    /// `struct sock *` address (the socket's identity).
    Sk,
    /// `sk->__sk_common.skc_family`.
    Family,
    /// `socket->type` (SOCK_STREAM, SOCK_DGRAM).
    SockType,
    /// `sk->sk_prot->name` (`TCP`, `UDPv6`, …), a string.
    Prot,
    /// Local port (host order).
    Sport,
    /// Remote port (network order).
    Dport,
    /// Local IPv4 address.
    Saddr,
    /// Remote IPv4 address.
    Daddr,
    /// Local IPv6 address.
    Saddr6,
    /// Remote IPv6 address.
    Daddr6,
    /// `msg->msg_namelen`.
    Namelen,
    /// Family of `msg->msg_name`.
    Nfamily,
    /// Port of `msg->msg_name` (network order).
    Nport,
    /// IPv4 address of `msg->msg_name`.
    Naddr,
    /// IPv6 address of `msg->msg_name`.
    Naddr6,
    /// `skb->len`.
    Len,
    /// Packet header bytes.
    Hdr,
    /// `cred->uid`.
    Uid,
    /// `cred->gid`.
    Gid,
    /// `cred->euid`.
    Euid,
    /// `cred->egid`.
    Egid,
    /// `sched_process_exec`'s file name (tracepoint field).
    Filename,
    /// `sched_process_exec`/`_exit`'s pid (tracepoint field).
    Pid,
    /// `sched_process_fork`'s child pid (tracepoint field).
    ChildPid,
    /// `tcp_sock.bytes_received`: sequence space received (payload, plus
    /// one for a FIN).
    BytesReceived,
    /// `tcp_sock.bytes_sent`: payload bytes transmitted, retransmissions
    /// included.
    BytesSent,
    /// `tcp_sock.bytes_retrans`: payload bytes retransmitted.
    BytesRetrans,
    /// `tcp_sock.segs_in`: segments received (GRO aggregates counted per
    /// segment).
    SegsIn,
    /// `tcp_sock.segs_out`: segments transmitted (GSO packets counted per
    /// segment, retransmissions included).
    SegsOut,
    /// `sock.sk_flags` (`SOCK_DONE`: a FIN was received).
    SkFlags,
    /// `inet_sock.inet_sport`: the local port (network order), kept after
    /// a closed socket gave its port number (`sport`) back.
    InetSport,
    /// The IP protocol (IPv4) or next header (IPv6) byte of a packet.
    Proto,
    /// `argc` of a new program image, read from its user stack.
    Argc,
    /// `argv[0]` of a new program image (a user-space string).
    Argv0,
    /// `argv[1]`.
    Argv1,
    /// `argv[2]`.
    Argv2,
    /// `argv[3]`.
    Argv3,
}

/// How many leading arguments the exec probe fetches
/// ([`SampleField::Argv0`] to [`SampleField::Argv3`]).
pub const EXEC_ARGV_FETCHED: usize = 4;

/// The argument fields of the exec probe, in order.
pub const EXEC_ARGV: [SampleField; EXEC_ARGV_FETCHED] = [
    SampleField::Argv0,
    SampleField::Argv1,
    SampleField::Argv2,
    SampleField::Argv3,
];

impl SampleField {
    /// The field's name in the format file (and in the fetch argument).
    pub const fn name(self) -> &'static str {
        match self {
            SampleField::Sk => "sk",
            SampleField::Family => "family",
            SampleField::SockType => "type",
            SampleField::Prot => "prot",
            SampleField::Sport => "sport",
            SampleField::Dport => "dport",
            SampleField::Saddr => "saddr",
            SampleField::Daddr => "daddr",
            SampleField::Saddr6 => "saddr6",
            SampleField::Daddr6 => "daddr6",
            SampleField::Namelen => "namelen",
            SampleField::Nfamily => "nfamily",
            SampleField::Nport => "nport",
            SampleField::Naddr => "naddr",
            SampleField::Naddr6 => "naddr6",
            SampleField::Len => "len",
            SampleField::Hdr => "hdr",
            SampleField::Uid => "uid",
            SampleField::Gid => "gid",
            SampleField::Euid => "euid",
            SampleField::Egid => "egid",
            SampleField::Filename => "filename",
            SampleField::Pid => "pid",
            SampleField::ChildPid => "child_pid",
            SampleField::BytesReceived => "bytes_received",
            SampleField::BytesSent => "bytes_sent",
            SampleField::BytesRetrans => "bytes_retrans",
            SampleField::SegsIn => "segs_in",
            SampleField::SegsOut => "segs_out",
            SampleField::SkFlags => "sk_flags",
            SampleField::InetSport => "inet_sport",
            SampleField::Proto => "proto",
            SampleField::Argc => "argc",
            SampleField::Argv0 => "argv0",
            SampleField::Argv1 => "argv1",
            SampleField::Argv2 => "argv2",
            SampleField::Argv3 => "argv3",
        }
    }

    /// The field's width.
    pub const fn width(self) -> Width {
        match self {
            SampleField::Sk => Width::Bytes(8),
            SampleField::Family | SampleField::Sport | SampleField::Dport => Width::Bytes(2),
            SampleField::Nfamily | SampleField::Nport => Width::Bytes(2),
            SampleField::Saddr | SampleField::Daddr | SampleField::Naddr => Width::Bytes(4),
            SampleField::Saddr6 | SampleField::Daddr6 | SampleField::Naddr6 => Width::Bytes(16),
            SampleField::Namelen | SampleField::Len => Width::Bytes(4),
            SampleField::Uid | SampleField::Gid | SampleField::Euid | SampleField::Egid => {
                Width::Bytes(4)
            }
            SampleField::Pid | SampleField::ChildPid | SampleField::Argc => Width::Bytes(4),
            SampleField::SegsIn | SampleField::SegsOut => Width::Bytes(4),
            SampleField::BytesReceived | SampleField::BytesSent | SampleField::BytesRetrans => {
                Width::Bytes(8)
            }
            SampleField::SkFlags => Width::Bytes(8),
            SampleField::InetSport => Width::Bytes(2),
            SampleField::Proto => Width::Bytes(1),
            // `socket->type` is a short on every kernel so far, but its
            // width comes from BTF: any integer is accepted.
            SampleField::SockType | SampleField::Hdr => Width::Array,
            SampleField::Prot | SampleField::Filename => Width::DataLoc,
            SampleField::Argv0 | SampleField::Argv1 | SampleField::Argv2 | SampleField::Argv3 => {
                Width::DataLoc
            }
        }
    }
}

/// The fields of a socket read from a `struct sock *`.
const SOCK: &[SampleField] = &[
    SampleField::Sk,
    SampleField::Family,
    SampleField::Sport,
    SampleField::Dport,
    SampleField::Saddr,
    SampleField::Daddr,
    SampleField::Saddr6,
    SampleField::Daddr6,
];

/// The fields of the TCP end probe: the socket and its own counters.
const TCP_CLOSE: &[SampleField] = &[
    SampleField::Sk,
    SampleField::Family,
    SampleField::Sport,
    SampleField::Dport,
    SampleField::Saddr,
    SampleField::Daddr,
    SampleField::Saddr6,
    SampleField::Daddr6,
    SampleField::BytesReceived,
    SampleField::BytesSent,
    SampleField::BytesRetrans,
    SampleField::SegsIn,
    SampleField::SegsOut,
    SampleField::SkFlags,
    SampleField::InetSport,
];

/// How an event's samples are turned into [`crate::model::EventKind`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecoderKind {
    /// `sock_init_data`: a new socket.
    SockCreate,
    /// `tcp_connect`: an active open, with both ends.
    TcpConnect,
    /// `inet_csk_accept` return: an accepted socket, with both ends.
    TcpAccept,
    /// `udp_recvmsg`/`udpv6_recvmsg`: socket fields (only the local ones are
    /// used).
    UdpRecv,
    /// Send/receive in syscall context; with `peer`, also the destination
    /// of `msg_name`.
    SockActivity {
        /// Transport of the probed function.
        transport: Transport,
        /// Send or receive.
        op: SockOp,
        /// Family of the msg_name fields, when fetched.
        peer: Option<IpFamily>,
    },
    /// A packet at the IP layer (egress also carries its socket).
    Packet {
        /// Egress or ingress.
        dir: PacketDir,
        /// IP version of the probed function.
        family: IpFamily,
    },
    /// An ingress packet at the IP layer of which only TCP is reported
    /// (UDP is counted at delivery to its socket, [`DecoderKind::UdpDeliver`]);
    /// the protocol byte is fetched apart so the kernel can filter on it.
    TcpIngress {
        /// IP version of the probed function.
        family: IpFamily,
    },
    /// `__udp_enqueue_schedule_skb(sk, skb)`: a datagram queued on its
    /// socket. `len` is the payload length and `hdr` the
    /// [`UDP_DELIVER_WINDOW`] bytes before `skb->data`, which then points at
    /// the payload, so they end with the UDP header, preceded by the IP
    /// header. Read there because at the IP layer the UDP header may still
    /// sit in a page fragment (virtio-net with GRO on 5.10).
    UdpDeliver,
    /// `inet_release`: a socket released.
    SockClose,
    /// `tcp_v4_destroy_sock(sk)`: a TCP socket's end (closed by its owner,
    /// its connection over), with the socket's own counters
    /// (socket-counter accounting).
    TcpClose,
    /// An egress packet at the IP layer of which only UDP is reported
    /// (socket-counter accounting: TCP is counted by the socket); the
    /// protocol byte is fetched apart so the kernel can filter on it.
    UdpEgress {
        /// IP version of the probed function.
        family: IpFamily,
    },
    /// `sched_process_exec`.
    Exec,
    /// `start_thread(regs, ip, sp)`: a new program image about to run, with
    /// `argc` and the first [`EXEC_ARGV_FETCHED`] arguments read from the
    /// user stack at `sp`. It fires in the exec'ing task right before
    /// `sched_process_exec`, whose file name it complements.
    ExecArgs,
    /// `sched_process_fork`.
    Fork,
    /// `sched_process_exit`.
    Exit,
    /// `commit_creds`: new credentials.
    Creds,
}

impl DecoderKind {
    /// The fields a sample of this kind carries, in fetch order. For
    /// tracepoints, the kernel-defined fields the decoder reads.
    pub fn fields(self) -> &'static [SampleField] {
        use SampleField as F;
        match self {
            DecoderKind::SockCreate => &[F::Sk, F::Family, F::SockType, F::Prot],
            DecoderKind::TcpConnect | DecoderKind::TcpAccept | DecoderKind::UdpRecv => SOCK,
            DecoderKind::SockActivity { peer: None, .. } => &[F::Sk],
            DecoderKind::SockActivity {
                peer: Some(IpFamily::V4),
                ..
            } => &[F::Sk, F::Namelen, F::Nfamily, F::Nport, F::Naddr],
            DecoderKind::SockActivity {
                peer: Some(IpFamily::V6),
                ..
            } => &[F::Sk, F::Namelen, F::Nfamily, F::Nport, F::Naddr6],
            DecoderKind::Packet {
                dir: PacketDir::Egress,
                ..
            } => &[F::Sk, F::Len, F::Hdr],
            DecoderKind::Packet {
                dir: PacketDir::Ingress,
                ..
            } => &[F::Len, F::Hdr],
            // The protocol byte is for the kernel's filter; recordings made
            // before it was fetched decode as well.
            DecoderKind::TcpIngress { .. } => &[F::Len, F::Hdr, F::Proto],
            DecoderKind::UdpDeliver => &[F::Sk, F::Len, F::Hdr],
            DecoderKind::SockClose => &[F::Sk, F::Family],
            DecoderKind::TcpClose => TCP_CLOSE,
            DecoderKind::UdpEgress { .. } => &[F::Sk, F::Len, F::Hdr, F::Proto],
            DecoderKind::Creds => &[F::Uid, F::Gid, F::Euid, F::Egid],
            DecoderKind::Exec => &[F::Filename, F::Pid],
            DecoderKind::ExecArgs => &[F::Argc, F::Argv0, F::Argv1, F::Argv2, F::Argv3],
            DecoderKind::Fork => &[F::ChildPid],
            DecoderKind::Exit => &[F::Pid],
        }
    }

    /// Whether samples of this kind come from a static tracepoint (whose
    /// fields the kernel defines) rather than from fetch arguments.
    pub fn is_tracepoint(self) -> bool {
        matches!(
            self,
            DecoderKind::Exec | DecoderKind::Fork | DecoderKind::Exit
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kind of each shape, so every declared field list is looked at.
    const KINDS: [DecoderKind; 13] = [
        DecoderKind::SockCreate,
        DecoderKind::ExecArgs,
        DecoderKind::TcpClose,
        DecoderKind::UdpEgress {
            family: IpFamily::V4,
        },
        DecoderKind::TcpConnect,
        DecoderKind::UdpDeliver,
        DecoderKind::SockClose,
        DecoderKind::Creds,
        DecoderKind::Exec,
        DecoderKind::Fork,
        DecoderKind::TcpIngress {
            family: IpFamily::V4,
        },
        DecoderKind::SockActivity {
            transport: Transport::Udp,
            op: SockOp::Send,
            peer: Some(IpFamily::V4),
        },
        DecoderKind::SockActivity {
            transport: Transport::Udp,
            op: SockOp::Send,
            peer: Some(IpFamily::V6),
        },
    ];

    #[test]
    fn distinct_fields_have_distinct_names() {
        let mut fields: Vec<SampleField> = KINDS.iter().flat_map(|k| k.fields()).copied().collect();
        fields.sort_by_key(|f| f.name());
        fields.dedup();
        let mut names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
        names.dedup();
        assert_eq!(names.len(), fields.len(), "two fields share a name");
    }

    #[test]
    fn no_kind_declares_a_field_twice() {
        for k in KINDS {
            let f = k.fields();
            for (i, a) in f.iter().enumerate() {
                assert!(!f[i + 1..].contains(a), "{k:?} declares {a:?} twice");
            }
        }
    }
}
