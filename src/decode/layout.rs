//! Where each field of a sample is: the layout of one installed event,
//! compiled once from its tracefs format file and its kind's declared
//! fields ([`crate::schema`]).
//!
//! A field is looked up by its [`SampleField`], with the width the schema
//! declares; a field the kind does not declare is refused
//! ([`SetupError::Undeclared`]), so the decoder cannot read what the probe
//! does not fetch.

use crate::model::{PacketDir, SockOp, Transport};
use crate::schema::{
    DecoderKind, IpFamily, SampleField as F, Width, EXEC_ARGV, EXEC_ARGV_FETCHED,
    UDP_DELIVER_WINDOW,
};

use super::format::{FieldKind, Format};
use super::SetupError;

/// Offset and size of a field in the record.
#[derive(Debug, Clone, Copy)]
pub(super) struct Loc {
    pub(super) off: usize,
    pub(super) size: usize,
}

/// The fields read from a `struct sock *`.
#[derive(Debug, Clone, Copy)]
pub(super) struct SockLocs {
    pub(super) sk: Loc,
    pub(super) family: Loc,
    pub(super) sport: Loc,
    pub(super) dport: Loc,
    pub(super) saddr: Loc,
    pub(super) daddr: Loc,
    pub(super) saddr6: Loc,
    pub(super) daddr6: Loc,
}

/// The destination fields of a `sendmsg`'s `msg_name`.
#[derive(Debug, Clone, Copy)]
pub(super) struct PeerLocs {
    pub(super) family: IpFamily,
    pub(super) namelen: Loc,
    pub(super) nfamily: Loc,
    pub(super) nport: Loc,
    pub(super) naddr: Loc,
}

/// Which event a [`Layout::Sock`] sample becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SockEvent {
    Connect,
    Accept,
    UdpRecv,
}

/// The compiled layout of one event kind.
#[derive(Debug, Clone, Copy)]
pub(super) enum Layout {
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
    TcpClose {
        l: SockLocs,
        bytes_received: Loc,
        bytes_sent: Loc,
        bytes_retrans: Loc,
        segs_in: Loc,
        segs_out: Loc,
        sk_flags: Loc,
        inet_sport: Loc,
    },
    Exec {
        filename: Loc,
        pid: Loc,
    },
    ExecArgs {
        argc: Loc,
        argv: [Loc; EXEC_ARGV_FETCHED],
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

/// Looks fields up in one event's format, as its kind declares them.
pub(super) struct FieldFinder<'a> {
    format: &'a Format,
    kind: DecoderKind,
}

impl<'a> FieldFinder<'a> {
    pub(super) fn new(format: &'a Format, kind: DecoderKind) -> Self {
        FieldFinder { format, kind }
    }

    fn missing(&self, field: &'static str, size: u32) -> SetupError {
        SetupError::Field {
            event: self.format.name.clone(),
            field,
            size,
        }
    }

    /// A declared field, with the declared width.
    pub(super) fn get(&self, f: F) -> Result<Loc, SetupError> {
        if !self.kind.fields().contains(&f) {
            return Err(SetupError::Undeclared {
                event: self.format.name.clone(),
                field: f.name(),
            });
        }
        self.common(f.name(), f.width())
    }

    /// A declared field with an exact byte count (narrower than the
    /// schema's [`Width::Array`]).
    fn array(&self, f: F, size: usize) -> Result<Loc, SetupError> {
        let l = self.get(f)?;
        if l.size != size {
            return Err(self.missing(f.name(), size as u32));
        }
        Ok(l)
    }

    /// A field every event has (`common_type`, `common_flags`), or a
    /// declared one.
    pub(super) fn common(&self, name: &'static str, width: Width) -> Result<Loc, SetupError> {
        let fd = self.format.field(name);
        let ok = match (fd, width) {
            (Some(fd), Width::Bytes(n)) => fd.size == n,
            (Some(_), Width::Array) => true,
            (Some(fd), Width::DataLoc) => fd.kind == FieldKind::DataLoc && fd.size == 4,
            (None, _) => false,
        };
        match fd {
            Some(fd) if ok => Ok(Loc {
                off: fd.offset as usize,
                size: fd.size as usize,
            }),
            _ => Err(self.missing(
                name,
                match width {
                    Width::Bytes(n) => n,
                    Width::Array => 0,
                    Width::DataLoc => 4,
                },
            )),
        }
    }

