//! Finding known values in raw memory dumps and intersecting candidate
//! offsets across repetitions. Pure functions over untrusted bytes.

use std::collections::{BTreeMap, BTreeSet};

/// Candidate offsets of one value in one dump.
pub type Offsets = BTreeSet<u32>;

/// Offsets (multiples of `align`) at which `pat` occurs in `buf`.
pub fn find_bytes(buf: &[u8], pat: &[u8], align: usize) -> Offsets {
    let mut out = Offsets::new();
    if pat.is_empty() || align == 0 || buf.len() < pat.len() {
        return out;
    }
    let mut at = 0;
    while at + pat.len() <= buf.len() {
        if buf.get(at..at + pat.len()) == Some(pat) {
            if let Ok(o) = u32::try_from(at) {
                out.insert(o);
            }
        }
        at += align;
    }
    out
}

/// Naturally aligned offsets of a little-endian u16.
pub fn find_u16(buf: &[u8], v: u16) -> Offsets {
    find_bytes(buf, &v.to_le_bytes(), 2)
}

/// Naturally aligned offsets of a little-endian u32.
pub fn find_u32(buf: &[u8], v: u32) -> Offsets {
    find_bytes(buf, &v.to_le_bytes(), 4)
}

/// Naturally aligned offsets of a little-endian u64.
pub fn find_u64(buf: &[u8], v: u64) -> Offsets {
    find_bytes(buf, &v.to_le_bytes(), 8)
}

/// Every byte offset of the u8 `v`.
pub fn find_u8(buf: &[u8], v: u8) -> Offsets {
    find_bytes(buf, &[v], 1)
}

/// Little-endian u16 at `at`, if in bounds.
pub fn u16_at(buf: &[u8], at: usize) -> Option<u16> {
    let b = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

/// Little-endian u32 at `at`, if in bounds.
pub fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Little-endian u64 at `at`, if in bounds.
pub fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    let b = buf.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_le_bytes(a))
}

/// Running intersection of candidate offsets per field.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Intersection {
    sets: BTreeMap<&'static str, Offsets>,
}

/// State of one field's candidates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Exactly one offset left.
    Unique(u32),
    /// No offset survived: the guess is wrong for this kernel.
    None,
    /// Several offsets left.
    Ambiguous(Vec<u32>),
    /// Never observed.
    Unseen,
}

impl Intersection {
    /// Intersects `field`'s candidates with `found` (the first observation
    /// initialises them).
    pub fn add(&mut self, field: &'static str, found: Offsets) {
        match self.sets.get_mut(field) {
            Some(cur) => cur.retain(|o| found.contains(o)),
            None => {
                self.sets.insert(field, found);
            }
        }
    }

    /// Drops `field`'s candidates in `[start, start + len)` (a value that
    /// the kernel also mirrors into another, already located field).
    pub fn remove_within(&mut self, field: &'static str, start: u32, len: u32) {
        if let Some(cur) = self.sets.get_mut(field) {
            cur.retain(|&o| o < start || o >= start.saturating_add(len));
        }
    }

    /// Current candidates of `field`.
    pub fn get(&self, field: &str) -> Option<&Offsets> {
        self.sets.get(field)
    }

    /// Where `field` stands.
    pub fn resolution(&self, field: &str) -> Resolution {
        match self.sets.get(field) {
            None => Resolution::Unseen,
            Some(s) if s.is_empty() => Resolution::None,
            Some(s) if s.len() == 1 => s
                .iter()
                .next()
                .copied()
                .map_or(Resolution::None, Resolution::Unique),
            Some(s) => Resolution::Ambiguous(s.iter().copied().collect()),
        }
    }

    /// True when every field in `fields` has exactly one candidate.
    pub fn all_unique(&self, fields: &[&'static str]) -> bool {
        fields
            .iter()
            .all(|f| matches!(self.resolution(f), Resolution::Unique(_)))
    }

    /// The first field in `fields` without candidates left.
    pub fn first_empty(&self, fields: &[&'static str]) -> Option<&'static str> {
        fields
            .iter()
            .copied()
            .find(|f| self.resolution(f) == Resolution::None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_aligned_values_only() {
        let mut buf = vec![0u8; 32];
        buf[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        buf[9..13].copy_from_slice(&0xdead_beefu32.to_le_bytes());
        buf[16..24].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(find_u32(&buf, 0xdead_beef), [4].into());
        assert_eq!(
            find_bytes(&buf, &0xdead_beefu32.to_le_bytes(), 1),
            [4, 9].into()
        );
        assert_eq!(find_u64(&buf, 0x1122_3344_5566_7788), [16].into());
        assert_eq!(find_u16(&buf, 0x7788), [16].into());
        assert!(find_u32(&buf[..6], 0xdead_beef).is_empty());
        assert!(find_bytes(&buf, &[], 1).is_empty());
        assert_eq!(u32_at(&buf, 4), Some(0xdead_beef));
        assert_eq!(u32_at(&buf, 30), None);
        assert_eq!(u64_at(&buf, usize::MAX), None);
    }

    #[test]
    fn intersection_narrows_to_the_true_offset() {
        // A struct with the field at 24; the other offsets hold the value
        // only by chance in one dump each.
        let mut x = Intersection::default();
        let mut state = 7u32;
        for rep in 0..6u32 {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let v = state | 1;
            let mut buf = vec![0u8; 64];
            buf[24..28].copy_from_slice(&v.to_le_bytes());
            let noise = 4 * (rep % 5) as usize;
            if noise != 24 {
                buf[noise..noise + 4].copy_from_slice(&v.to_le_bytes());
            }
            x.add("f", find_u32(&buf, v));
        }
        assert_eq!(x.resolution("f"), Resolution::Unique(24));
        assert!(x.all_unique(&["f"]));
        x.add("f", [8].into());
        assert_eq!(x.resolution("f"), Resolution::None);
        assert_eq!(x.first_empty(&["g", "f"]), Some("f"));
        assert_eq!(x.resolution("g"), Resolution::Unseen);
    }

    #[test]
    fn ambiguous_until_separated() {
        let mut x = Intersection::default();
        x.add("f", [0, 4, 8].into());
        assert_eq!(x.resolution("f"), Resolution::Ambiguous(vec![0, 4, 8]));
        x.add("f", [4, 8, 12].into());
        assert_eq!(x.resolution("f"), Resolution::Ambiguous(vec![4, 8]));
        x.add("f", [8].into());
        assert_eq!(x.resolution("f"), Resolution::Unique(8));
        x.add("g", [4, 60, 68].into());
        x.remove_within("g", 56, 16);
        assert_eq!(x.resolution("g"), Resolution::Unique(4));
    }
}
