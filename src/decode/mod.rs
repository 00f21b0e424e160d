//! Pipeline stage: decode.
//!
//! Turns raw tracepoint/kprobe records ([`RawSample`]) into typed
//! [`Event`]s using the field layout of each event's tracefs `format` file.
//! Decoding is pure and total over untrusted bytes: short or garbage records
//! yield a [`DecodeError`], counted per kind, never a panic. The packet path
//! allocates nothing (only exec filenames become `String`s).

pub mod format;
pub mod ftrace;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::model::{
    Creds, Event, EventKind, Packet, PacketDir, RawSample, SockOp, Task, Transport,
};

pub use format::{FieldKind, Format, FormatError, FormatField};

/// `common_flags` bit: sample taken in hard interrupt context.
pub const TRACE_FLAG_HARDIRQ: u8 = 0x08;
/// `common_flags` bit: sample taken while serving a softirq.
pub const TRACE_FLAG_SOFTIRQ: u8 = 0x10;
/// `common_flags` bit: sample taken in NMI context.
pub const TRACE_FLAG_NMI: u8 = 0x40;
const IRQ_FLAGS: u8 = TRACE_FLAG_HARDIRQ | TRACE_FLAG_SOFTIRQ | TRACE_FLAG_NMI;
/// AF_INET.
const AF_INET: u16 = 2;
/// AF_INET6.
const AF_INET6: u16 = 10;
/// IPPROTO_TCP.
const IPPROTO_TCP: u8 = 6;
/// IPPROTO_UDP.
const IPPROTO_UDP: u8 = 17;
/// IPv6 extension headers walked to find the transport header.
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;
/// Fixed IPv6 header length.
const IPV6_HDR_LEN: usize = 40;
/// Minimal IPv4 header length.
const IPV4_MIN_HDR_LEN: usize = 20;
/// Longest IPv4 header (IHL 15).
const IPV4_MAX_HDR_LEN: usize = 60;
/// UDP header length.
const UDP_HDR_LEN: usize = 8;
/// Bytes fetched before a delivered datagram's payload: the UDP header and
/// the IP header before it (an IPv4 header with up to 36 bytes of options,
/// or an IPv6 header without extension headers). The kernel's largest
/// fetch array.
pub const UDP_DELIVER_WINDOW: usize = 64;
/// IPv4 fragment offset mask.
const IPV4_FRAG_OFFSET: u16 = 0x1fff;
/// IPv6 fragment offset mask (in the fragment header's offset field).
const IPV6_FRAG_OFFSET: u16 = 0xfff8;
/// Smallest `msg_namelen` of an AF_INET destination.
const SOCKADDR_IN_LEN: i32 = 16;
/// Smallest `msg_namelen` of an AF_INET6 destination (RFC 2133 size).
const SOCKADDR_IN6_LEN: i32 = 24;
/// SOCK_STREAM.
const SOCK_STREAM: u64 = 1;
/// SOCK_DGRAM.
const SOCK_DGRAM: u64 = 2;

/// IP version of a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

/// How an event's samples are turned into [`EventKind`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecoderKind {
    /// `sock_init_data`: fields sk, family, type, prot.
    SockCreate,
    /// `tcp_connect`: sock fields (sk, family, sport, dport, saddr, daddr, saddr6, daddr6).
    TcpConnect,
    /// `inet_csk_accept` return: sock fields.
    TcpAccept,
    /// `udp_recvmsg`/`udpv6_recvmsg`: sock fields (only the local ones are used).
    UdpRecv,
    /// Send/receive in syscall context: field sk; with `peer`, also
    /// namelen, nfamily, nport and naddr (V4) or naddr6 (V6).
    SockActivity {
        /// Transport of the probed function.
        transport: Transport,
        /// Send or receive.
        op: SockOp,
        /// Family of the msg_name fields, when fetched.
        peer: Option<IpFamily>,
    },
    /// A packet: fields len, hdr (and sk on egress).
    Packet {
        /// Egress or ingress.
        dir: PacketDir,
        /// IP version of the probed function.
        family: IpFamily,
    },
    /// An ingress packet at the IP layer of which only TCP is reported
    /// (UDP is counted at delivery to its socket, [`DecoderKind::UdpDeliver`]):
    /// fields len, hdr.
    TcpIngress {
        /// IP version of the probed function.
        family: IpFamily,
    },
    /// `__udp_enqueue_schedule_skb(sk, skb)`: a datagram queued on its
    /// socket. Fields sk, len (payload bytes) and hdr: the
    /// [`UDP_DELIVER_WINDOW`] bytes before `skb->data`, which then points at
    /// the payload, so they end with the UDP header, preceded by the IP
    /// header. Read there because at the IP layer the UDP header may still
    /// sit in a page fragment (virtio-net with GRO on 5.10).
    UdpDeliver,
    /// `inet_release`: fields sk, family.
    SockClose,
    /// `sched_process_exec`.
    Exec,
    /// `sched_process_fork`.
    Fork,
    /// `sched_process_exit`.
    Exit,
    /// `commit_creds`: uid, gid, euid, egid.
    Creds,
}

