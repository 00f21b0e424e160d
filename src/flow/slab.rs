//! A minimal slab: stable `u32` slots with a free list, so hot tables hold
//! small indices instead of keys and freed slots are reused without
//! allocation.
//!
//! Slots live in fixed chunks of [`CHUNK_SLOTS`], allocated as they are
//! needed: a growing table never copies what it holds, and what it has
//! allocated is at most one chunk more than its high-water mark (a doubling
//! vector would hold up to twice that). A slot's place in its chunk is a
//! mask of its index, so a lookup checks one bound, as a vector's does.

/// Slot index meaning "none".
pub(crate) const NIL: u32 = u32::MAX;
/// log2 of [`CHUNK_SLOTS`].
const CHUNK_SHIFT: u32 = 10;
/// Slots per chunk.
pub(crate) const CHUNK_SLOTS: usize = 1 << CHUNK_SHIFT;

#[derive(Debug)]
pub(crate) struct Slab<T> {
    /// Fixed-size chunks; slots below `high` have been handed out.
    chunks: Vec<Box<[Option<T>; CHUNK_SLOTS]>>,
    /// Slots handed out so far (the free list reuses them).
    high: usize,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            chunks: Vec::new(),
            high: 0,
            free: Vec::new(),
            len: 0,
        }
    }
}

/// The chunk and the position in it of slot `i`.
fn locate(i: u32) -> (usize, usize) {
    let i = i as usize;
    (i >> CHUNK_SHIFT, i & (CHUNK_SLOTS - 1))
}

impl<T> Slab<T> {
    /// Stores `v`; the returned slot is never [`NIL`] (tables are bounded
    /// far below `u32::MAX` entries by configuration).
    pub(crate) fn insert(&mut self, v: T) -> u32 {
        self.len += 1;
        if let Some(i) = self.free.pop() {
            let (c, j) = locate(i);
            self.chunks[c][j] = Some(v);
            return i;
        }
        if self.high == self.chunks.len() * CHUNK_SLOTS {
            self.chunks.push(empty_chunk());
        }
        let i = self.high;
        self.high += 1;
        let (c, j) = locate(u32::try_from(i).unwrap_or(NIL - 1));
        self.chunks[c][j] = Some(v);
        u32::try_from(i).unwrap_or(NIL - 1)
    }

    pub(crate) fn get(&self, i: u32) -> Option<&T> {
        let (c, j) = locate(i);
        self.chunks.get(c)?[j].as_ref()
    }

    pub(crate) fn get_mut(&mut self, i: u32) -> Option<&mut T> {
        let (c, j) = locate(i);
        self.chunks.get_mut(c)?[j].as_mut()
    }

    pub(crate) fn remove(&mut self, i: u32) -> Option<T> {
        let (c, j) = locate(i);
        let v = self.chunks.get_mut(c)?[j].take()?;
        self.free.push(i);
        self.len -= 1;
        Some(v)
    }

    /// Bytes held by the chunks, the chunk list and the free list.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.chunks.len() * std::mem::size_of::<[Option<T>; CHUNK_SLOTS]>()
            + self.chunks.capacity() * std::mem::size_of::<Box<[Option<T>; CHUNK_SLOTS]>>()
            + self.free.capacity() * std::mem::size_of::<u32>()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Occupied slots.
    pub(crate) fn slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.chunks
            .iter()
            .flat_map(|c| c.iter())
            .take(self.high)
            .enumerate()
            .filter(|(_, v)| v.is_some())
            .map(|(i, _)| u32::try_from(i).unwrap_or(NIL))
    }
}

/// A chunk of empty slots, built on the heap.
fn empty_chunk<T>() -> Box<[Option<T>; CHUNK_SLOTS]> {
    let v: Vec<Option<T>> = std::iter::repeat_with(|| None).take(CHUNK_SLOTS).collect();
    match v.into_boxed_slice().try_into() {
        Ok(b) => b,
        // The length is CHUNK_SLOTS by construction.
        Err(_) => unreachable!("a chunk has CHUNK_SLOTS slots"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_stable_across_chunks_and_reused_after_removal() {
        let mut s = Slab::default();
        let n = 3 * CHUNK_SLOTS + 7;
        let ids: Vec<u32> = (0..n).map(|i| s.insert(i)).collect();
        assert_eq!(ids, (0..n as u32).collect::<Vec<_>>());
        assert_eq!(s.len(), n);
        assert_eq!(s.get(CHUNK_SLOTS as u32), Some(&CHUNK_SLOTS));
        assert_eq!(s.get(n as u32), None);
        assert_eq!(s.get(NIL), None);
        assert_eq!(s.remove(5), Some(5));
        assert_eq!(s.remove(5), None);
        assert_eq!(s.get(5), None);
        *s.get_mut(CHUNK_SLOTS as u32 + 1).expect("slot") = 42;
        assert_eq!(s.insert(99), 5, "a freed slot is reused first");
        assert_eq!(s.get(5), Some(&99));
        assert_eq!(s.slots().count(), n);
        assert!(s.slots().all(|i| s.get(i).is_some()));
        // Four chunks allocated for 3 chunks and 7 slots, nothing more.
        let chunk = CHUNK_SLOTS * std::mem::size_of::<Option<usize>>();
        assert!(s.heap_bytes() >= 4 * chunk && s.heap_bytes() < 4 * chunk + 1024);
    }
}
