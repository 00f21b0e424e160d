//! The AF_PACKET capture: socket setup and the receive loop that runs on
//! its own thread and feeds a bounded channel.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::bpf::filter_program;
use super::datagram::{decode_packet, DropReason};
use super::{DnsError, DnsResponse};
use crate::config::DnsConfig;
use crate::sys::packet::{interface_index, Framing, PacketSocket};

/// The only supported `socket.dns.type`.
pub const CAPTURE_TYPE_AF_PACKET: &str = "af_packet";
/// Smallest accepted snap length: IPv6 + UDP + DNS headers and a short
/// question.
pub const MIN_SNAPLEN: u32 = 128;
/// Largest accepted snap length (largest UDP datagram).
pub const MAX_SNAPLEN: u32 = 65_535;
/// How long one receive waits before the loop checks for a stop request.
pub const RECV_TIMEOUT: Duration = Duration::from_millis(200);
/// How often the kernel's drop counters are read.
pub const KERNEL_STATS_INTERVAL: Duration = Duration::from_secs(1);
/// Socket receive buffer requested (the kernel caps it at rmem_max).
pub const RECV_BUFFER_BYTES: usize = 4 << 20;
/// Default length of the channel to the flow engine.
pub const DEFAULT_QUEUE_LEN: usize = 4096;
/// Name of the capture thread.
const THREAD_NAME: &str = "dns-capture";
/// Bytes received beyond the snap length, so a packet longer than the
/// filter's cut is noticed.
const BUFFER_SLACK: usize = 64;
/// ETH_P_ALL in host order.
const ETH_P_ALL: u16 = libc::ETH_P_ALL as u16;

/// Capture-side counters, shared between the capture thread and readers.
#[derive(Debug, Default)]
pub struct CaptureCounters {
    packets_seen: AtomicU64,
    responses_parsed: AtomicU64,
    responses_truncated: AtomicU64,
    queue_drops: AtomicU64,
    kernel_packets: AtomicU64,
    kernel_drops: AtomicU64,
    dropped: [AtomicU64; DropReason::COUNT],
}

/// A snapshot of [`CaptureCounters`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CaptureStats {
    /// Packets delivered by the kernel filter and read.
    pub packets_seen: u64,
    /// DNS responses decoded.
    pub responses_parsed: u64,
    /// Of those, responses that were cut (TC flag, snap length, malformed
    /// tail).
    pub responses_truncated: u64,
    /// Responses dropped because the channel to the flow engine was full.
    pub queue_drops: u64,
    /// Packets the kernel accepted for the socket (PACKET_STATISTICS).
    pub kernel_packets: u64,
    /// Packets the kernel dropped because the socket queue was full.
    pub kernel_drops: u64,
    /// Packets not decoded, by reason (every reason listed, zeros included).
    pub dropped: Vec<(DropReason, u64)>,
}

impl CaptureStats {
    /// Packets not decoded, all reasons together.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().map(|(_, n)| n).sum()
    }

    /// The count for one reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }
}

