//! DNS message parsing (RFC 1035) for responses: header, the question, and
//! the A, AAAA and CNAME records of the answer section.
//!
//! Input is untrusted. Every read is bounds-checked; names are limited to
//! [`MAX_NAME_WIRE_LEN`] octets on the wire and labels to [`MAX_LABEL_LEN`];
//! compression pointers must point before the start of the run of labels
//! they end (so every jump goes strictly backwards), which rules out loops,
//! and their number per name is capped by [`MAX_POINTER_JUMPS`].

use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Size of the fixed DNS header.
pub const HEADER_LEN: usize = 12;
/// Longest label (RFC 1035 2.3.4).
pub const MAX_LABEL_LEN: usize = 63;
/// Longest name in wire form, length octets and root label included.
pub const MAX_NAME_WIRE_LEN: usize = 255;
/// Most compression pointers followed while reading one name. Backwards-only
/// pointers already guarantee termination; this bounds the work.
pub const MAX_POINTER_JUMPS: usize = 64;
/// Most answer records examined per message; the rest are ignored.
pub const MAX_ANSWER_RECORDS: usize = 64;

/// Record type A.
pub const TYPE_A: u16 = 1;
/// Record type CNAME.
pub const TYPE_CNAME: u16 = 5;
/// Record type AAAA.
pub const TYPE_AAAA: u16 = 28;
/// Class IN.
pub const CLASS_IN: u16 = 1;

const FLAG_QR: u16 = 0x8000;
const FLAG_TC: u16 = 0x0200;
const OPCODE_SHIFT: u16 = 11;
const OPCODE_MASK: u16 = 0xF;
const RCODE_MASK: u16 = 0xF;
const OPCODE_QUERY: u16 = 0;
/// The two top bits of a length octet: 00 label, 11 pointer, 01/10 reserved
/// (read as a label longer than 63).
const LABEL_KIND_MASK: u8 = 0xC0;
const LABEL_KIND_POINTER: u8 = 0xC0;
const POINTER_OFFSET_MASK: u16 = 0x3FFF;
/// Type, class, TTL and rdlength after a record's owner name.
const RECORD_FIXED_LEN: usize = 10;
/// Type and class after the question name.
const QUESTION_FIXED_LEN: usize = 4;

/// Why a DNS message was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum WireError {
    /// The message ends inside the header or the question.
    #[error("message truncated before the end of the question")]
    Truncated,
    /// QR bit clear: a query, not a response.
    #[error("message is a query, not a response")]
    NotResponse,
    /// Opcode other than QUERY.
    #[error("opcode is not QUERY")]
    NotQuery,
    /// QDCOUNT is not 1.
    #[error("question count is not 1")]
    QuestionCount,
    /// A length octet of 64..=191: a label longer than 63 octets, or one of
    /// the reserved (01, 10) label types, e.g. the obsolete extended labels.
    #[error("label longer than {MAX_LABEL_LEN} octets or of a reserved type")]
    LabelTooLong,
    /// A name longer than 255 octets.
    #[error("name longer than {MAX_NAME_WIRE_LEN} octets")]
    NameTooLong,
    /// A compression pointer beyond the end of the message.
    #[error("compression pointer out of range")]
    PointerOutOfRange,
    /// A compression pointer that does not point strictly backwards (a
    /// loop, or a forward reference), or too many pointers in one name.
    #[error("compression pointer loop")]
    PointerLoop,
    /// An A or AAAA record whose data has the wrong length.
    #[error("address record with wrong data length")]
    BadRecordLength,
}

/// Data of a kept answer record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordData {
    /// An IPv4 address.
    A(Ipv4Addr),
    /// An IPv6 address.
    Aaaa(Ipv6Addr),
    /// An alias to another name.
    Cname(String),
}

/// One answer record of class IN and type A, AAAA or CNAME.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Owner name, lower case, without the trailing dot.
    pub name: String,
    /// Time to live in seconds.
    pub ttl: u32,
    /// The data.
    pub data: RecordData,
}

