//! A minimal slab: stable `u32` slots with a free list, so hot tables hold
//! small indices instead of keys and freed slots are reused without
//! allocation.

/// Slot index meaning "none".
pub(crate) const NIL: u32 = u32::MAX;

#[derive(Debug)]
pub(crate) struct Slab<T> {
    items: Vec<Option<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            items: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    pub(crate) fn with_capacity(n: usize) -> Self {
        Slab {
            items: Vec::with_capacity(n),
            free: Vec::new(),
            len: 0,
        }
    }

    /// Stores `v`; the returned slot is never [`NIL`] (tables are bounded
    /// far below `u32::MAX` entries by configuration).
    pub(crate) fn insert(&mut self, v: T) -> u32 {
        self.len += 1;
        if let Some(i) = self.free.pop() {
            self.items[i as usize] = Some(v);
            i
        } else {
            self.items.push(Some(v));
            u32::try_from(self.items.len() - 1).unwrap_or(NIL - 1)
        }
    }

    pub(crate) fn get(&self, i: u32) -> Option<&T> {
        self.items.get(i as usize).and_then(Option::as_ref)
    }

    pub(crate) fn get_mut(&mut self, i: u32) -> Option<&mut T> {
        self.items.get_mut(i as usize).and_then(Option::as_mut)
    }

    pub(crate) fn remove(&mut self, i: u32) -> Option<T> {
        let v = self.items.get_mut(i as usize).and_then(Option::take)?;
        self.free.push(i);
        self.len -= 1;
        Some(v)
    }

    /// Bytes held by the slot array and free list.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.items.capacity() * std::mem::size_of::<Option<T>>()
            + self.free.capacity() * std::mem::size_of::<u32>()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Occupied slots.
    pub(crate) fn slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.items
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_some())
            .map(|(i, _)| u32::try_from(i).unwrap_or(NIL))
    }
}
