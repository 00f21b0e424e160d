//! A minimal slab: stable `u32` slots with a free list, so hot tables hold
//! small indices instead of keys and freed slots are reused without
//! allocation.
//!
//! Slots live in fixed chunks of [`CHUNK_SLOTS`], allocated as they are
//! needed: a growing table never copies what it holds, and what it has
//! allocated is at most one chunk more than its high-water mark (a doubling
//! vector would hold up to twice that).

/// Slot index meaning "none".
pub(crate) const NIL: u32 = u32::MAX;
/// log2 of [`CHUNK_SLOTS`].
const CHUNK_SHIFT: u32 = 10;
/// Slots per chunk.
pub(crate) const CHUNK_SLOTS: usize = 1 << CHUNK_SHIFT;

#[derive(Debug)]
pub(crate) struct Slab<T> {
    /// Every chunk but the last is full ([`CHUNK_SLOTS`] slots).
    chunks: Vec<Vec<Option<T>>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            chunks: Vec::new(),
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
        if self.chunks.last().is_none_or(|c| c.len() == CHUNK_SLOTS) {
            self.chunks.push(Vec::with_capacity(CHUNK_SLOTS));
        }
        let full = (self.chunks.len() - 1) * CHUNK_SLOTS;
        let Some(last) = self.chunks.last_mut() else {
            return NIL - 1;
        };
        last.push(Some(v));
        u32::try_from(full + last.len() - 1).unwrap_or(NIL - 1)
    }

    pub(crate) fn get(&self, i: u32) -> Option<&T> {
        let (c, j) = locate(i);
        self.chunks.get(c)?.get(j)?.as_ref()
    }

    pub(crate) fn get_mut(&mut self, i: u32) -> Option<&mut T> {
        let (c, j) = locate(i);
        self.chunks.get_mut(c)?.get_mut(j)?.as_mut()
    }

    pub(crate) fn remove(&mut self, i: u32) -> Option<T> {
        let (c, j) = locate(i);
        let v = self.chunks.get_mut(c)?.get_mut(j).and_then(Option::take)?;
        self.free.push(i);
        self.len -= 1;
        Some(v)
    }

    /// Bytes held by the chunks, the chunk list and the free list.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.chunks
            .iter()
            .map(|c| c.capacity() * std::mem::size_of::<Option<T>>())
            .sum::<usize>()
            + self.chunks.capacity() * std::mem::size_of::<Vec<Option<T>>>()
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
            .enumerate()
            .filter(|(_, v)| v.is_some())
            .map(|(i, _)| u32::try_from(i).unwrap_or(NIL))
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
