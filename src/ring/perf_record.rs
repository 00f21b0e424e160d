//! Layout of the perf records sockscope asks the kernel for, and a parser
//! that never trusts the bytes.
//!
//! sample_type is [`SAMPLE_TYPE`] = `IDENTIFIER | TID | TIME | CPU | RAW`.
//! The kernel writes sample fields in a fixed order, so a
//! `PERF_RECORD_SAMPLE` body (after the 8-byte header) is:
//!
//! ```text
//! u64 id          PERF_SAMPLE_IDENTIFIER: first, at a fixed place
//! u32 pid, tid    PERF_SAMPLE_TID
//! u64 time        PERF_SAMPLE_TIME (on the clock chosen with use_clockid)
//! u32 cpu, res    PERF_SAMPLE_CPU
//! u32 size        PERF_SAMPLE_RAW, followed by `size` bytes; 4 + size is
//! u8  data[size]  a multiple of 8 (the kernel pads the tracepoint record)
//! ```
//!
//! IDENTIFIER rather than STREAM_ID: it carries the same value as
//! `PERF_EVENT_IOC_ID` for non-inherited events and sits at offset 0, so a
//! sample can be routed without knowing the rest of the layout.
//! `PERF_RECORD_LOST` is `u64 id, u64 lost` (no `sample_id_all`).

use perf_event_open_sys::bindings as pb;

/// `PERF_SAMPLE_*` bits of every event sockscope opens.
pub const SAMPLE_TYPE: u64 = (pb::PERF_SAMPLE_IDENTIFIER
    | pb::PERF_SAMPLE_TID
    | pb::PERF_SAMPLE_TIME
    | pb::PERF_SAMPLE_CPU
    | pb::PERF_SAMPLE_RAW) as u64;

/// `PERF_RECORD_SAMPLE`.
pub const RECORD_SAMPLE: u32 = pb::PERF_RECORD_SAMPLE;
/// `PERF_RECORD_LOST`.
pub const RECORD_LOST: u32 = pb::PERF_RECORD_LOST;
/// Size of `struct perf_event_header`.
pub const HEADER_SIZE: usize = 8;
/// Fixed part of a sample body before the raw data: id, pid/tid, time,
/// cpu/res, raw size.
pub const SAMPLE_FIXED: usize = 8 + 8 + 8 + 8 + 4;
/// Body size of a `PERF_RECORD_LOST` without sample_id_all.
pub const LOST_BODY: usize = 16;
/// Records are 8-byte aligned.
pub const RECORD_ALIGN: usize = 8;

/// `struct perf_event_header`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Record type (`PERF_RECORD_*`).
    pub kind: u32,
    /// `misc` bits.
    pub misc: u16,
    /// Total record size including the header.
    pub size: u16,
}

impl Header {
    /// Decodes the 8 header bytes.
    pub fn parse(b: [u8; HEADER_SIZE]) -> Header {
        Header {
            kind: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            misc: u16::from_ne_bytes([b[4], b[5]]),
            size: u16::from_ne_bytes([b[6], b[7]]),
        }
    }
}

/// The fields of one `PERF_RECORD_SAMPLE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample<'a> {
    /// Event id (as returned by `PERF_EVENT_IOC_ID`).
    pub id: u64,
    /// Process id.
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    /// Timestamp.
    pub time: u64,
    /// CPU.
    pub cpu: u32,
    /// Raw tracepoint record.
    pub raw: &'a [u8],
}

/// Why a record could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The body is shorter than the fixed fields.
    #[error("record body of {len} bytes is shorter than {need}")]
    Short {
        /// Body length.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// The raw size points past the end of the record.
    #[error("raw size {raw} exceeds the {avail} bytes left in the record")]
    RawOverflow {
        /// Declared raw size.
        raw: usize,
        /// Bytes available.
        avail: usize,
    },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_ne_bytes(v)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(v)
}

