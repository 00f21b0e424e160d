//! Kernel struct member offsets read from BTF.

use std::fmt;
use std::path::{Path, PathBuf};

use btf_rs::{Btf, Type};

use super::error::ProbeError;

/// BTF of the running kernel.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// BTF of the ipv6 module, present when IPv6 is built as a module.
pub const IPV6_BTF: &str = "/sys/kernel/btf/ipv6";
/// Deepest nesting of anonymous structs/unions followed when looking up a member.
const MAX_ANON_DEPTH: u32 = 8;
/// Longest typedef/const/volatile chain followed when sizing a type.
const MAX_TYPE_CHAIN: u32 = 16;
/// Bits per byte.
const BITS: u32 = 8;

/// Location of one struct member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Field {
    /// Byte offset of the member (of its containing storage unit for
    /// bitfields).
    pub offset: u32,
    /// Size in bytes (of the containing storage unit for bitfields).
    pub size: u32,
    /// For bitfields: (bit offset inside the unit, width in bits).
    pub bits: Option<(u32, u32)>,
}

impl Field {
    /// kprobe fetch type for this member: `u8`/`u16`/`u32`/`u64`, or
    /// `b<width>@<bit>/<unit bits>` for a bitfield.
    pub fn fetch_type(&self) -> String {
        match self.bits {
            Some((bit, width)) => format!("b{width}@{bit}/{}", self.size * BITS),
            None => format!("u{}", self.size * BITS),
        }
    }
}

/// Where [`Offsets`] came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provenance {
    /// Read from a BTF file.
    Btf(PathBuf),
    /// Discovered at run time by [`crate::probe::guess`].
    Guess {
        /// Why guessing was used (forced by configuration, or why BTF was
        /// unusable).
        why: String,
    },
}

/// The struct member offsets the probe set needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offsets {
    /// Where the offsets came from.
    pub provenance: Provenance,
    /// sock_common.skc_family (u16).
    pub skc_family: Field,
    /// sock_common.skc_daddr (be32).
    pub skc_daddr: Field,
    /// sock_common.skc_rcv_saddr (be32).
    pub skc_rcv_saddr: Field,
    /// sock_common.skc_dport (be16).
    pub skc_dport: Field,
    /// sock_common.skc_num (host-order u16 local port).
    pub skc_num: Field,
    /// sock_common.skc_v6_daddr (in6_addr).
    pub skc_v6_daddr: Field,
    /// sock_common.skc_v6_rcv_saddr (in6_addr).
    pub skc_v6_rcv_saddr: Field,
    /// sock_common.skc_prot (struct proto *).
    pub skc_prot: Field,
    /// sock.sk_protocol (a bitfield on old kernels).
    pub sk_protocol: Field,
    /// sock.sk_type.
    pub sk_type: Field,
    /// Offset of sock.__sk_common inside struct sock (0 on every known kernel).
    pub sk_common: Field,
    /// socket.sk.
    pub socket_sk: Field,
    /// socket.type.
    pub socket_type: Field,
    /// proto.name (char[32]).
    pub proto_name: Field,
    /// sk_buff.len.
    pub skb_len: Field,
    /// sk_buff.data.
    pub skb_data: Field,
    /// sk_buff.head.
    pub skb_head: Field,
    /// sk_buff.network_header.
    pub skb_network_header: Field,
    /// sk_buff.transport_header.
    pub skb_transport_header: Field,
    /// cred.uid.
    pub cred_uid: Field,
    /// cred.gid.
    pub cred_gid: Field,
    /// cred.euid.
    pub cred_euid: Field,
    /// cred.egid.
    pub cred_egid: Field,
    /// msghdr.msg_name.
    pub msg_name: Field,
    /// msghdr.msg_namelen.
    pub msg_namelen: Field,
    /// sockaddr_in.sin_port.
    pub sin_port: Field,
    /// sockaddr_in.sin_addr.
    pub sin_addr: Field,
    /// sockaddr_in6.sin6_port.
    pub sin6_port: Field,
    /// sockaddr_in6.sin6_addr.
    pub sin6_addr: Field,
    /// The TCP socket's own counters, for socket-counter accounting; read
    /// from BTF only (None when the offsets were guessed).
    pub tcp: Option<TcpCounterOffsets>,
}