/// One event the decoder must understand.
#[derive(Debug, Clone, Copy)]
pub struct EventDesc<'a> {
    /// Decoder kind.
    pub kind: DecoderKind,
    /// Whether the sample pid/tid is the task that caused the event.
    pub task_context: bool,
    /// Text of its tracefs `format` file.
    pub format: &'a str,
}

impl<'a> From<&'a crate::probe::InstalledEvent> for EventDesc<'a> {
    fn from(e: &'a crate::probe::InstalledEvent) -> Self {
        EventDesc {
            kind: e.decoder,
            task_context: e.task_context,
            format: &e.format,
        }
    }
}

/// Why the decoder cannot be built for an event.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The format file did not parse.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A field the decoder kind needs is missing or has the wrong size.
    #[error("event {event}: field {field} missing or not {size} bytes")]
    Field {
        /// Event name.
        event: String,
        /// Field name.
        field: &'static str,
        /// Expected size.
        size: u32,
    },
}

/// Kinds of decode errors, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DecodeErrorKind {
    /// The sample's event index is unknown.
    UnknownEvent,
    /// The record is shorter than a field requires.
    Truncated,
    /// The record's common_type does not match the event.
    TypeMismatch,
    /// The fetched IP header is inconsistent with the probe.
    BadPacket,
    /// A non-first IP fragment: no transport header to take ports from.
    Fragment,
}

impl DecodeErrorKind {
    /// All kinds, in counter order.
    pub const ALL: [DecodeErrorKind; 5] = [
        DecodeErrorKind::UnknownEvent,
        DecodeErrorKind::Truncated,
        DecodeErrorKind::TypeMismatch,
        DecodeErrorKind::BadPacket,
        DecodeErrorKind::Fragment,
    ];

    /// Stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            DecodeErrorKind::UnknownEvent => "unknown_event",
            DecodeErrorKind::Truncated => "truncated",
            DecodeErrorKind::TypeMismatch => "type_mismatch",
            DecodeErrorKind::BadPacket => "bad_packet",
            DecodeErrorKind::Fragment => "fragment",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A sample that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The sample's event index is not one the decoder was built with.
    #[error("sample of unknown event index {0}")]
    UnknownEvent(u32),
    /// The record ends before a field.
    #[error("event {event}: record of {have} bytes, field needs {need}")]
    Truncated {
        /// Event index.
        event: u32,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// common_type differs from the event's id.
    #[error("event {event}: common_type {found}, expected {expected}")]
    TypeMismatch {
        /// Event index.
        event: u32,
        /// Expected id (low 16 bits).
        expected: u16,
        /// Found id.
        found: u16,
    },
    /// The fetched IP header does not match the probe.
    #[error("event {event}: bad packet header: {what}")]
    BadPacket {
        /// Event index.
        event: u32,
        /// What was wrong.
        what: &'static str,
    },
    /// A non-first IP fragment.
    #[error("event {event}: non-first IP fragment")]
    Fragment {
        /// Event index.
        event: u32,
    },
}

impl DecodeError {
    /// The error's kind.
    pub fn kind(&self) -> DecodeErrorKind {
        match self {
            DecodeError::UnknownEvent(_) => DecodeErrorKind::UnknownEvent,
            DecodeError::Truncated { .. } => DecodeErrorKind::Truncated,
            DecodeError::TypeMismatch { .. } => DecodeErrorKind::TypeMismatch,
            DecodeError::BadPacket { .. } => DecodeErrorKind::BadPacket,
            DecodeError::Fragment { .. } => DecodeErrorKind::Fragment,
        }
    }
}

/// Offset and size of a field in the record.
#[derive(Debug, Clone, Copy)]
struct Loc {
    off: usize,
    size: usize,
}

#[derive(Debug, Clone, Copy)]
struct SockLocs {
    sk: Loc,
    family: Loc,
    sport: Loc,
    dport: Loc,
    saddr: Loc,
    daddr: Loc,
    saddr6: Loc,
    daddr6: Loc,
}

#[derive(Debug, Clone, Copy)]
struct PeerLocs {
    family: IpFamily,
    namelen: Loc,
    nfamily: Loc,
    nport: Loc,
    naddr: Loc,
}

/// Which event a [`Layout::Sock`] sample becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SockEvent {
    Connect,
    Accept,
    UdpRecv,
}

