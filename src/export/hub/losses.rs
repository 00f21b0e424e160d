//! Loss notices of one stream: coalescing per (source, cpu), and the
//! mailbox that holds them while the stream's queue is full.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

use crate::export::convert;
use crate::export::proto;

use super::*;

/// Key of coalesced loss notices: protobuf source and CPU.
pub(super) type LossKey = (i32, Option<u32>);

/// Key of a stream's own queue drops.
pub(super) const SUBSCRIBER_QUEUE_KEY: LossKey = (proto::LossSource::SubscriberQueue as i32, None);

#[derive(Debug, Clone, Copy)]
pub(super) struct CoalescedLoss {
    pub(super) count: u64,
    pub(super) first: SystemTime,
    pub(super) last: SystemTime,
}

impl CoalescedLoss {
    /// A loss of `count` records at `at`.
    pub(super) fn at(count: u64, at: SystemTime) -> CoalescedLoss {
        CoalescedLoss {
            count,
            first: at,
            last: at,
        }
    }

    /// The notice of this loss under `key`.
    pub(super) fn notice(&self, key: LossKey) -> proto::LossNotice {
        proto::LossNotice {
            source: key.0,
            cpu: key.1,
            count: self.count,
            first: Some(convert::timestamp(self.first)),
            last: Some(convert::timestamp(self.last)),
        }
    }
}

/// Adds `loss` to the entry of `key`.
pub(super) fn merge_loss(
    map: &mut HashMap<LossKey, CoalescedLoss>,
    key: LossKey,
    loss: CoalescedLoss,
) {
    map.entry(key)
        .and_modify(|p| {
            p.count = p.count.saturating_add(loss.count);
            p.first = p.first.min(loss.first);
            p.last = p.last.max(loss.last);
        })
        .or_insert(loss);
}

/// Loss notices handed from the hub to one stream outside its bounded
/// queue, coalesced per key, so a full queue never loses a notice.
#[derive(Debug, Default)]
pub(super) struct LossMailbox {
    /// Set while `inner` holds notices; lets the stream skip the lock.
    pub(super) waiting: AtomicBool,
    pub(super) inner: Mutex<MailboxInner>,
}

#[derive(Debug, Default)]
pub(super) struct MailboxInner {
    pub(super) losses: HashMap<LossKey, CoalescedLoss>,
    /// When the oldest waiting notice was put.
    pub(super) since: Option<Instant>,
}

impl LossMailbox {
    pub(super) fn lock(&self) -> MutexGuard<'_, MailboxInner> {
        // The data stays consistent across a panic (plain counters).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn put(&self, key: LossKey, loss: CoalescedLoss) {
        let mut m = self.lock();
        merge_loss(&mut m.losses, key, loss);
        m.since.get_or_insert_with(Instant::now);
        self.waiting.store(true, Ordering::Release);
    }

    pub(super) fn is_waiting(&self) -> bool {
        self.waiting.load(Ordering::Acquire)
    }

    /// Whether the oldest waiting notice has waited a notice interval.
    pub(super) fn is_due(&self, now: Instant) -> bool {
        self.lock()
            .since
            .is_some_and(|t| now.duration_since(t) >= LOSS_NOTICE_INTERVAL)
    }

    /// Takes one waiting notice.
    pub(super) fn take(&self) -> Option<proto::LossNotice> {
        if !self.is_waiting() {
            return None;
        }
        let mut m = self.lock();
        let key = m.losses.keys().next().copied()?;
        let loss = m.losses.remove(&key)?;
        if m.losses.is_empty() {
            m.since = None;
            self.waiting.store(false, Ordering::Release);
        }
        Some(loss.notice(key))
    }
}