/// Members of `struct tcp_sock` (and `sock.sk_flags`) read at close by
/// socket-counter accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpCounterOffsets {
    /// tcp_sock.bytes_received (u64).
    pub bytes_received: Field,
    /// tcp_sock.bytes_sent (u64).
    pub bytes_sent: Field,
    /// tcp_sock.bytes_retrans (u64).
    pub bytes_retrans: Field,
    /// tcp_sock.segs_in (u32).
    pub segs_in: Field,
    /// tcp_sock.segs_out (u32).
    pub segs_out: Field,
    /// sock.sk_flags, i.e. sock_common.skc_flags (unsigned long).
    pub sk_flags: Field,
    /// inet_sock.inet_sport: the local port (network order), still set
    /// when a closed socket's `skc_num` was cleared.
    pub inet_sport: Field,
    /// sk_buff.sk: the socket of a datagram sent (the UDP egress probe of
    /// socket-counter accounting).
    pub skb_sk: Field,
}

impl TcpCounterOffsets {
    /// Reads the members from a parsed BTF file; `sk_common` is where
    /// `struct sock` holds its `sock_common`.
    pub fn from_btf(b: &BtfFile, sk_common: Field) -> Result<TcpCounterOffsets, ProbeError> {
        let mut sk_flags = b.field("sock_common", &["skc_flags"])?;
        sk_flags.offset += sk_common.offset;
        Ok(TcpCounterOffsets {
            bytes_received: b.field("tcp_sock", &["bytes_received"])?,
            bytes_sent: b.field("tcp_sock", &["bytes_sent"])?,
            bytes_retrans: b.field("tcp_sock", &["bytes_retrans"])?,
            segs_in: b.field("tcp_sock", &["segs_in"])?,
            segs_out: b.field("tcp_sock", &["segs_out"])?,
            sk_flags,
            skb_sk: b.field("sk_buff", &["sk"])?,
            inet_sport: b.field("inet_sock", &["inet_sport"])?,
        })
    }
}

/// A parsed BTF file and the path it came from.
pub struct BtfFile {
    btf: Btf,
    path: PathBuf,
}