#[derive(Debug, Clone, Copy)]
enum Layout {
    SockCreate {
        sk: Loc,
        family: Loc,
        ty: Loc,
        prot: Loc,
    },
    Sock {
        kind: SockEvent,
        l: SockLocs,
    },
    Activity {
        sk: Loc,
        transport: Transport,
        op: SockOp,
        peer: Option<PeerLocs>,
    },
    Packet {
        dir: PacketDir,
        family: IpFamily,
        /// Report UDP packets (false: counted at delivery instead).
        udp: bool,
        sk: Option<Loc>,
        len: Loc,
        hdr: Loc,
    },
    UdpDeliver {
        sk: Loc,
        len: Loc,
        hdr: Loc,
    },
    Close {
        sk: Loc,
        family: Loc,
    },
    Exec {
        filename: Loc,
        pid: Loc,
    },
    Fork {
        child: Loc,
    },
    Exit {
        pid: Loc,
    },
    Creds {
        uid: Loc,
        gid: Loc,
        euid: Loc,
        egid: Loc,
    },
}

#[derive(Debug, Clone, Copy)]
struct Compiled {
    id: u16,
    task_context: bool,
    common_type: Loc,
    flags: Loc,
    layout: Layout,
}

/// Decodes samples of a fixed list of events.
#[derive(Debug)]
pub struct Decoder {
    events: Vec<Compiled>,
    errors: [AtomicU64; DecodeErrorKind::ALL.len()],
}

struct FieldFinder<'a> {
    f: &'a Format,
}

impl FieldFinder<'_> {
    /// A field of exactly `size` bytes (0 = any size).
    fn get(&self, name: &'static str, size: u32) -> Result<Loc, SetupError> {
        match self.f.field(name) {
            Some(fd) if size == 0 || fd.size == size => Ok(Loc {
                off: fd.offset as usize,
                size: fd.size as usize,
            }),
            _ => Err(SetupError::Field {
                event: self.f.name.clone(),
                field: name,
                size,
            }),
        }
    }

    fn data_loc(&self, name: &'static str) -> Result<Loc, SetupError> {
        match self.f.field(name) {
            Some(fd) if fd.kind == FieldKind::DataLoc && fd.size == 4 => Ok(Loc {
                off: fd.offset as usize,
                size: 4,
            }),
            _ => Err(SetupError::Field {
                event: self.f.name.clone(),
                field: name,
                size: 4,
            }),
        }
    }

    fn sock(&self) -> Result<SockLocs, SetupError> {
        Ok(SockLocs {
            sk: self.get("sk", 8)?,
            family: self.get("family", 2)?,
            sport: self.get("sport", 2)?,
            dport: self.get("dport", 2)?,
            saddr: self.get("saddr", 4)?,
            daddr: self.get("daddr", 4)?,
            saddr6: self.get("saddr6", 16)?,
            daddr6: self.get("daddr6", 16)?,
        })
    }
}

