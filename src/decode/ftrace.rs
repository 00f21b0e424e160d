//! Splitting ftrace ring-buffer pages (`per_cpu/cpuN/trace_pipe_raw`) into
//! event records. The records have the same layout as perf raw samples, so
//! this is how fixtures are captured and how tracepoint decoding is tested
//! on a host without perf wiring.

/// Size of the page header on 64-bit kernels: u64 timestamp + u64 commit.
pub const PAGE_HEADER_LEN: usize = 16;
/// Bits of the commit word that hold the data length.
const COMMIT_LEN_MASK: u64 = (1 << 30) - 1;
/// Event header `type_len` meaning "length in the next word".
const TYPE_LEN_IN_ARRAY: u32 = 0;
/// Largest `type_len` of a data record (length = type_len * 4).
const TYPE_LEN_MAX_DATA: u32 = 28;
/// Padding record.
const TYPE_PADDING: u32 = 29;
/// Time extend and absolute time stamp records (8 bytes each).
const TYPE_TIME_EXTEND: u32 = 30;
const TYPE_TIME_STAMP: u32 = 31;
/// Bytes per length unit of `type_len`.
const WORD: usize = 4;

/// Data records of one ring-buffer page, in order. Malformed trailing bytes
/// end the walk (the page is untrusted input).
pub fn page_records(page: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let Some(commit) = page.get(8..PAGE_HEADER_LEN) else {
        return out;
    };
    let mut c = [0u8; 8];
    c.copy_from_slice(commit);
    let len = (u64::from_le_bytes(c) & COMMIT_LEN_MASK) as usize;
    let end = PAGE_HEADER_LEN.saturating_add(len).min(page.len());
    let mut pos = PAGE_HEADER_LEN;
    while pos + WORD <= end {
        let word = |at: usize| -> Option<u32> {
            let b = page.get(at..at + WORD)?;
            Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let Some(h) = word(pos) else { break };
        let type_len = h & 0x1f;
        let delta = h >> 5;
        let (data_start, data_len) = match type_len {
            TYPE_LEN_IN_ARRAY => {
                let Some(l) = word(pos + WORD) else { break };
                let l = (l as usize).saturating_sub(WORD);
                (pos + 2 * WORD, l.div_ceil(WORD) * WORD)
            }
            1..=TYPE_LEN_MAX_DATA => (pos + WORD, type_len as usize * WORD),
            TYPE_PADDING => {
                if delta == 0 {
                    break;
                }
                let Some(l) = word(pos + WORD) else { break };
                pos = pos.saturating_add(WORD + l as usize);
                continue;
            }
            TYPE_TIME_EXTEND | TYPE_TIME_STAMP => {
                pos += 2 * WORD;
                continue;
            }
            _ => break,
        };
        let Some(rec) = page.get(data_start..data_start.saturating_add(data_len)) else {
            break;
        };
        if data_start + data_len > end {
            break;
        }
        out.push(rec);
        pos = data_start + data_len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(events: &[&[u8]]) -> Vec<u8> {
        let mut body = Vec::new();
        for e in events {
            body.extend_from_slice(e);
        }
        let mut p = vec![0u8; 8];
        p.extend_from_slice(&(body.len() as u64).to_le_bytes());
        p.extend_from_slice(&body);
        p
    }

    #[test]
    fn walks_small_big_and_time_records() {
        // type_len 2 (8 bytes of data), delta 1.
        let mut a = ((1u32 << 5) | 2).to_le_bytes().to_vec();
        a.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        // time extend: 8 bytes.
        let mut t = (TYPE_TIME_EXTEND).to_le_bytes().to_vec();
        t.extend_from_slice(&[0, 0, 0, 0]);
        // type_len 0: length word 4 + 12 data bytes = 16.
        let mut b = 0u32.to_le_bytes().to_vec();
        b.extend_from_slice(&16u32.to_le_bytes());
        b.extend_from_slice(&[9; 12]);
        let p = page(&[&a, &t, &b]);
        let recs = page_records(&p);
        assert_eq!(recs, vec![&[1u8, 2, 3, 4, 5, 6, 7, 8][..], &[9u8; 12][..]]);
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed = 0x1234_5678u32;
        for n in 0..512 {
            let mut p = Vec::with_capacity(n);
            for _ in 0..n {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                p.push((seed >> 16) as u8);
            }
            let _ = page_records(&p);
        }
        assert!(page_records(&[]).is_empty());
    }
}