impl BtfFile {
    /// Parses a BTF file (`/sys/kernel/btf/vmlinux` or a copy).
    pub fn open(path: &Path) -> Result<BtfFile, ProbeError> {
        let btf = Btf::from_file(path).map_err(|e| ProbeError::Btf {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(BtfFile {
            btf,
            path: path.to_path_buf(),
        })
    }

    fn member_error(&self, strukt: &str, member: &str) -> ProbeError {
        ProbeError::BtfMember {
            path: self.path.clone(),
            strukt: strukt.to_string(),
            member: member.to_string(),
        }
    }

    fn find_struct(&self, name: &str) -> Option<btf_rs::Struct> {
        let types = self.btf.resolve_types_by_name(name).ok()?;
        types.into_iter().find_map(|t| match t {
            Type::Struct(s) if !s.members.is_empty() => Some(s),
            _ => None,
        })
    }

    /// Strips typedef/const/volatile/restrict/type-tag wrappers.
    fn strip(&self, mut t: Type) -> Option<Type> {
        for _ in 0..MAX_TYPE_CHAIN {
            t = match t {
                Type::Typedef(ref x) => self.btf.resolve_chained_type(x).ok()?,
                Type::Const(ref x) => self.btf.resolve_chained_type(x).ok()?,
                Type::Volatile(ref x) => self.btf.resolve_chained_type(x).ok()?,
                Type::Restrict(ref x) => self.btf.resolve_chained_type(x).ok()?,
                Type::TypeTag(ref x) => self.btf.resolve_chained_type(x).ok()?,
                other => return Some(other),
            };
        }
        None
    }

    fn type_size(&self, t: Type) -> Option<u32> {
        let size = match self.strip(t)? {
            Type::Int(i) => i.size(),
            Type::Ptr(_) => std::mem::size_of::<u64>(),
            Type::Struct(s) | Type::Union(s) => s.size(),
            Type::Enum(e) => e.size(),
            Type::Enum64(e) => e.size(),
            Type::Array(a) => {
                let elem = self.btf.resolve_chained_type(&a).ok()?;
                a.len().checked_mul(self.type_size(elem)? as usize)?
            }
            _ => return None,
        };
        u32::try_from(size).ok()
    }

    /// Finds `name` among the members of `s`, descending into anonymous
    /// structs and unions. Returns (bit offset, member).
    fn find_member(
        &self,
        s: &btf_rs::Struct,
        name: &str,
        depth: u32,
    ) -> Option<(u32, btf_rs::Member)> {
        if depth > MAX_ANON_DEPTH {
            return None;
        }
        for m in &s.members {
            let mname = self.btf.resolve_name(m).unwrap_or_default();
            if mname == name {
                return Some((m.bit_offset(), m.clone()));
            }
            if mname.is_empty() {
                let inner = self
                    .btf
                    .resolve_chained_type(m)
                    .ok()
                    .and_then(|t| self.strip(t));
                if let Some(Type::Struct(inner) | Type::Union(inner)) = inner {
                    if let Some((off, found)) = self.find_member(&inner, name, depth + 1) {
                        return Some((m.bit_offset() + off, found));
                    }
                }
            }
        }
        None
    }

    /// Resolves `strukt.path[0].path[1]…`, following named nested structs and
    /// anonymous members.
    pub fn field(&self, strukt: &str, path: &[&str]) -> Result<Field, ProbeError> {
        let dotted = path.join(".");
        let mut s = self
            .find_struct(strukt)
            .ok_or_else(|| self.member_error(strukt, &dotted))?;
        let mut bit_base = 0u32;
        for (i, name) in path.iter().enumerate() {
            let (bit_off, member) = self
                .find_member(&s, name, 0)
                .ok_or_else(|| self.member_error(strukt, &dotted))?;
            bit_base += bit_off;
            let ty = self
                .btf
                .resolve_chained_type(&member)
                .map_err(|_| self.member_error(strukt, &dotted))?;
            if i + 1 == path.len() {
                let size = self
                    .type_size(ty)
                    .ok_or_else(|| self.member_error(strukt, &dotted))?;
                return Ok(match member.bitfield_size().filter(|&w| w != 0) {
                    Some(width) => {
                        // Express the bitfield relative to a naturally aligned
                        // storage unit of the member's declared size.
                        let unit_bits = size.max(1) * BITS;
                        let unit_start = bit_base / unit_bits * unit_bits;
                        Field {
                            offset: unit_start / BITS,
                            size,
                            bits: Some((bit_base - unit_start, width)),
                        }
                    }
                    None => Field {
                        offset: bit_base / BITS,
                        size,
                        bits: None,
                    },
                });
            }
            s = match self.strip(ty) {
                Some(Type::Struct(n) | Type::Union(n)) => n,
                _ => return Err(self.member_error(strukt, &dotted)),
            };
        }
        Err(self.member_error(strukt, &dotted))
    }
}

impl Offsets {
    /// Reads all offsets from the BTF file at `path`.
    pub fn from_btf(path: &Path) -> Result<Offsets, ProbeError> {
        let b = BtfFile::open(path)?;
        let sk_common = b.field("sock", &["__sk_common"])?;
        let common = |m: &str| -> Result<Field, ProbeError> {
            let mut f = b.field("sock_common", &[m])?;
            f.offset += sk_common.offset;
            Ok(f)
        };
        Ok(Offsets {
            provenance: Provenance::Btf(path.to_path_buf()),
            skc_family: common("skc_family")?,
            skc_daddr: common("skc_daddr")?,
            skc_rcv_saddr: common("skc_rcv_saddr")?,
            skc_dport: common("skc_dport")?,
            skc_num: common("skc_num")?,
            skc_v6_daddr: common("skc_v6_daddr")?,
            skc_v6_rcv_saddr: common("skc_v6_rcv_saddr")?,
            skc_prot: common("skc_prot")?,
            sk_protocol: b.field("sock", &["sk_protocol"])?,
            sk_type: b.field("sock", &["sk_type"])?,
            sk_common,
            socket_sk: b.field("socket", &["sk"])?,
            socket_type: b.field("socket", &["type"])?,
            proto_name: b.field("proto", &["name"])?,
            skb_len: b.field("sk_buff", &["len"])?,
            skb_data: b.field("sk_buff", &["data"])?,
            skb_head: b.field("sk_buff", &["head"])?,
            skb_network_header: b.field("sk_buff", &["network_header"])?,
            skb_transport_header: b.field("sk_buff", &["transport_header"])?,
            cred_uid: b.field("cred", &["uid"])?,
            cred_gid: b.field("cred", &["gid"])?,
            cred_euid: b.field("cred", &["euid"])?,
            cred_egid: b.field("cred", &["egid"])?,
            msg_name: b.field("msghdr", &["msg_name"])?,
            msg_namelen: b.field("msghdr", &["msg_namelen"])?,
            sin_port: b.field("sockaddr_in", &["sin_port"])?,
            sin_addr: b.field("sockaddr_in", &["sin_addr"])?,
            sin6_port: b.field("sockaddr_in6", &["sin6_port"])?,
            sin6_addr: b.field("sockaddr_in6", &["sin6_addr"])?,
            tcp: match TcpCounterOffsets::from_btf(&b, sk_common) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::info!(error = %e, "no TCP socket counters in BTF");
                    None
                }
            },
        })
    }