impl Decoder {
    /// Builds a decoder for `events`; `RawSample::event` indexes this slice.
    pub fn new(events: &[EventDesc<'_>]) -> Result<Decoder, SetupError> {
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            let format = Format::parse(e.format)?;
            let ff = FieldFinder { f: &format };
            let layout = match e.kind {
                DecoderKind::SockCreate => Layout::SockCreate {
                    sk: ff.get("sk", 8)?,
                    family: ff.get("family", 2)?,
                    ty: ff.get("type", 0)?,
                    prot: ff.data_loc("prot")?,
                },
                DecoderKind::TcpConnect => Layout::Sock {
                    kind: SockEvent::Connect,
                    l: ff.sock()?,
                },
                DecoderKind::TcpAccept => Layout::Sock {
                    kind: SockEvent::Accept,
                    l: ff.sock()?,
                },
                DecoderKind::UdpRecv => Layout::Sock {
                    kind: SockEvent::UdpRecv,
                    l: ff.sock()?,
                },
                DecoderKind::SockActivity {
                    transport,
                    op,
                    peer,
                } => Layout::Activity {
                    sk: ff.get("sk", 8)?,
                    transport,
                    op,
                    peer: match peer {
                        None => None,
                        Some(family) => Some(PeerLocs {
                            family,
                            namelen: ff.get("namelen", 4)?,
                            nfamily: ff.get("nfamily", 2)?,
                            nport: ff.get("nport", 2)?,
                            naddr: match family {
                                IpFamily::V4 => ff.get("naddr", 4)?,
                                IpFamily::V6 => ff.get("naddr6", 16)?,
                            },
                        }),
                    },
                },
                DecoderKind::Packet { dir, family } => Layout::Packet {
                    dir,
                    family,
                    udp: true,
                    sk: ff.get("sk", 8).ok(),
                    len: ff.get("len", 4)?,
                    hdr: ff.get("hdr", 0)?,
                },
                DecoderKind::TcpIngress { family } => Layout::Packet {
                    dir: PacketDir::Ingress,
                    family,
                    udp: false,
                    sk: None,
                    len: ff.get("len", 4)?,
                    hdr: ff.get("hdr", 0)?,
                },
                DecoderKind::UdpDeliver => Layout::UdpDeliver {
                    sk: ff.get("sk", 8)?,
                    len: ff.get("len", 4)?,
                    hdr: ff.get("hdr", UDP_DELIVER_WINDOW as u32)?,
                },
                DecoderKind::SockClose => Layout::Close {
                    sk: ff.get("sk", 8)?,
                    family: ff.get("family", 2)?,
                },
                DecoderKind::Exec => Layout::Exec {
                    filename: ff.data_loc("filename")?,
                    pid: ff.get("pid", 4)?,
                },
                DecoderKind::Fork => Layout::Fork {
                    child: ff.get("child_pid", 4)?,
                },
                DecoderKind::Exit => Layout::Exit {
                    pid: ff.get("pid", 4)?,
                },
                DecoderKind::Creds => Layout::Creds {
                    uid: ff.get("uid", 4)?,
                    gid: ff.get("gid", 4)?,
                    euid: ff.get("euid", 4)?,
                    egid: ff.get("egid", 4)?,
                },
            };
            out.push(Compiled {
                // common_type is 16 bits wide: ids are compared on those bits.
                id: (format.id & u32::from(u16::MAX)) as u16,
                task_context: e.task_context,
                common_type: ff.get("common_type", 2)?,
                flags: ff.get("common_flags", 1)?,
                layout,
            });
        }
        Ok(Decoder {
            events: out,
            errors: Default::default(),
        })
    }

    /// Number of errors of each kind so far.
    pub fn error_counts(&self) -> [(DecodeErrorKind, u64); DecodeErrorKind::ALL.len()] {
        DecodeErrorKind::ALL.map(|k| (k, self.errors[k.index()].load(Ordering::Relaxed)))
    }

