//! The TCP sequence space of one side of a flow, as its counted packets
//! show it: how many payload bytes the sequence numbers cover, and how many
//! of those no counted packet carried.
//!
//! The kernel drops a kprobe hit that arrives while another handler runs
//! on the same CPU, so a flow can lose packet samples (told in-band as a
//! `kretprobe_miss` loss). Its counted packets and bytes are then short.
//! They are left as counted; the sequence numbers say by how much they are
//! short, for a consumer to check.
//!
//! State is a few integers per side: the end of the highest payload seen,
//! the bytes covered so far, and at most [`SEQ_GAPS`] gaps (sequence ranges
//! skipped by a packet that jumped ahead) remembered so that a later packet
//! (a retransmission after a real loss, a reordered segment) fills them
//! rather than showing as a shortfall. A gap that no longer fits is settled:
//! counted as not carried for good. All arithmetic on sequence numbers is
//! serial (RFC 1982, u32 wrapping), so wraparound is nothing special.

use crate::model::{SeqSpace, TcpSeq, TCP_FIN, TCP_RST, TCP_SYN};

/// Gaps remembered per side for later packets to fill. The oldest (the
/// lowest in sequence) is settled when a new one needs its slot: a gap a
/// retransmission fills is filled within a round trip, so the newest are
/// the ones worth keeping.
pub(super) const SEQ_GAPS: usize = 2;

/// The farthest a packet may reach past the highest sequence number seen,
/// and the largest payload one may carry, and still count: the largest TCP
/// window (65535 scaled by 2^14). A packet farther ahead is not of this
/// stream (a stale or forged segment: ingress packets are counted at
/// `ip_local_deliver`, before TCP checks their sequence numbers).
pub(super) const MAX_SEQ_ADVANCE: u32 = 65_535 << 14;

/// One side's sequence space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct SeqTrack {
    /// Payload bytes from the first payload byte seen to `high`.
    covered: u64,
    /// Bytes of gaps no longer remembered: not carried, for good.
    settled: u64,
    /// The end of the highest payload seen (the next byte expected).
    high: u32,
    /// Gaps below `high`, as (start, length); length 0 is a free slot.
    gaps: [(u32, u32); SEQ_GAPS],
    /// A packet with a sequence number was seen.
    seen: bool,
    /// `high` is where bytes end: a packet with payload, a SYN or a FIN
    /// was seen, not only bare ACKs.
    anchored: bool,
    /// The packet that anchored `high` was this side's SYN.
    from_syn: bool,
}

/// Position of `x` relative to `high`, in serial arithmetic: negative
/// below, positive above.
fn rel(x: u32, high: u32) -> i64 {
    i64::from(x.wrapping_sub(high) as i32)
}

impl SeqTrack {
    /// Adds a packet of this side with these flags and sequence figures.
    #[inline]
    pub(super) fn add(&mut self, flags: Option<u8>, s: TcpSeq) {
        let flags = flags.unwrap_or(0);
        if flags & TCP_RST != 0 || s.payload > MAX_SEQ_ADVANCE {
            // A reset's sequence number is not that of stream bytes; a
            // payload this large is no segment.
            return;
        }
        let syn = flags & TCP_SYN != 0;
        // The SYN takes the first number; the payload follows it. A FIN
        // takes the number after the payload, which is no payload.
        let start = s.seq.wrapping_add(u32::from(syn));
        let end = start.wrapping_add(s.payload);
        // A bare ACK carries no bytes, and its sequence number need not be
        // where bytes end: after a FIN it is one past it, a keepalive's is
        // one before.
        let bare = s.payload == 0 && flags & (TCP_SYN | TCP_FIN) == 0;
        if !self.anchored {
            self.seen = true;
            if !bare {
                self.anchored = true;
                self.from_syn = syn;
                self.high = end;
                self.covered = u64::from(s.payload);
            }
            return;
        }
        if bare {
            return;
        }
        let ahead = rel(end, self.high);
        if ahead > i64::from(MAX_SEQ_ADVANCE) {
            return;
        }
        let from = ahead - i64::from(s.payload);
        if ahead > 0 {
            if from > 0 {
                self.open_gap(self.high, from as u32);
            } else if self.has_gaps() {
                self.fill(from, 0);
            }
            self.covered += ahead as u64;
            self.high = end;
        } else if s.payload > 0 && self.has_gaps() {
            self.fill(from, ahead);
        }
    }

    fn has_gaps(&self) -> bool {
        self.gaps.iter().any(|g| g.1 != 0)
    }

    /// Remembers the gap of `len` bytes at `start`, settling the oldest
    /// when every slot is taken.
    fn open_gap(&mut self, start: u32, len: u32) {
        let high = self.high;
        let slot = match self.gaps.iter().position(|g| g.1 == 0) {
            Some(i) => i,
            None => {
                let mut oldest = 0;
                for (i, g) in self.gaps.iter().enumerate() {
                    if rel(g.0, high) < rel(self.gaps[oldest].0, high) {
                        oldest = i;
                    }
                }
                self.settled += u64::from(self.gaps[oldest].1);
                oldest
            }
        };
        self.gaps[slot] = (start, len);
    }

    /// Takes the bytes `from..to` (relative to `high`, both at or below it)
    /// out of the gaps they overlap: a counted packet carried them.
    fn fill(&mut self, from: i64, to: i64) {
        let high = self.high;
        let mut split = None;
        for g in self.gaps.iter_mut().filter(|g| g.1 != 0) {
            let gs = rel(g.0, high);
            let ge = gs + i64::from(g.1);
            let (lo, hi) = (from.max(gs), to.min(ge));
            if lo >= hi {
                continue;
            }
            let at = |x: i64| high.wrapping_add(x as u32);
            match (lo == gs, hi == ge) {
                (true, true) => *g = (0, 0),
                (true, false) => *g = (at(hi), (ge - hi) as u32),
                (false, true) => g.1 = (lo - gs) as u32,
                (false, false) => {
                    g.1 = (lo - gs) as u32;
                    split = Some((at(hi), (ge - hi) as u32));
                }
            }
        }
        if let Some((start, len)) = split {
            match self.gaps.iter().position(|g| g.1 == 0) {
                Some(i) => self.gaps[i] = (start, len),
                None => self.settled += u64::from(len),
            }
        }
    }

    /// The figures, when a packet with a sequence number was seen.
    pub(super) fn space(&self) -> Option<SeqSpace> {
        self.seen.then(|| SeqSpace {
            payload_bytes: self.covered,
            uncounted_bytes: self.settled + self.gaps.iter().map(|g| u64::from(g.1)).sum::<u64>(),
            from_syn: self.from_syn,
        })
    }
}