/// Parses a sample body (the record without its header).
pub fn parse_sample(body: &[u8]) -> Result<Sample<'_>, WireError> {
    if body.len() < SAMPLE_FIXED {
        return Err(WireError::Short {
            len: body.len(),
            need: SAMPLE_FIXED,
        });
    }
    let raw_len = u32_at(body, 32) as usize;
    let avail = body.len() - SAMPLE_FIXED;
    if raw_len > avail {
        return Err(WireError::RawOverflow {
            raw: raw_len,
            avail,
        });
    }
    Ok(Sample {
        id: u64_at(body, 0),
        pid: u32_at(body, 8),
        tid: u32_at(body, 12),
        time: u64_at(body, 16),
        cpu: u32_at(body, 24),
        raw: &body[SAMPLE_FIXED..SAMPLE_FIXED + raw_len],
    })
}

/// Parses a `PERF_RECORD_LOST` body into `(id, lost)`.
pub fn parse_lost(body: &[u8]) -> Result<(u64, u64), WireError> {
    if body.len() < LOST_BODY {
        return Err(WireError::Short {
            len: body.len(),
            need: LOST_BODY,
        });
    }
    Ok((u64_at(body, 0), u64_at(body, 8)))
}

fn push_header(out: &mut Vec<u8>, kind: u32, size: usize) {
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&0u16.to_ne_bytes());
    out.extend_from_slice(&(size.min(u16::MAX as usize) as u16).to_ne_bytes());
}

/// Appends a `PERF_RECORD_SAMPLE` as the kernel would write it (raw data
/// padded so the record stays 8-byte aligned). For tests and benchmarks.
pub fn encode_sample(out: &mut Vec<u8>, s: &Sample<'_>) {
    let pad = (RECORD_ALIGN - (4 + s.raw.len()) % RECORD_ALIGN) % RECORD_ALIGN;
    let raw_size = s.raw.len() + pad;
    let size = HEADER_SIZE + SAMPLE_FIXED + raw_size;
    push_header(out, RECORD_SAMPLE, size);
    out.extend_from_slice(&s.id.to_ne_bytes());
    out.extend_from_slice(&s.pid.to_ne_bytes());
    out.extend_from_slice(&s.tid.to_ne_bytes());
    out.extend_from_slice(&s.time.to_ne_bytes());
    out.extend_from_slice(&s.cpu.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&(raw_size as u32).to_ne_bytes());
    out.extend_from_slice(s.raw);
    out.extend(std::iter::repeat_n(0u8, pad));
}

/// Appends a `PERF_RECORD_LOST`. For tests and benchmarks.
pub fn encode_lost(out: &mut Vec<u8>, id: u64, lost: u64) {
    push_header(out, RECORD_LOST, HEADER_SIZE + LOST_BODY);
    out.extend_from_slice(&id.to_ne_bytes());
    out.extend_from_slice(&lost.to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_roundtrip_and_padding() {
        let raw = [1u8, 2, 3, 4, 5];
        let s = Sample {
            id: 77,
            pid: 10,
            tid: 11,
            time: 123_456,
            cpu: 3,
            raw: &raw,
        };
        let mut buf = Vec::new();
        encode_sample(&mut buf, &s);
        assert_eq!(buf.len() % RECORD_ALIGN, 0);
        let h = Header::parse(buf[..8].try_into().expect("8 bytes"));
        assert_eq!(h.kind, RECORD_SAMPLE);
        assert_eq!(h.size as usize, buf.len());
        let p = parse_sample(&buf[8..]).expect("parses");
        assert_eq!(
            (p.id, p.pid, p.tid, p.time, p.cpu),
            (77, 10, 11, 123_456, 3)
        );
        assert_eq!(&p.raw[..5], &raw);
        assert!(p.raw[5..].iter().all(|&b| b == 0));
    }

    #[test]
    fn truncated_and_overflowing_samples_are_errors() {
        let mut buf = Vec::new();
        encode_sample(
            &mut buf,
            &Sample {
                id: 1,
                pid: 1,
                tid: 1,
                time: 1,
                cpu: 0,
                raw: &[9; 12],
            },
        );
        let body = &buf[8..];
        assert!(matches!(
            parse_sample(&body[..20]),
            Err(WireError::Short { .. })
        ));
        assert!(matches!(
            parse_sample(&body[..body.len() - 8]),
            Err(WireError::RawOverflow { .. })
        ));
        assert!(parse_lost(&[0u8; 8]).is_err());
        let mut lost = Vec::new();
        encode_lost(&mut lost, 5, 42);
        assert_eq!(parse_lost(&lost[8..]), Ok((5, 42)));
    }
}