    /// Decodes one sample. `Ok(None)` means the sample is intentionally
    /// ignored (non-TCP/UDP packet, non-inet socket, failed accept).
    /// Errors are counted by kind.
    pub fn decode(&self, s: &RawSample<'_>) -> Result<Option<Event>, DecodeError> {
        let r = self.decode_inner(s);
        if let Err(e) = &r {
            self.errors[e.kind().index()].fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    fn decode_inner(&self, s: &RawSample<'_>) -> Result<Option<Event>, DecodeError> {
        let c = self
            .events
            .get(s.event as usize)
            .ok_or(DecodeError::UnknownEvent(s.event))?;
        let rec = Rec {
            d: s.data,
            event: s.event,
        };
        let ty = rec.uint(c.common_type)? as u16;
        if ty != c.id {
            return Err(DecodeError::TypeMismatch {
                event: s.event,
                expected: c.id,
                found: ty,
            });
        }
        let flags = rec.uint(c.flags)? as u8;
        let task = (c.task_context && flags & IRQ_FLAGS == 0).then_some(Task {
            pid: s.pid,
            tid: s.tid,
        });
        let kind = match c.layout {
            Layout::SockCreate {
                sk,
                family,
                ty,
                prot,
            } => {
                if !is_inet(rec.uint(family)? as u16) {
                    return Ok(None);
                }
                let transport = match rec.str_bytes(prot)? {
                    b"TCP" | b"TCPv6" => Some(Transport::Tcp),
                    b"UDP" | b"UDPv6" => Some(Transport::Udp),
                    [] => match rec.uint(ty)? {
                        SOCK_STREAM => Some(Transport::Tcp),
                        SOCK_DGRAM => Some(Transport::Udp),
                        _ => None,
                    },
                    _ => return Ok(None),
                };
                EventKind::SockCreate {
                    sock: rec.uint(sk)?,
                    transport,
                }
            }
            Layout::Sock { kind, l } => {
                let sock = rec.uint(l.sk)?;
                if sock == 0 {
                    return Ok(None);
                }
                let sport = rec.uint(l.sport)? as u16;
                let dport = rec.be16(l.dport)?;
                let (local, remote) = match rec.uint(l.family)? as u16 {
                    AF_INET => (
                        SocketAddr::new(IpAddr::V4(rec.v4(l.saddr)?), sport),
                        SocketAddr::new(IpAddr::V4(rec.v4(l.daddr)?), dport),
                    ),
                    AF_INET6 => (
                        SocketAddr::new(canonical(rec.v6(l.saddr6)?), sport),
                        SocketAddr::new(canonical(rec.v6(l.daddr6)?), dport),
                    ),
                    _ => return Ok(None),
                };
                match kind {
                    SockEvent::Accept => EventKind::TcpAccept {
                        sock,
                        local,
                        remote,
                    },
                    SockEvent::Connect => EventKind::TcpConnect {
                        sock,
                        local,
                        remote,
                    },
                    SockEvent::UdpRecv => EventKind::UdpRecv { sock, local },
                }
            }
            Layout::Activity {
                sk,
                transport,
                op,
                peer,
            } => EventKind::SockActivity {
                sock: rec.uint(sk)?,
                transport,
                op,
                peer: match peer {
                    Some(p) => rec.peer(p)?,
                    None => None,
                },
            },
            Layout::Packet {
                dir,
                family,
                udp,
                sk,
                len,
                hdr,
            } => {
                let sock = match sk {
                    Some(l) => Some(rec.uint(l)?).filter(|&v| v != 0),
                    None => None,
                };
                let ip_len = rec.uint(len)? as u32;
                let h = rec.bytes(hdr)?;
                if !udp && ip_protocol(h, family) == Some(IPPROTO_UDP) {
                    // Counted at delivery, where its header is readable.
                    return Ok(None);
                }
                let Some((transport, src, dst)) = parse_ip(h, family, s.event)? else {
                    return Ok(None);
                };
                EventKind::Packet(Packet {
                    sock,
                    dir,
                    transport,
                    src,
                    dst,
                    ip_len,
                })
            }
            Layout::UdpDeliver { sk, len, hdr } => {
                let sock = rec.uint(sk)?;
                let payload = rec.uint(len)?;
                let (src, dst, ip_len) = parse_udp_delivery(rec.bytes(hdr)?, payload, s.event)?;
                EventKind::Packet(Packet {
                    sock: Some(sock).filter(|&v| v != 0),
                    dir: PacketDir::Ingress,
                    transport: Transport::Udp,
                    src,
                    dst,
                    ip_len,
                })
            }
            Layout::Close { sk, family } => {
                if !is_inet(rec.uint(family)? as u16) {
                    return Ok(None);
                }
                EventKind::SockClose {
                    sock: rec.uint(sk)?,
                }
            }
            Layout::Exec { filename, pid } => EventKind::Exec {
                pid: rec.uint(pid)? as u32,
                filename: String::from_utf8_lossy(rec.str_bytes(filename)?).into_owned(),
            },
            Layout::Fork { child } => EventKind::Fork {
                parent: s.pid,
                child: rec.uint(child)? as u32,
            },
            Layout::Exit { pid } => EventKind::Exit {
                tid: rec.uint(pid)? as u32,
                pid: s.pid,
            },
            Layout::Creds {
                uid,
                gid,
                euid,
                egid,
            } => EventKind::Creds(Creds {
                uid: rec.uint(uid)? as u32,
                gid: rec.uint(gid)? as u32,
                euid: rec.uint(euid)? as u32,
                egid: rec.uint(egid)? as u32,
            }),
        };
        Ok(Some(Event {
            time: s.time,
            cpu: s.cpu,
            task,
            kind,
        }))
    }
}

fn is_inet(family: u16) -> bool {
    family == AF_INET || family == AF_INET6
}

/// IPv4-mapped IPv6 addresses become IPv4 (they travel as IPv4 packets).
fn canonical(a: Ipv6Addr) -> IpAddr {
    match a.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(a),
    }
}

type Parsed = Option<(Transport, SocketAddr, SocketAddr)>;

fn transport_of(proto: u8) -> Option<Transport> {
    match proto {
        IPPROTO_TCP => Some(Transport::Tcp),
        IPPROTO_UDP => Some(Transport::Udp),
        _ => None,
    }
}

fn port_pair(h: &[u8], off: usize, event: u32) -> Result<(u16, u16), DecodeError> {
    match h.get(off..off + 4) {
        Some(p) => Ok((
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        )),
        None => Err(DecodeError::BadPacket {
            event,
            what: "transport header beyond fetched bytes",
        }),
    }
}

/// Parses the fetched IP header bytes: (transport, src, dst), or None for
/// protocols other than TCP/UDP.
/// The protocol number of the (first) header after the IP header, without
/// validating more than the version nibble.
fn ip_protocol(h: &[u8], family: IpFamily) -> Option<u8> {
    match family {
        IpFamily::V4 if h.first()? >> 4 == 4 => h.get(9).copied(),
        IpFamily::V6 if h.first()? >> 4 == 6 => h.get(6).copied(),
        _ => None,
    }
}

/// Decodes the bytes before a delivered datagram's payload (see
/// [`DecoderKind::UdpDeliver`]): the UDP header ends the window; before it
/// an IPv6 header (next header UDP, payload length = UDP length) or an
/// IPv4 header of any IHL (protocol UDP, total length = IHL + UDP length).
/// Returns source, destination and the IP packet length.
fn parse_udp_delivery(
    w: &[u8],
    payload: u64,
    event: u32,
) -> Result<(SocketAddr, SocketAddr, u32), DecodeError> {
    let bad = |what| DecodeError::BadPacket { event, what };
    if w.len() < UDP_HDR_LEN + IPV4_MIN_HDR_LEN {
        return Err(bad("delivery window too short"));
    }
    let u = w.len() - UDP_HDR_LEN;
    let sp = u16::from_be_bytes([w[u], w[u + 1]]);
    let dp = u16::from_be_bytes([w[u + 2], w[u + 3]]);
    let ulen = u16::from_be_bytes([w[u + 4], w[u + 5]]);
    // A UDP GRO aggregate carries the length of its first segment.
    if usize::from(ulen) < UDP_HDR_LEN || u64::from(ulen) > payload + UDP_HDR_LEN as u64 {
        return Err(bad("no UDP header before the payload"));
    }
    let total =
        |ip_hdr: usize| u32::try_from(payload + (UDP_HDR_LEN + ip_hdr) as u64).unwrap_or(u32::MAX);
    if let Some(v6) = u.checked_sub(IPV6_HDR_LEN).map(|o| &w[o..u]) {
        if v6[0] >> 4 == 6 && v6[6] == IPPROTO_UDP && u16::from_be_bytes([v6[4], v6[5]]) == ulen {
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&v6[8..24]);
            dst.copy_from_slice(&v6[24..40]);
            return Ok((
                SocketAddr::new(IpAddr::V6(Ipv6Addr::from(src)), sp),
                SocketAddr::new(IpAddr::V6(Ipv6Addr::from(dst)), dp),
                total(IPV6_HDR_LEN),
            ));
        }
    }
    for ihl in (IPV4_MIN_HDR_LEN..=IPV4_MAX_HDR_LEN).step_by(4) {
        let Some(o) = u.checked_sub(ihl) else { break };
        let h = &w[o..u];
        if h[0] == 0x40 | (ihl / 4) as u8
            && h[9] == IPPROTO_UDP
            && usize::from(u16::from_be_bytes([h[2], h[3]])) == ihl + usize::from(ulen)
        {
            return Ok((
                SocketAddr::new(IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15])), sp),
                SocketAddr::new(IpAddr::V4(Ipv4Addr::new(h[16], h[17], h[18], h[19])), dp),
                total(ihl),
            ));
        }
    }
    Err(bad("no IP header before the UDP header"))
}