    /// Reads offsets from the running kernel's BTF ([`VMLINUX_BTF`]).
    pub fn from_running_kernel() -> Result<Offsets, ProbeError> {
        Offsets::from_btf(Path::new(VMLINUX_BTF))
    }

    /// (name, field) pairs in a fixed order, for printing and checks.
    pub fn fields(&self) -> [(&'static str, Field); 28] {
        [
            ("sock_common.skc_family", self.skc_family),
            ("sock_common.skc_daddr", self.skc_daddr),
            ("sock_common.skc_rcv_saddr", self.skc_rcv_saddr),
            ("sock_common.skc_dport", self.skc_dport),
            ("sock_common.skc_num", self.skc_num),
            ("sock_common.skc_v6_daddr", self.skc_v6_daddr),
            ("sock_common.skc_v6_rcv_saddr", self.skc_v6_rcv_saddr),
            ("sock_common.skc_prot", self.skc_prot),
            ("sock.sk_protocol", self.sk_protocol),
            ("sock.sk_type", self.sk_type),
            ("sock.__sk_common", self.sk_common),
            ("socket.sk", self.socket_sk),
            ("socket.type", self.socket_type),
            ("proto.name", self.proto_name),
            ("sk_buff.len", self.skb_len),
            ("sk_buff.data", self.skb_data),
            ("sk_buff.head", self.skb_head),
            ("sk_buff.network_header", self.skb_network_header),
            ("sk_buff.transport_header", self.skb_transport_header),
            ("cred.uid", self.cred_uid),
            ("cred.gid", self.cred_gid),
            ("cred.euid", self.cred_euid),
            ("cred.egid", self.cred_egid),
            ("msghdr.msg_name", self.msg_name),
            ("msghdr.msg_namelen", self.msg_namelen),
            ("sockaddr_in.sin_port", self.sin_port),
            ("sockaddr_in.sin_addr", self.sin_addr),
            ("sockaddr_in6.sin6_port", self.sin6_port),
        ]
    }
}

impl fmt::Display for Offsets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.provenance {
            Provenance::Btf(p) => writeln!(f, "offsets from btf ({})", p.display())?,
            Provenance::Guess { why } => writeln!(f, "offsets guessed at run time ({why})")?,
        }
        for (name, field) in self.fields() {
            write!(
                f,
                "  {name:<28} offset {:>4} size {:>3}",
                field.offset, field.size
            )?;
            if let Some((bit, width)) = field.bits {
                write!(f, " bits {bit}+{width}")?;
            }
            writeln!(f)?;
        }
        write!(
            f,
            "  {:<28} offset {:>4} size {:>3}",
            "sockaddr_in6.sin6_addr", self.sin6_addr.offset, self.sin6_addr.size
        )?;
        match &self.tcp {
            Some(t) => {
                for (name, field) in [
                    ("tcp_sock.bytes_received", t.bytes_received),
                    ("tcp_sock.bytes_sent", t.bytes_sent),
                    ("tcp_sock.bytes_retrans", t.bytes_retrans),
                    ("tcp_sock.segs_in", t.segs_in),
                    ("tcp_sock.segs_out", t.segs_out),
                    ("sock.sk_flags", t.sk_flags),
                    ("sk_buff.sk", t.skb_sk),
                    ("inet_sock.inet_sport", t.inet_sport),
                ] {
                    write!(
                        f,
                        "\n  {name:<28} offset {:>4} size {:>3}",
                        field.offset, field.size
                    )?;
                }
                Ok(())
            }
            None => write!(
                f,
                "\n  tcp_sock counters            unknown (socket-counter accounting unavailable)"
            ),
        }
    }
}

impl fmt::Debug for BtfFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BtfFile").field("path", &self.path).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitfield_fetch_type() {
        let f = Field {
            offset: 512,
            size: 4,
            bits: Some((8, 8)),
        };
        assert_eq!(f.fetch_type(), "b8@8/32");
        let g = Field {
            offset: 16,
            size: 2,
            bits: None,
        };
        assert_eq!(g.fetch_type(), "u16");
    }
}