/// A parsed DNS response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Transaction id.
    pub id: u16,
    /// Response code (0 = NOERROR).
    pub rcode: u8,
    /// TC flag: the server truncated the response.
    pub tc: bool,
    /// True when the answer section ended early because the captured bytes
    /// ran out (snap length, or a malformed record); `answers` holds the
    /// records read before that point.
    pub incomplete: bool,
    /// The question name, lower case, without the trailing dot.
    pub qname: String,
    /// The question type.
    pub qtype: u16,
    /// The question class.
    pub qclass: u16,
    /// Kept answer records, in message order.
    pub answers: Vec<Record>,
}

/// Bounds-checked big-endian reads.
fn read_u8(msg: &[u8], pos: usize) -> Option<u8> {
    msg.get(pos).copied()
}

fn read_u16(msg: &[u8], pos: usize) -> Option<u16> {
    let b = msg.get(pos..pos.checked_add(2)?)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

fn read_u32(msg: &[u8], pos: usize) -> Option<u32> {
    let b = msg.get(pos..pos.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Appends one label to `out` in presentation form: ASCII letters lowered,
/// digits, `-` and `_` as is, everything else as `\DDD`.
fn push_label(out: &mut String, label: &[u8]) {
    if !out.is_empty() {
        out.push('.');
    }
    for &b in label {
        match b {
            b'A'..=b'Z' => out.push(char::from(b.to_ascii_lowercase())),
            b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => out.push(char::from(b)),
            _ => {
                // Writing to a String cannot fail.
                let _ = write!(out, "\\{b:03}");
            }
        }
    }
}

/// Reads the (possibly compressed) name at `start`. Returns the name and the
/// position just after its in-place encoding.
pub fn read_name(msg: &[u8], start: usize) -> Result<(String, usize), ReadNameError> {
    let mut out = String::new();
    let mut pos = start;
    // Where reading continues after the name: set at the first pointer.
    let mut end: Option<usize> = None;
    let mut wire_len = 0usize;
    let mut jumps = 0usize;
    // Start of the contiguous run being read. Every pointer must target a
    // position before it, so runs move strictly backwards and reading ends.
    let mut run_start = start;
    loop {
        let len = read_u8(msg, pos).ok_or(ReadNameError::Truncated)?;
        match len & LABEL_KIND_MASK {
            0 => {
                let len = usize::from(len);
                wire_len += len + 1;
                if wire_len > MAX_NAME_WIRE_LEN {
                    return Err(ReadNameError::Wire(WireError::NameTooLong));
                }
                if len == 0 {
                    let next = end.unwrap_or(pos + 1);
                    return Ok((out, next));
                }
                // len <= 63 because the two top bits are clear.
                debug_assert!(len <= MAX_LABEL_LEN);
                let label = msg
                    .get(pos + 1..pos + 1 + len)
                    .ok_or(ReadNameError::Truncated)?;
                push_label(&mut out, label);
                pos += 1 + len;
            }
            LABEL_KIND_POINTER => {
                let raw = read_u16(msg, pos).ok_or(ReadNameError::Truncated)?;
                let target = usize::from(raw & POINTER_OFFSET_MASK);
                if target >= msg.len() {
                    return Err(ReadNameError::Wire(WireError::PointerOutOfRange));
                }
                jumps += 1;
                if target >= run_start || jumps > MAX_POINTER_JUMPS {
                    return Err(ReadNameError::Wire(WireError::PointerLoop));
                }
                end.get_or_insert(pos + 2);
                pos = target;
                run_start = target;
            }
            _ => return Err(ReadNameError::Wire(WireError::LabelTooLong)),
        }
    }
}

/// Error of [`read_name`]: running out of bytes is told apart from a
/// malformed name so that a cut-off answer section is not a parse error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadNameError {
    /// The message ended inside the name.
    Truncated,
    /// The name is malformed.
    Wire(WireError),
}

impl From<ReadNameError> for WireError {
    fn from(e: ReadNameError) -> Self {
        match e {
            ReadNameError::Truncated => WireError::Truncated,
            ReadNameError::Wire(w) => w,
        }
    }
}

/// Parses a DNS response. Only the header, the single question and the
/// answer section are read; authority and additional sections are ignored.
/// A message cut inside the answer section yields the records before the cut
/// with [`Message::incomplete`] set; a malformed answer record stops the
/// answer section the same way (the records before it are kept).
pub fn parse_response(msg: &[u8]) -> Result<Message, WireError> {
    if msg.len() < HEADER_LEN {
        return Err(WireError::Truncated);
    }
    let id = read_u16(msg, 0).ok_or(WireError::Truncated)?;
    let flags = read_u16(msg, 2).ok_or(WireError::Truncated)?;
    let qdcount = read_u16(msg, 4).ok_or(WireError::Truncated)?;
    let ancount = read_u16(msg, 6).ok_or(WireError::Truncated)?;
    if flags & FLAG_QR == 0 {
        return Err(WireError::NotResponse);
    }
    if (flags >> OPCODE_SHIFT) & OPCODE_MASK != OPCODE_QUERY {
        return Err(WireError::NotQuery);
    }
    if qdcount != 1 {
        return Err(WireError::QuestionCount);
    }
    let (qname, mut pos) = read_name(msg, HEADER_LEN)?;
    let qtype = read_u16(msg, pos).ok_or(WireError::Truncated)?;
    let qclass = read_u16(msg, pos + 2).ok_or(WireError::Truncated)?;
    pos += QUESTION_FIXED_LEN;

    let mut message = Message {
        id,
        // Masked to 4 bits.
        rcode: (flags & RCODE_MASK) as u8,
        tc: flags & FLAG_TC != 0,
        incomplete: false,
        qname,
        qtype,
        qclass,
        answers: Vec::new(),
    };
    for _ in 0..usize::from(ancount).min(MAX_ANSWER_RECORDS) {
        match read_record(msg, pos) {
            Ok((record, next)) => {
                if let Some(r) = record {
                    message.answers.push(r);
                }
                pos = next;
            }
            Err(ReadNameError::Truncated) => {
                message.incomplete = true;
                break;
            }
            Err(ReadNameError::Wire(e)) => {
                // Records already read are well-formed; a later malformed
                // one only ends the section. A message whose first answer is
                // malformed is rejected so the reason is counted.
                if message.answers.is_empty() {
                    return Err(e);
                }
                message.incomplete = true;
                break;
            }
        }
    }
    Ok(message)
}

/// Reads one resource record at `pos`. Returns the record if it is a kept
/// type (class IN, A/AAAA/CNAME), and the position of the next record.
fn read_record(msg: &[u8], pos: usize) -> Result<(Option<Record>, usize), ReadNameError> {
    let (name, pos) = read_name(msg, pos)?;
    let rtype = read_u16(msg, pos).ok_or(ReadNameError::Truncated)?;
    let class = read_u16(msg, pos + 2).ok_or(ReadNameError::Truncated)?;
    let ttl = read_u32(msg, pos + 4).ok_or(ReadNameError::Truncated)?;
    let rdlen = usize::from(read_u16(msg, pos + 8).ok_or(ReadNameError::Truncated)?);
    let rdata_start = pos + RECORD_FIXED_LEN;
    let rdata_end = rdata_start + rdlen;
    let rdata = msg
        .get(rdata_start..rdata_end)
        .ok_or(ReadNameError::Truncated)?;
    if class != CLASS_IN {
        return Ok((None, rdata_end));
    }
    let data = match rtype {
        TYPE_A => {
            let b: [u8; 4] = rdata
                .try_into()
                .map_err(|_| ReadNameError::Wire(WireError::BadRecordLength))?;
            RecordData::A(Ipv4Addr::from(b))
        }
        TYPE_AAAA => {
            let b: [u8; 16] = rdata
                .try_into()
                .map_err(|_| ReadNameError::Wire(WireError::BadRecordLength))?;
            RecordData::Aaaa(Ipv6Addr::from(b))
        }
        TYPE_CNAME => {
            // The target may be compressed against the whole message; it
            // must end exactly at the end of rdata.
            let (target, after) = read_name(msg, rdata_start)?;
            if after != rdata_end {
                return Err(ReadNameError::Wire(WireError::BadRecordLength));
            }
            RecordData::Cname(target)
        }
        _ => return Ok((None, rdata_end)),
    };
    Ok((Some(Record { name, ttl, data }), rdata_end))
}