fn parse_ip(h: &[u8], family: IpFamily, event: u32) -> Result<Parsed, DecodeError> {
    let bad = |what| DecodeError::BadPacket { event, what };
    match family {
        IpFamily::V4 => {
            if h.len() < IPV4_MIN_HDR_LEN {
                return Err(bad("header shorter than 20 bytes"));
            }
            if h[0] >> 4 != 4 {
                return Err(bad("not an IPv4 header"));
            }
            let ihl = usize::from(h[0] & 0x0f) * 4;
            if ihl < IPV4_MIN_HDR_LEN {
                return Err(bad("IHL below 5"));
            }
            let Some(t) = transport_of(h[9]) else {
                return Ok(None);
            };
            if u16::from_be_bytes([h[6], h[7]]) & IPV4_FRAG_OFFSET != 0 {
                return Err(DecodeError::Fragment { event });
            }
            let (sp, dp) = port_pair(h, ihl, event)?;
            let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
            let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
            Ok(Some((
                t,
                SocketAddr::new(IpAddr::V4(src), sp),
                SocketAddr::new(IpAddr::V4(dst), dp),
            )))
        }
        IpFamily::V6 => {
            if h.len() < IPV6_HDR_LEN {
                return Err(bad("header shorter than 40 bytes"));
            }
            if h[0] >> 4 != 6 {
                return Err(bad("not an IPv6 header"));
            }
            let mut next = h[6];
            let mut off = IPV6_HDR_LEN;
            loop {
                match next {
                    IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                        let ext = h
                            .get(off..off + 2)
                            .ok_or_else(|| bad("extension headers beyond fetched bytes"))?;
                        next = ext[0];
                        off += (usize::from(ext[1]) + 1) * 8;
                    }
                    IPV6_FRAGMENT => {
                        let ext = h
                            .get(off..off + 4)
                            .ok_or_else(|| bad("extension headers beyond fetched bytes"))?;
                        if u16::from_be_bytes([ext[2], ext[3]]) & IPV6_FRAG_OFFSET != 0 {
                            return Err(DecodeError::Fragment { event });
                        }
                        next = ext[0];
                        off += 8;
                    }
                    _ => break,
                }
            }
            let Some(t) = transport_of(next) else {
                return Ok(None);
            };
            let (sp, dp) = port_pair(h, off, event)?;
            let mut src = [0u8; 16];
            let mut dst = [0u8; 16];
            src.copy_from_slice(&h[8..24]);
            dst.copy_from_slice(&h[24..40]);
            Ok(Some((
                t,
                SocketAddr::new(IpAddr::V6(Ipv6Addr::from(src)), sp),
                SocketAddr::new(IpAddr::V6(Ipv6Addr::from(dst)), dp),
            )))
        }
    }
}