    fn sock(&self) -> Result<SockLocs, SetupError> {
        Ok(SockLocs {
            sk: self.get(F::Sk)?,
            family: self.get(F::Family)?,
            sport: self.get(F::Sport)?,
            dport: self.get(F::Dport)?,
            saddr: self.get(F::Saddr)?,
            daddr: self.get(F::Daddr)?,
            saddr6: self.get(F::Saddr6)?,
            daddr6: self.get(F::Daddr6)?,
        })
    }

    /// The layout of this finder's kind.
    pub(super) fn layout(&self) -> Result<Layout, SetupError> {
        Ok(match self.kind {
            DecoderKind::SockCreate => Layout::SockCreate {
                sk: self.get(F::Sk)?,
                family: self.get(F::Family)?,
                ty: self.get(F::SockType)?,
                prot: self.get(F::Prot)?,
            },
            DecoderKind::TcpConnect => Layout::Sock {
                kind: SockEvent::Connect,
                l: self.sock()?,
            },
            DecoderKind::TcpAccept => Layout::Sock {
                kind: SockEvent::Accept,
                l: self.sock()?,
            },
            DecoderKind::UdpRecv => Layout::Sock {
                kind: SockEvent::UdpRecv,
                l: self.sock()?,
            },
            DecoderKind::SockActivity {
                transport,
                op,
                peer,
            } => Layout::Activity {
                sk: self.get(F::Sk)?,
                transport,
                op,
                peer: match peer {
                    None => None,
                    Some(family) => Some(PeerLocs {
                        family,
                        namelen: self.get(F::Namelen)?,
                        nfamily: self.get(F::Nfamily)?,
                        nport: self.get(F::Nport)?,
                        naddr: match family {
                            IpFamily::V4 => self.get(F::Naddr)?,
                            IpFamily::V6 => self.get(F::Naddr6)?,
                        },
                    }),
                },
            },
            DecoderKind::Packet { dir, family } => Layout::Packet {
                dir,
                family,
                udp: true,
                sk: self.get(F::Sk).ok(),
                len: self.get(F::Len)?,
                hdr: self.get(F::Hdr)?,
            },
            DecoderKind::TcpIngress { family } => Layout::Packet {
                dir: PacketDir::Ingress,
                family,
                udp: false,
                sk: None,
                len: self.get(F::Len)?,
                hdr: self.get(F::Hdr)?,
            },
            DecoderKind::UdpDeliver => Layout::UdpDeliver {
                sk: self.get(F::Sk)?,
                len: self.get(F::Len)?,
                hdr: self.array(F::Hdr, UDP_DELIVER_WINDOW)?,
            },
            DecoderKind::UdpEgress { family } => Layout::Packet {
                dir: PacketDir::Egress,
                family,
                udp: true,
                sk: Some(self.get(F::Sk)?),
                len: self.get(F::Len)?,
                hdr: self.get(F::Hdr)?,
            },
            DecoderKind::TcpClose => Layout::TcpClose {
                l: self.sock()?,
                bytes_received: self.get(F::BytesReceived)?,
                bytes_sent: self.get(F::BytesSent)?,
                bytes_retrans: self.get(F::BytesRetrans)?,
                segs_in: self.get(F::SegsIn)?,
                segs_out: self.get(F::SegsOut)?,
                sk_flags: self.get(F::SkFlags)?,
                inet_sport: self.get(F::InetSport)?,
            },
            DecoderKind::SockClose => Layout::Close {
                sk: self.get(F::Sk)?,
                family: self.get(F::Family)?,
            },
            DecoderKind::Exec => Layout::Exec {
                filename: self.get(F::Filename)?,
                pid: self.get(F::Pid)?,
            },
            DecoderKind::ExecArgs => {
                let mut argv = [Loc { off: 0, size: 0 }; EXEC_ARGV_FETCHED];
                for (loc, &f) in argv.iter_mut().zip(EXEC_ARGV.iter()) {
                    *loc = self.get(f)?;
                }
                Layout::ExecArgs {
                    argc: self.get(F::Argc)?,
                    argv,
                }
            }
            DecoderKind::Fork => Layout::Fork {
                child: self.get(F::ChildPid)?,
            },
            DecoderKind::Exit => Layout::Exit {
                pid: self.get(F::Pid)?,
            },
            DecoderKind::Creds => Layout::Creds {
                uid: self.get(F::Uid)?,
                gid: self.get(F::Gid)?,
                euid: self.get(F::Euid)?,
                egid: self.get(F::Egid)?,
            },
        })
    }
}