impl CaptureCounters {
    /// Current values.
    pub fn snapshot(&self) -> CaptureStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CaptureStats {
            packets_seen: load(&self.packets_seen),
            responses_parsed: load(&self.responses_parsed),
            responses_truncated: load(&self.responses_truncated),
            queue_drops: load(&self.queue_drops),
            kernel_packets: load(&self.kernel_packets),
            kernel_drops: load(&self.kernel_drops),
            dropped: DropReason::ALL
                .iter()
                .map(|r| (*r, load(&self.dropped[r.index()])))
                .collect(),
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// An open DNS capture socket.
#[derive(Debug)]
pub struct DnsCapture {
    socket: PacketSocket,
    interface: String,
    buf: Vec<u8>,
    counters: Arc<CaptureCounters>,
    last_kernel_stats: Instant,
}

impl DnsCapture {
    /// Opens the capture described by `socket.dns`, or returns `None` when
    /// `socket.dns.enabled` is false.
    pub fn open_if_enabled(cfg: &DnsConfig) -> Result<Option<Self>, DnsError> {
        if !cfg.enabled {
            return Ok(None);
        }
        Self::open(cfg).map(Some)
    }

    /// Opens a cooked (`SOCK_DGRAM`) AF_PACKET socket, attaches the DNS
    /// filter and only then binds it to `socket.dns.af_packet.interface`
    /// (`any` = every interface), so no unfiltered packet is ever queued.
    /// Ignores `socket.dns.enabled` (see [`DnsCapture::open_if_enabled`]).
    pub fn open(cfg: &DnsConfig) -> Result<Self, DnsError> {
        if cfg.kind != CAPTURE_TYPE_AF_PACKET {
            return Err(DnsError::UnsupportedType {
                kind: cfg.kind.clone(),
            });
        }
        let snaplen = cfg.af_packet.snaplen;
        if !(MIN_SNAPLEN..=MAX_SNAPLEN).contains(&snaplen) {
            return Err(DnsError::Snaplen {
                snaplen,
                min: MIN_SNAPLEN,
                max: MAX_SNAPLEN,
            });
        }
        let interface = cfg.af_packet.interface.clone();
        let wrap = |source| DnsError::Socket {
            interface: interface.clone(),
            source,
        };
        let ifindex = interface_index(&interface).map_err(wrap)?;
        let socket = PacketSocket::open(Framing::Cooked).map_err(wrap)?;
        socket
            .attach_filter(&filter_program(snaplen))
            .map_err(wrap)?;
        // A smaller buffer than asked for is not fatal; drops are counted.
        if let Err(e) = socket.set_recv_buffer(RECV_BUFFER_BYTES) {
            tracing::warn!(error = %e, "DNS capture: could not enlarge the receive buffer");
        }
        socket.set_recv_timeout(RECV_TIMEOUT).map_err(wrap)?;
        socket.bind(ifindex, ETH_P_ALL).map_err(wrap)?;
        // snaplen <= MAX_SNAPLEN, so this fits.
        let buf = vec![0u8; snaplen as usize + BUFFER_SLACK];
        Ok(DnsCapture {
            socket,
            interface,
            buf,
            counters: Arc::new(CaptureCounters::default()),
            last_kernel_stats: Instant::now(),
        })
    }

    /// The counters, for the status API.
    pub fn counters(&self) -> Arc<CaptureCounters> {
        Arc::clone(&self.counters)
    }

    /// Waits up to [`RECV_TIMEOUT`] for one packet and decodes it. Returns
    /// `Ok(None)` on timeout or when the packet was not a usable response
    /// (counted by reason). Also refreshes the kernel counters every
    /// [`KERNEL_STATS_INTERVAL`].
    pub fn next_response(&mut self) -> Result<Option<DnsResponse>, DnsError> {
        if self.last_kernel_stats.elapsed() >= KERNEL_STATS_INTERVAL {
            self.refresh_kernel_stats()?;
        }
        let received = self
            .socket
            .recv(&mut self.buf)
            .map_err(|source| DnsError::Socket {
                interface: self.interface.clone(),
                source,
            })?;
        let Some(received) = received else {
            return Ok(None);
        };
        let c = &self.counters;
        CaptureCounters::add(&c.packets_seen, 1);
        let data = self.buf.get(..received.captured).unwrap_or(&[]);
        match decode_packet(received.protocol, received.pkttype, data) {
            Ok(mut response) => {
                response.truncated |= received.len > received.captured;
                CaptureCounters::add(&c.responses_parsed, 1);
                if response.truncated {
                    CaptureCounters::add(&c.responses_truncated, 1);
                }
                Ok(Some(response))
            }
            Err(reason) => {
                CaptureCounters::add(&c.dropped[reason.index()], 1);
                Ok(None)
            }
        }
    }

    /// Reads the kernel's packet/drop counters (which reset on read) and
    /// adds them to the totals.
    pub fn refresh_kernel_stats(&mut self) -> Result<(), DnsError> {
        self.last_kernel_stats = Instant::now();
        let s = self
            .socket
            .statistics()
            .map_err(|source| DnsError::Socket {
                interface: self.interface.clone(),
                source,
            })?;
        CaptureCounters::add(&self.counters.kernel_packets, s.packets);
        CaptureCounters::add(&self.counters.kernel_drops, s.drops);
        Ok(())
    }

    /// The capture loop: receives until `stop` is set or the receiver is
    /// gone, handing responses to `tx` without ever blocking on it (a full
    /// channel drops the response and counts it).
    pub fn run(mut self, tx: &SyncSender<DnsResponse>, stop: &AtomicBool) -> Result<(), DnsError> {
        while !stop.load(Ordering::Relaxed) {
            let Some(response) = self.next_response()? else {
                continue;
            };
            match tx.try_send(response) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => CaptureCounters::add(&self.counters.queue_drops, 1),
                Err(TrySendError::Disconnected(_)) => break,
            }
        }
        self.refresh_kernel_stats()
    }

    /// Starts [`DnsCapture::run`] on its own thread with a channel of
    /// `queue_len` responses. The flow engine drains the receiver with
    /// `try_recv` between events.
    pub fn spawn(
        self,
        queue_len: usize,
    ) -> Result<(DnsCaptureThread, Receiver<DnsResponse>), DnsError> {
        let (tx, rx) = sync_channel(queue_len.max(1));
        let stop = Arc::new(AtomicBool::new(false));
        let counters = self.counters();
        let thread_stop = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name(THREAD_NAME.to_string())
            .spawn(move || self.run(&tx, &thread_stop))
            .map_err(DnsError::Thread)?;
        Ok((
            DnsCaptureThread {
                stop,
                handle: Some(handle),
                counters,
            },
            rx,
        ))
    }
}

/// A running capture thread. Dropping it stops and joins the thread.
#[derive(Debug)]
pub struct DnsCaptureThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<(), DnsError>>>,
    counters: Arc<CaptureCounters>,
}

impl DnsCaptureThread {
    /// The capture's counters.
    pub fn counters(&self) -> &Arc<CaptureCounters> {
        &self.counters
    }

    /// True once the thread has ended (stopped, or failed: see
    /// [`DnsCaptureThread::stop`] for its result).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the loop (within [`RECV_TIMEOUT`]) and returns its result.
    pub fn stop(mut self) -> Result<(), DnsError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<(), DnsError> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take() {
            Some(h) => h.join().unwrap_or_else(|_| {
                Err(DnsError::Thread(std::io::Error::other(
                    "DNS capture thread panicked",
                )))
            }),
            None => Ok(()),
        }
    }
}

impl Drop for DnsCaptureThread {
    fn drop(&mut self) {
        if let Err(e) = self.stop_and_join() {
            tracing::warn!(error = %e, "DNS capture thread ended with an error");
        }
    }
}