/// Bounds-checked reads from one record.
struct Rec<'a> {
    d: &'a [u8],
    event: u32,
}

impl<'a> Rec<'a> {
    fn bytes(&self, l: Loc) -> Result<&'a [u8], DecodeError> {
        self.d
            .get(l.off..l.off.saturating_add(l.size))
            .ok_or(DecodeError::Truncated {
                event: self.event,
                need: l.off.saturating_add(l.size),
                have: self.d.len(),
            })
    }

    /// Little-endian (host order) unsigned value of a 1/2/4/8-byte field.
    fn uint(&self, l: Loc) -> Result<u64, DecodeError> {
        let b = self.bytes(l)?;
        let mut buf = [0u8; 8];
        let n = b.len().min(buf.len());
        buf[..n].copy_from_slice(&b[..n]);
        Ok(u64::from_le_bytes(buf))
    }

    fn be16(&self, l: Loc) -> Result<u16, DecodeError> {
        let b = self.bytes(l)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn v4(&self, l: Loc) -> Result<Ipv4Addr, DecodeError> {
        let b = self.bytes(l)?;
        Ok(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    }

    fn v6(&self, l: Loc) -> Result<Ipv6Addr, DecodeError> {
        let b = self.bytes(l)?;
        let mut a = [0u8; 16];
        a.copy_from_slice(b);
        Ok(Ipv6Addr::from(a))
    }

    /// Bytes of a `__data_loc` string, without the trailing NUL.
    fn str_bytes(&self, l: Loc) -> Result<&'a [u8], DecodeError> {
        let v = self.uint(l)? as u32;
        let (off, len) = ((v & 0xffff) as usize, (v >> 16) as usize);
        let b = self.bytes(Loc { off, size: len })?;
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        Ok(&b[..end])
    }

    fn peer(&self, p: PeerLocs) -> Result<Option<SocketAddr>, DecodeError> {
        let namelen = self.uint(p.namelen)? as u32 as i32;
        let nfamily = self.uint(p.nfamily)? as u16;
        let port = self.be16(p.nport)?;
        Ok(match (p.family, nfamily) {
            (IpFamily::V4, AF_INET) if namelen >= SOCKADDR_IN_LEN => {
                Some(SocketAddr::new(IpAddr::V4(self.v4(p.naddr)?), port))
            }
            (IpFamily::V6, AF_INET6) if namelen >= SOCKADDR_IN6_LEN => {
                Some(SocketAddr::new(canonical(self.v6(p.naddr)?), port))
            }
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The window a `udp_in` sample carries: `bytes` right-aligned (the
    /// probe reads the bytes that end at the payload).
    fn window(bytes: &[u8]) -> Vec<u8> {
        let mut w = vec![0u8; UDP_DELIVER_WINDOW - bytes.len()];
        w.extend_from_slice(bytes);
        w
    }

    // Recorded on Debian 5.10 (virtio-net, datagram from the host through
    // qemu's forwarding): Ethernet, IPv4 and UDP headers before a 200-byte
    // payload.
    const V4_VIRTIO_5_10: [u8; 42] = [
        82, 84, 0, 18, 52, 86, 82, 85, 10, 0, 2, 2, 8, 0, 69, 0, 0, 228, 3, 192, 0, 0, 64, 17, 94,
        57, 10, 0, 2, 2, 10, 0, 2, 15, 207, 96, 35, 221, 0, 208, 72, 85,
    ];
    // Recorded on Debian 5.10 (loopback ::1): IPv6 and UDP headers before a
    // 100-byte payload.
    const V6_LOOPBACK_5_10: [u8; 48] = [
        96, 1, 128, 163, 0, 108, 17, 64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 185, 47, 35, 222, 0, 108, 0, 127,
    ];

    #[test]
    fn delivered_ipv4_datagram_recorded_on_5_10() {
        let (src, dst, len) = parse_udp_delivery(&window(&V4_VIRTIO_5_10), 200, 1).unwrap();
        assert_eq!(src, "10.0.2.2:53088".parse().unwrap());
        assert_eq!(dst, "10.0.2.15:9181".parse().unwrap());
        assert_eq!(len, 228);
    }

    #[test]
    fn delivered_ipv6_datagram_recorded_on_5_10() {
        let (src, dst, len) = parse_udp_delivery(&window(&V6_LOOPBACK_5_10), 100, 1).unwrap();
        assert_eq!(src, "[::1]:47407".parse().unwrap());
        assert_eq!(dst, "[::1]:9182".parse().unwrap());
        assert_eq!(len, 148);
    }

    #[test]
    fn delivered_ipv4_datagram_with_options() {
        // IHL 7: 8 bytes of options (NOPs) between the addresses and UDP.
        let mut b = vec![0x47, 0, 0, 28 + 8 + 10, 0, 0, 0, 0, 64, 17, 0, 0];
        b.extend_from_slice(&[192, 168, 1, 1, 192, 168, 1, 2]);
        b.extend_from_slice(&[1; 8]);
        b.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 18, 0, 0]);
        let (src, dst, len) = parse_udp_delivery(&window(&b), 10, 1).unwrap();
        assert_eq!(src, "192.168.1.1:12345".parse().unwrap());
        assert_eq!(dst, "192.168.1.2:53".parse().unwrap());
        assert_eq!(len, 46);
    }

    #[test]
    fn inconsistent_delivery_windows_are_errors() {
        // UDP length larger than the payload says.
        assert!(parse_udp_delivery(&window(&V4_VIRTIO_5_10), 100, 1).is_err());
        // No IP header before the UDP header.
        assert!(parse_udp_delivery(&window(&V4_VIRTIO_5_10[20..]), 200, 1).is_err());
        // IPv4 total length that does not match the UDP length.
        let mut b = V4_VIRTIO_5_10;
        b[17] = 229;
        assert!(parse_udp_delivery(&window(&b), 200, 1).is_err());
        // All zeros (a read past the linear data).
        assert!(parse_udp_delivery(&[0; UDP_DELIVER_WINDOW], 200, 1).is_err());
        // Too short, and random windows never panic.
        assert!(parse_udp_delivery(&[0; 8], 0, 1).is_err());
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            let w: Vec<u8> = (0..UDP_DELIVER_WINDOW)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = parse_udp_delivery(&w, seed % 70_000, 1);
        }
    }

    #[test]
    fn ip_protocol_reads_the_next_header() {
        assert_eq!(ip_protocol(&V4_VIRTIO_5_10[14..], IpFamily::V4), Some(17));
        assert_eq!(ip_protocol(&V6_LOOPBACK_5_10, IpFamily::V6), Some(17));
        assert_eq!(ip_protocol(&V6_LOOPBACK_5_10, IpFamily::V4), None);
        assert_eq!(ip_protocol(&[], IpFamily::V4), None);
    }
}
