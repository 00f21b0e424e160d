//! The reader thread: owns the per-CPU [`Rings`], decodes samples in
//! timestamp order and hands batches of [`Event`]s to the engine over a
//! bounded queue (`socket.perf_queue_size` samples), never blocking on it.
//! Ring loss notices go to the engine over their own bounded queue; what
//! does not fit in either queue is counted in [`PipelineState`].

use std::fs::File;
use std::io::BufWriter;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::{Duration, Instant};

use super::status::PipelineState;
use super::Pipeline;
use crate::decode::Decoder;
use crate::model::Event;
use crate::ring::recording::Recorder;
use crate::ring::{self, RingItem, Rings};
use crate::sys;

/// Events handed from the reader to the engine in one queue slot.
pub(super) const EVENT_BATCH: usize = 256;
/// How often the reader publishes its counters for status.
const STATS_PERIOD: Duration = Duration::from_secs(1);

/// Everything the reader thread owns.
pub(super) struct Reader {
    /// The opened rings; dropping them closes every perf fd.
    pub(super) rings: Rings,
    /// Decoder of the installed events' samples.
    pub(super) decoder: Decoder,
    /// Raw sample recording (`socket.record_path`), when configured.
    pub(super) recorder: Option<Recorder<BufWriter<File>>>,
    /// Batches of decoded events, to the engine.
    pub(super) event_tx: SyncSender<Vec<Event>>,
    /// Ring loss notices (CPU, samples lost), to the engine.
    pub(super) lost_tx: SyncSender<(u32, u64)>,
}

impl Reader {
    /// Reads the rings until the pipeline's stop flag, decoding samples into
    /// event batches.
    pub(super) fn run(self, pipeline: &Pipeline) -> Result<(), ring::RingError> {
        let Reader {
            mut rings,
            decoder,
            mut recorder,
            event_tx,
            lost_tx,
        } = self;
        let state: &PipelineState = &pipeline.state;
        let stop = &pipeline.stop;
        let mut batch: Vec<Event> = Vec::with_capacity(EVENT_BATCH);
        let mut last_stats = Instant::now();
        let send_batch = |batch: &mut Vec<Event>| {
            if batch.is_empty() {
                return;
            }
            let full = std::mem::replace(batch, Vec::with_capacity(EVENT_BATCH));
            let n = full.len() as u64;
            match event_tx.try_send(full) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    state.reader_queue_drops.fetch_add(n, Ordering::Relaxed);
                }
            }
        };
        let mut handle = |item: RingItem<'_>, batch: &mut Vec<Event>| {
            if let Some(rec) = recorder.as_mut() {
                if let Err(e) = rec.write(&item) {
                    tracing::error!("recording stopped: {e}");
                    recorder = None;
                }
            }
            match item {
                RingItem::Sample(s) => match decoder.decode(&s) {
                    Ok(Some(ev)) => {
                        batch.push(ev);
                        if batch.len() >= EVENT_BATCH {
                            send_batch(batch);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        state.decode_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!("decode: {e}");
                    }
                },
                RingItem::Lost { cpu, count } => {
                    if lost_tx.try_send((cpu, count)).is_err() {
                        state
                            .lost_queue_overflow
                            .fetch_add(count, Ordering::Relaxed);
                    }
                }
            }
        };
        let clockid = rings.clock().clockid();
        while !stop.load(Ordering::SeqCst) {
            // Every sample stamped before this bound is released by the pass
            // below (the pass reads the clock again, later). Without a
            // readable clock the engine's own clock is not bounded.
            let bound = match clockid {
                Some(c) => sys::clock_gettime_ns(c).map_or(0, |t| {
                    t.saturating_sub(ring::REORDER_SLACK.as_nanos() as u64)
                }),
                None => u64::MAX,
            };
            rings.read(ring::DEFAULT_POLL_TIMEOUT, &mut |item| {
                handle(item, &mut batch)
            })?;
            send_batch(&mut batch);
            state.released.store(bound, Ordering::Release);
            if last_stats.elapsed() >= STATS_PERIOD {
                last_stats = Instant::now();
                if let Ok(mut g) = state.ring.lock() {
                    *g = Some(rings.stats());
                }
            }
        }
        rings.flush(&mut |item| handle(item, &mut batch));
        send_batch(&mut batch);
        if let Ok(mut g) = state.ring.lock() {
            *g = Some(rings.stats());
        }
        if let Some(rec) = recorder.take() {
            if let Err(e) = rec.finish() {
                tracing::error!("finishing the recording: {e}");
            }
        }
        Ok(())
    }
}
