//! Pipeline stage: decode.
//!
//! Turns raw tracepoint/kprobe records ([`RawSample`]) into typed
//! [`Event`]s using the field layout of each event's tracefs `format` file.
//! Decoding is pure and total over untrusted bytes: short or garbage records
//! yield a [`DecodeError`], counted per kind, never a panic. The packet path
//! allocates nothing (only exec filenames become `String`s).

pub mod format;
pub mod ftrace;
mod layout;
mod sample;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::headers::IPPROTO_UDP;
use crate::model::{
    Creds, Event, EventKind, Packet, PacketDir, RawSample, Task, TcpSeq, TcpSockCounters, Transport,
};
pub use crate::schema::Width;
pub use crate::schema::{DecoderKind, IpFamily, UDP_DELIVER_WINDOW};

pub use format::{FieldKind, Format, FormatError, FormatField};
use layout::{FieldFinder, Layout, Loc, SockEvent, SockLocs};
use sample::{
    canonical, ip_protocol, is_inet, parse_ip, parse_udp_delivery, SampleReader, AF_INET, AF_INET6,
};

/// `common_flags` bit: sample taken in hard interrupt context.
pub const TRACE_FLAG_HARDIRQ: u8 = 0x08;
/// `common_flags` bit: sample taken while serving a softirq.
pub const TRACE_FLAG_SOFTIRQ: u8 = 0x10;
/// `common_flags` bit: sample taken in NMI context.
pub const TRACE_FLAG_NMI: u8 = 0x40;
const IRQ_FLAGS: u8 = TRACE_FLAG_HARDIRQ | TRACE_FLAG_SOFTIRQ | TRACE_FLAG_NMI;
/// SOCK_STREAM.
const SOCK_STREAM: u64 = 1;
/// SOCK_DGRAM.
const SOCK_DGRAM: u64 = 2;
/// `SOCK_DONE` bit of `sk_flags`: the socket received a FIN.
const SOCK_DONE_BIT: u64 = 1 << 1;

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
    /// The decoder reads a field the event's kind does not declare (a
    /// defect of the schema or the decoder, caught at setup).
    #[error("event {event}: field {field} is not declared for its kind")]
    Undeclared {
        /// Event name.
        event: String,
        /// Field name.
        field: &'static str,
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

impl Decoder {
    /// Builds a decoder for `events`; `RawSample::event` indexes this slice.
    pub fn new(events: &[EventDesc<'_>]) -> Result<Decoder, SetupError> {
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            let format = Format::parse(e.format)?;
            let ff = FieldFinder::new(&format, e.kind);
            let layout = ff.layout()?;
            out.push(Compiled {
                // common_type is 16 bits wide: ids are compared on those bits.
                id: (format.id & u32::from(u16::MAX)) as u16,
                task_context: e.task_context,
                common_type: ff.common("common_type", Width::Bytes(2))?,
                flags: ff.common("common_flags", Width::Bytes(1))?,
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
        let rec = SampleReader {
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
                let Some((sock, local, remote)) = sock_ends(&rec, &l)? else {
                    return Ok(None);
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
                let Some((transport, src, dst, tcp_flags, seq)) = parse_ip(h, family, s.event)?
                else {
                    return Ok(None);
                };
                // The payload is what the IP length leaves after the
                // headers; an IP length shorter than them is no sequence
                // figure.
                let tcp_seq = seq.and_then(|(seq, payload_at)| {
                    let payload = ip_len.checked_sub(u32::try_from(payload_at).ok()?)?;
                    Some(TcpSeq { seq, payload })
                });
                EventKind::Packet(Packet {
                    sock,
                    dir,
                    transport,
                    src,
                    dst,
                    ip_len,
                    tcp_flags,
                    tcp_seq,
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
                    tcp_flags: None,
                    tcp_seq: None,
                })
            }
            Layout::TcpClose {
                l,
                bytes_received,
                bytes_sent,
                bytes_retrans,
                segs_in,
                segs_out,
                sk_flags,
                inet_sport,
            } => {
                let Some((sock, mut local, remote)) = sock_ends(&rec, &l)? else {
                    return Ok(None);
                };
                if local.port() == 0 {
                    // Closing gave the port number back (`inet_put_port`
                    // clears `skc_num`); the socket still has it here.
                    local.set_port(rec.be16(inet_sport)?);
                }
                EventKind::TcpClose {
                    sock,
                    local,
                    remote,
                    counters: TcpSockCounters {
                        bytes_received: rec.uint(bytes_received)?,
                        bytes_sent: rec.uint(bytes_sent)?,
                        bytes_retrans: rec.uint(bytes_retrans)?,
                        segs_in: rec.uint(segs_in)? as u32,
                        segs_out: rec.uint(segs_out)? as u32,
                        fin_received: rec.uint(sk_flags)? & SOCK_DONE_BIT != 0,
                    },
                }
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
            Layout::ExecArgs { argc, argv } => {
                let argc = usize::try_from(rec.uint(argc)? as u32).unwrap_or(usize::MAX);
                let mut args = Vec::with_capacity(argc.min(argv.len()));
                for &l in argv.iter().take(argc) {
                    args.push(String::from_utf8_lossy(rec.str_bytes(l)?).into_owned());
                }
                EventKind::ExecArgs {
                    pid: s.pid,
                    argc: argc.try_into().unwrap_or(u32::MAX),
                    args,
                }
            }
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

/// The socket and its two ends from a sample's socket fields; None for a
/// null socket or a family other than IPv4/IPv6.
fn sock_ends(
    rec: &SampleReader<'_>,
    l: &SockLocs,
) -> Result<Option<(u64, SocketAddr, SocketAddr)>, DecodeError> {
    let sock = rec.uint(l.sk)?;
    if sock == 0 {
        return Ok(None);
    }
    let sport = rec.uint(l.sport)? as u16;
    let dport = rec.be16(l.dport)?;
    Ok(Some(match rec.uint(l.family)? as u16 {
        AF_INET => (
            sock,
            SocketAddr::new(IpAddr::V4(rec.v4(l.saddr)?), sport),
            SocketAddr::new(IpAddr::V4(rec.v4(l.daddr)?), dport),
        ),
        AF_INET6 => (
            sock,
            SocketAddr::new(canonical(rec.v6(l.saddr6)?), sport),
            SocketAddr::new(canonical(rec.v6(l.daddr6)?), dport),
        ),
        _ => return Ok(None),
    }))
}
