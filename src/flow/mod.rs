//! Pipeline stage: flow — the socket/flow state machine and its expiry.
//!
//! [`Engine::handle`] takes decoded [`Event`]s in timestamp order and
//! [`Engine::tick`] advances time; both append [`Output`]s (flow records and
//! loss notices). The engine is pure: no I/O except through the process
//! table's [`ProcSource`](crate::enrich::process::ProcSource), and time is
//! only what the events and ticks say, converted to wall time by an injected
//! [`Clock`].
//!
//! # Sockets and flows
//!
//! Sockets are keyed by their kernel `struct sock` address. A TCP socket has
//! one flow (its 4-tuple); an unconnected UDP socket has one flow per remote
//! endpoint. A `SockCreate`, `TcpConnect` or `TcpAccept` at an address whose
//! old socket is still tracked and closed, already connected, or of the other
//! transport ends the old socket (its flows are emitted as final records);
//! sockets at a reused address are never merged. The same holds for a
//! `SockActivity` on a closed socket, and for a packet whose socket is known
//! with a different TCP 4-tuple or transport (events were lost in between).
//! A closed TCP socket still in its termination wait is not ended by the
//! reuse but retired: the new socket takes the address, the old flows keep
//! their 4-tuple and count late packets until the wait ends (the kernel
//! reuses a socket's memory as soon as a closing connection turns into a
//! TIME_WAIT mini-socket, while its last ACK is still to be sent).
//!
//! # Packets
//!
//! A "packet" is one `sk_buff` as the IP layer sees it: what `tcpdump` on
//! this host shows. With TSO/GSO one egress packet may leave the NIC as
//! several wire packets, and with GRO several wire packets arrive as one;
//! bytes are the IP length of that buffer (IP + transport headers +
//! payload), so byte counts match the wire up to the headers of the
//! segments the offload merged or split. Local endpoint counters are what
//! the local socket sent (egress), remote ones what it received (ingress).
//!
//! Lookup of a TCP packet: the oriented 4-tuple index (local = source for
//! egress, destination for ingress) first. On a miss, a packet whose socket
//! is known to carry data (a send or receive was seen on it) and is not
//! closed binds the tuple to that socket (a lost connect: direction unknown,
//! incomplete); a closed socket's address on a new tuple is a reused one,
//! ending the closed socket. Anything
//! else — handshake packets before `accept` returns, SYN-ACKs sent with a
//! request sock, packets of sockets we never saw — is counted in a small,
//! bounded *embryonic* table keyed by 4-tuple. `TcpConnect`/`TcpAccept` claim
//! the entry of their tuple and merge its counters (and its earlier start)
//! into the new flow. An unclaimed entry lives `flow_termination_timeout`;
//! then, if its packets carried a socket we never saw (the daemon started
//! while the connection was open) or a known socket that carries data, it
//! becomes that socket's flow (direction unknown, incomplete), otherwise it
//! is dropped and counted (`embryonic_expired`). When the table is full new
//! tuples are not tracked (`embryonic_dropped`).
//!
//! A UDP packet is looked up by its socket and remote endpoint. Received
//! datagrams normally carry their socket (the delivery probe `udp_in`
//! sees the socket they are queued on). An ingress packet without a
//! socket (recordings of probe sets without `udp_in`) is matched through
//! the local (address, port)
//! index of known UDP sockets, then by port alone (sockets bound to a
//! wildcard address). With no match it is *parked*: counted per (local,
//! remote) endpoint pair in a bounded table, until a socket's local endpoint
//! becomes known (its first `UdpRecv`, or a packet it sends from that
//! endpoint) and claims the pairs it receives for, or until
//! `flow_inactive_timeout` passes without a datagram to that port; then its
//! datagrams are counted as `unmatched_packets` (also when the table is
//! full). So datagrams queued for a receive-only socket before its first
//! `recvfrom` (or before the daemon started) land on its flows. A packet of
//! a socket never seen creates the socket.
//!
//! IPv4 addresses are kept as IPv4-mapped IPv6 internally, so a dual-stack
//! socket talking to `::ffff:a.b.c.d` matches the IPv4 packets it produces;
//! records show such addresses as IPv4.
//!
//! # Direction, completeness, ownership
//!
//! `direction` is egress for `TcpConnect` and for a UDP flow whose first
//! packet was sent, ingress for `TcpAccept` and a UDP flow whose first packet
//! was received, unknown when the socket's start was not observed.
//! `complete` means the flow's start was observed: connect/accept for TCP;
//! for UDP, the socket's creation (so every later peer's first packet is
//! seen). A TCP flow that ended by inactivity and resumes becomes a new flow
//! with the socket's direction, incomplete.
//!
//! A socket's owner is the process of the last syscall-context event on it
//! (`SockCreate`, `TcpConnect`, `TcpAccept`, `SockActivity`, `SockClose`
//! with a task); events without a task (packets) never attribute. A flow
//! keeps the first owner it was attributed to (a snapshot of the process at
//! that moment, immune to pid reuse); new flows take the socket's latest
//! owner. Flows owned by the daemon's own pid are tracked but not reported
//! unless `include_self`; so are TCP flows without an owner whose local
//! port is one the daemon listens on (`own_tcp_ports`: a connection to the
//! daemon whose handshake was seen but no syscall on it yet).
//!
//! # Expiry and records
//!
//! A flow becomes final after `flow_inactive_timeout` without packets, or
//! `flow_termination_timeout` after its socket's close (late packets in
//! between still count). A socket without activity for
//! `socket_inactive_timeout` is dropped (its flows, if any, become final).
//! Every `flow_update_interval` (0 disables) a flow that changed since its
//! last record emits an interim record (`is_final == false`) with cumulative
//! counters and the same id. Timers live in binary heaps with lazy
//! invalidation: a flow's single pending deadline is re-checked when it comes
//! due, so expiry work is proportional to what comes due, never a scan.
//!
//! Tables are bounded (`limits.*`). A full flow table evicts the flow with
//! the earliest deadline that was not active since it was scheduled (second
//! chance, a few probes); a full socket table evicts the socket with the
//! earliest deadline; the process table evicts exited, then oldest entries.
//! Evicted flows are emitted as final records, and each eviction is counted
//! in a [`Loss`] of its own source, coalesced and emitted at the next tick.
//!
//! # DNS names
//!
//! With a [`DnsTable`] attached ([`Engine::with_dns`]), responses handed to
//! [`Engine::observe_dns`] are correlated with the processes that asked:
//! an egress UDP packet to port 53 claims its source endpoint for the
//! owner of its socket ([`DnsTable::claim`]); the claim is released when
//! the socket ends (after `flow_termination_timeout`, so a response
//! that reaches the engine after the close is still attributed). A flow
//! looks up its remote address for its owner when it is created, and again
//! when a record is produced while it has no name yet (the response may
//! reach the engine after the connection's first events); the name found
//! is kept for all later records as `remote.domain`. Only answers the
//! owning process (or an ancestor it forked from) received count: the
//! table's host-wide fallback is not used, so a process that connects to
//! an address without resolving it gets no name. Forks copy the parent's
//! answers; a process's answers are dropped `flow_termination_timeout` +
//! [`DNS_EXIT_SLACK`] after its exit (a new process with the same pid drops
//! them at once); the table expires entries at every tick.

mod slab;
#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hashbrown::HashMap;

use crate::config::Config;
use crate::enrich::community_id::community_id;
use crate::enrich::dns::{DnsResponse, DnsTable, MatchSource, TableStats};
use crate::enrich::process::ProcessTable;
use crate::model::{
    Endpoint, Event, EventKind, FlowDirection, FlowRecord, KernelTime, Loss, LossSource, Output,
    Packet, PacketDir, ProcessInfo, SockAddr, SockOp, Task, Transport,
};
use slab::{Slab, NIL};

/// Kernel time to wall time conversion, injected into the engine.
pub trait Clock {
    /// Wall time of a kernel timestamp.
    fn wall(&self, t: KernelTime) -> SystemTime;
}

/// A [`Clock`] with a fixed offset: `wall(t) = base + t ns`.
#[derive(Debug, Clone, Copy)]
pub struct OffsetClock {
    /// Wall time of kernel time 0.
    pub base: SystemTime,
}

impl Clock for OffsetClock {
    fn wall(&self, t: KernelTime) -> SystemTime {
        self.base + Duration::from_nanos(t)
    }
}

/// Largest accepted table bound (slots are `u32`).
pub const MAX_TABLE_BOUND: usize = 1 << 30;
/// Default bound of the embryonic table.
pub const DEFAULT_MAX_EMBRYONIC: usize = 16_384;
/// Default bound of the table of parked UDP endpoint pairs.
pub const DEFAULT_MAX_PARKED_UDP: usize = 4_096;
/// A timer heap is compacted when it holds more than this many entries per
/// live flow (plus [`HEAP_SLACK_MIN`]).
const HEAP_SLACK_FACTOR: usize = 3;
/// Entries a timer heap may hold beyond the slack factor before compaction.
const HEAP_SLACK_MIN: usize = 4096;
/// Events per group in [`Engine::handle_batch`].
const BATCH: usize = 16;
/// How many live candidates a flow eviction examines before taking one.
const EVICTION_PROBES: usize = 8;
/// UDP port whose egress packets mark a DNS client endpoint.
pub const DNS_PORT: u16 = 53;
/// Added to `flow_termination_timeout` before an exited process's DNS
/// answers are dropped, so the final records of its last flows (emitted
/// that long after the close) can still be named.
pub const DNS_EXIT_SLACK: Duration = Duration::from_secs(2);

/// Timing, bounds and identity the engine runs with.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Inactivity after which a flow is final.
    pub flow_inactive_timeout: Duration,
    /// Wait after close for late packets.
    pub flow_termination_timeout: Duration,
    /// Inactivity after which a socket is dropped.
    pub socket_inactive_timeout: Duration,
    /// Interval of interim records; zero disables them.
    pub flow_update_interval: Duration,
    /// Most tracked sockets.
    pub max_sockets: usize,
    /// Most tracked flows.
    pub max_flows: usize,
    /// Most tracked embryonic TCP tuples.
    pub max_embryonic: usize,
    /// Most parked UDP (local, remote) endpoint pairs.
    pub max_parked_udp: usize,
    /// Report flows of the daemon's own process.
    pub include_self: bool,
    /// The daemon's pid.
    pub own_pid: u32,
    /// Local TCP ports the daemon listens on (gRPC, health, metrics).
    pub own_tcp_ports: Vec<u16>,
}

impl EngineConfig {
    /// From the daemon configuration.
    pub fn from_config(cfg: &Config, own_pid: u32) -> Self {
        let s = &cfg.socket;
        EngineConfig {
            flow_inactive_timeout: s.flow_inactive_timeout,
            flow_termination_timeout: s.flow_termination_timeout,
            socket_inactive_timeout: s.socket_inactive_timeout,
            flow_update_interval: s.flow_update_interval,
            max_sockets: cfg.limits.max_sockets,
            max_flows: cfg.limits.max_flows,
            max_embryonic: DEFAULT_MAX_EMBRYONIC.min(cfg.limits.max_flows.max(1)),
            max_parked_udp: DEFAULT_MAX_PARKED_UDP.min(cfg.limits.max_flows.max(1)),
            include_self: s.include_self,
            own_pid,
            own_tcp_ports: own_tcp_ports(cfg),
        }
    }
}

/// The ports of the daemon's TCP listeners in `cfg` (unparsable or empty
/// addresses, already refused by validation, are skipped).
fn own_tcp_ports(cfg: &Config) -> Vec<u16> {
    let mut ports: Vec<u16> = [
        &cfg.server.listen,
        &cfg.server.health_listen,
        &cfg.metrics.listen,
    ]
    .iter()
    .filter_map(|a| a.trim().parse::<SocketAddr>().ok())
    .map(|a| a.port())
    .filter(|&p| p != 0)
    .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig::from_config(&Config::default(), std::process::id())
    }
}

/// Snapshot of the engine's tables and counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Tracked sockets.
    pub sockets: usize,
    /// Live flows.
    pub flows: usize,
    /// Embryonic TCP tuples.
    pub embryonic: usize,
    /// Process table entries.
    pub processes: usize,
    /// Pending timer entries (including stale ones).
    pub timers: usize,
    /// Flows created.
    pub flows_created: u64,
    /// Final records emitted.
    pub final_records: u64,
    /// Interim records emitted.
    pub interim_records: u64,
    /// Records withheld because the daemon owns the flow.
    pub self_suppressed: u64,
    /// Sockets evicted from the full table.
    pub socket_evictions: u64,
    /// Flows evicted from the full table.
    pub flow_evictions: u64,
    /// Processes evicted from the full table.
    pub process_evictions: u64,
    /// Sockets dropped by `socket_inactive_timeout`.
    pub sockets_expired: u64,
    /// Sockets ended because their address was reused.
    pub socket_reuses: u64,
    /// Embryonic entries merged into a flow by connect/accept.
    pub embryonic_claimed: u64,
    /// Embryonic entries turned into flows of unseen sockets at expiry.
    pub embryonic_promoted: u64,
    /// Embryonic entries dropped unclaimed.
    pub embryonic_expired: u64,
    /// TCP tuples not tracked because the embryonic table was full.
    pub embryonic_dropped: u64,
    /// Packets that matched no socket.
    pub unmatched_packets: u64,
    /// Parked UDP endpoint pairs (datagrams waiting for their socket).
    pub parked_udp: usize,
    /// Parked UDP endpoint pairs a socket claimed.
    pub parked_udp_claimed: u64,
    /// Events ignored as meaningless (e.g. close of an unknown socket).
    pub ignored_events: u64,
}

/// An endpoint key: IPv4 stored IPv4-mapped. Byte arrays keep the key
/// unaligned and small (18 bytes), which matters for the tuple index's
/// cache footprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Ep {
    ip: [u8; 16],
    port: u16,
}

impl Ep {
    fn of(sa: &SocketAddr) -> Ep {
        let ip = match sa.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        Ep {
            ip,
            port: sa.port(),
        }
    }

    fn ip_addr(&self) -> IpAddr {
        let v6 = Ipv6Addr::from(self.ip);
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }
}

/// An oriented TCP 4-tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Tuple {
    local: Ep,
    remote: Ep,
}

impl Tuple {
    fn of(local: &SocketAddr, remote: &SocketAddr) -> Tuple {
        Tuple {
            local: Ep::of(local),
            remote: Ep::of(remote),
        }
    }
}

/// Value of the tuple index: the socket, and its current flow (or NIL).
#[derive(Debug, Clone, Copy)]
struct TupleRef {
    sock: u32,
    flow: u32,
}

#[derive(Debug)]
struct Flow {
    id: u64,
    sock: u32,
    transport: Transport,
    local: Ep,
    remote: Ep,
    out_packets: u64,
    out_bytes: u64,
    in_packets: u64,
    in_bytes: u64,
    first: KernelTime,
    last: KernelTime,
    direction: FlowDirection,
    complete: bool,
    owner: Option<Arc<ProcessInfo>>,
    /// DNS name of the remote address, once found.
    domain: Option<Box<str>>,
    next_update: KernelTime,
    /// `last` when the pending timer was pushed (second-chance eviction).
    sched_last: KernelTime,
    /// Packets at the last record, to skip unchanged interim records.
    reported_packets: u64,
    prev: u32,
    next: u32,
}

impl Flow {
    fn count(&mut self, dir: PacketDir, len: u32, t: KernelTime) {
        match dir {
            PacketDir::Egress => {
                self.out_packets += 1;
                self.out_bytes += u64::from(len);
            }
            PacketDir::Ingress => {
                self.in_packets += 1;
                self.in_bytes += u64::from(len);
            }
        }
        if t > self.last {
            self.last = t;
        }
    }

    fn packets(&self) -> u64 {
        self.out_packets + self.in_packets
    }
}

#[derive(Debug)]
struct Socket {
    addr: SockAddr,
    gen: u64,
    transport: Option<Transport>,
    owner: Option<Arc<ProcessInfo>>,
    /// Creation, connect or accept observed.
    origin_seen: bool,
    /// A send or receive was seen: not a listener.
    data_seen: bool,
    /// Direction of the TCP connection, when known.
    tcp_dir: FlowDirection,
    /// The live flow of a TCP socket (NIL when none).
    tcp_flow: u32,
    /// The UDP flow used last (a cache in front of the peer index).
    udp_hint: u32,
    tuple: Option<Tuple>,
    udp_local: Option<Ep>,
    closed_at: Option<KernelTime>,
    last: KernelTime,
    first_flow: u32,
    unowned_flows: u32,
}

#[derive(Debug)]
struct Embryo {
    id: u64,
    tuple: Tuple,
    out_packets: u64,
    out_bytes: u64,
    in_packets: u64,
    in_bytes: u64,
    first: KernelTime,
    last: KernelTime,
    hint: Option<SockAddr>,
}

/// Datagrams received for a (local, remote) endpoint pair no known socket
/// matched yet.
#[derive(Debug, Clone, Copy)]
struct Parked {
    local: Ep,
    remote: Ep,
    packets: u64,
    bytes: u64,
    first: KernelTime,
    last: KernelTime,
}

/// The parked pairs of one local port, and the latest arrival among them.
#[derive(Debug, Default)]
struct ParkedPort {
    pairs: Vec<Parked>,
    last: KernelTime,
}

/// A pending deadline: (time, slot, identity of the slot's occupant).
type Due = Reverse<(KernelTime, u32, u64)>;

#[derive(Debug, Default, Clone, Copy)]
struct PendingLoss {
    count: u64,
    first: KernelTime,
    last: KernelTime,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The flow engine. See the module documentation for its semantics.
pub struct Engine<C: Clock> {
    clock: C,
    procs: ProcessTable,
    inactive: u64,
    termination: u64,
    sock_inactive: u64,
    update: u64,
    max_sockets: usize,
    max_flows: usize,
    max_embryonic: usize,
    max_parked_udp: usize,
    include_self: bool,
    own_pid: u32,
    own_tcp_ports: Vec<u16>,

    sockets: Slab<Socket>,
    flows: Slab<Flow>,
    embryos: Slab<Embryo>,
    sock_index: HashMap<SockAddr, u32>,
    tuple_index: HashMap<Tuple, TupleRef>,
    peer_index: HashMap<(SockAddr, Ep), u32>,
    udp_local: HashMap<Ep, SockAddr>,
    udp_port: HashMap<u16, SockAddr>,
    embryo_index: HashMap<Tuple, u32>,
    /// Parked UDP datagrams by local port.
    parked: HashMap<u16, ParkedPort>,
    /// Parked pairs over all ports.
    parked_pairs: usize,
    /// Expiry checks of parked ports: (due, port), re-checked lazily.
    parked_due: BinaryHeap<Reverse<(KernelTime, u16)>>,
    flow_due: BinaryHeap<Due>,
    sock_due: BinaryHeap<Due>,
    embryo_due: BinaryHeap<Due>,

    next_id: u64,
    losses: [PendingLoss; 3],
    stats: EngineStats,

    dns: Option<DnsTable>,
    /// Exited processes whose DNS answers go at the given time, in order.
    dns_exits: VecDeque<(KernelTime, u32)>,
    /// The pending exit time of each pid in `dns_exits` (a later entry of
    /// the same pid, or a fork reusing it, supersedes the queued one).
    dns_exit_due: HashMap<u32, KernelTime>,
    dns_exit_grace: u64,
}

impl<C: Clock> std::fmt::Debug for Engine<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

const LOSS_SOURCES: [LossSource; 3] = [
    LossSource::SocketTableEviction,
    LossSource::FlowTableEviction,
    LossSource::ProcessTableEviction,
];

impl<C: Clock> Engine<C> {
    /// A new engine; `procs` should already hold the initial process scan.
    pub fn new(cfg: EngineConfig, clock: C, procs: ProcessTable) -> Self {
        let max_flows = cfg.max_flows.clamp(1, MAX_TABLE_BOUND);
        let max_sockets = cfg.max_sockets.clamp(1, MAX_TABLE_BOUND);
        Engine {
            clock,
            procs,
            inactive: ns(cfg.flow_inactive_timeout),
            termination: ns(cfg.flow_termination_timeout),
            sock_inactive: ns(cfg.socket_inactive_timeout),
            update: ns(cfg.flow_update_interval),
            max_sockets,
            max_flows,
            max_embryonic: cfg.max_embryonic.clamp(1, MAX_TABLE_BOUND),
            max_parked_udp: cfg.max_parked_udp.min(MAX_TABLE_BOUND),
            include_self: cfg.include_self,
            own_pid: cfg.own_pid,
            own_tcp_ports: cfg.own_tcp_ports,
            sockets: Slab::default(),
            flows: Slab::default(),
            embryos: Slab::default(),
            sock_index: HashMap::new(),
            tuple_index: HashMap::new(),
            peer_index: HashMap::new(),
            udp_local: HashMap::new(),
            udp_port: HashMap::new(),
            embryo_index: HashMap::new(),
            parked: HashMap::new(),
            parked_pairs: 0,
            parked_due: BinaryHeap::new(),
            flow_due: BinaryHeap::new(),
            sock_due: BinaryHeap::new(),
            embryo_due: BinaryHeap::new(),
            next_id: 1,
            losses: [PendingLoss::default(); 3],
            stats: EngineStats::default(),
            dns: None,
            dns_exits: VecDeque::new(),
            dns_exit_due: HashMap::new(),
            dns_exit_grace: ns(cfg.flow_termination_timeout).saturating_add(ns(DNS_EXIT_SLACK)),
        }
    }

    /// Attaches a DNS table: flows get names from the responses given to
    /// [`Engine::observe_dns`] (see the module documentation).
    pub fn with_dns(mut self, table: DnsTable) -> Self {
        self.dns = Some(table);
        self
    }

    /// Feeds one captured DNS response to the table (ignored without one).
    /// `now` is on the same clock as the events.
    pub fn observe_dns(&mut self, now: KernelTime, response: &DnsResponse) {
        if let Some(table) = self.dns.as_mut() {
            table.observe_response(now, response);
        }
    }

    /// Counters and sizes of the DNS table, when one is attached.
    pub fn dns_stats(&self) -> Option<TableStats> {
        self.dns.as_ref().map(DnsTable::stats)
    }

    /// Pre-sizes the flow tables for `flows` live flows (avoids rehashing
    /// pauses when the expected load is known).
    pub fn reserve(&mut self, flows: usize) {
        let n = flows.min(self.max_flows);
        if self.flows.len() == 0 {
            self.flows = Slab::with_capacity(n);
        }
        self.tuple_index.reserve(n);
        self.peer_index.reserve(n);
        self.sock_index.reserve(n.min(self.max_sockets));
    }

    /// Estimated bytes held by the engine's own tables (slabs, indices,
    /// timer heaps), from their capacities and element sizes. Process
    /// snapshots (shared between the sockets of a process) are not counted.
    pub fn memory_bytes(&self) -> usize {
        fn map<K, V>(m: &HashMap<K, V>) -> usize {
            // hashbrown: buckets are a power of two at most 7/8 full, one
            // control byte per bucket plus a group of trailing ones.
            let cap = m.capacity();
            if cap == 0 {
                return 0;
            }
            let buckets = (cap * 8 / 7).next_power_of_two();
            buckets * (std::mem::size_of::<(K, V)>() + 1) + 16
        }
        fn heap(h: &BinaryHeap<Due>) -> usize {
            h.capacity() * std::mem::size_of::<Due>()
        }
        self.sockets.heap_bytes()
            + self.flows.heap_bytes()
            + self.embryos.heap_bytes()
            + map(&self.sock_index)
            + map(&self.tuple_index)
            + map(&self.peer_index)
            + map(&self.udp_local)
            + map(&self.udp_port)
            + map(&self.embryo_index)
            + heap(&self.flow_due)
            + heap(&self.sock_due)
            + heap(&self.embryo_due)
            + map(&self.parked)
            + self.parked_pairs * std::mem::size_of::<Parked>()
            + self.parked_due.capacity() * std::mem::size_of::<Reverse<(KernelTime, u16)>>()
    }

    /// The process table.
    pub fn processes(&mut self) -> &mut ProcessTable {
        &mut self.procs
    }

    /// Snapshot of table sizes and counters.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            sockets: self.sockets.len(),
            flows: self.flows.len(),
            embryonic: self.embryos.len(),
            parked_udp: self.parked_pairs,
            processes: self.procs.len(),
            timers: self.flow_due.len()
                + self.sock_due.len()
                + self.embryo_due.len()
                + self.parked_due.len(),
            ..self.stats
        }
    }

    fn id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    // ----- events -----

    /// Processes one event (events must come in timestamp order).
    pub fn handle(&mut self, ev: &Event, out: &mut Vec<Output>) {
        self.handle_hinted(ev, NIL, out);
    }

    /// Processes a slice of events in order, with the same result as
    /// calling [`Engine::handle`] on each. Faster with large tables: the
    /// socket lookups of a group of packets are issued before any of them is
    /// applied, so their cache misses overlap.
    pub fn handle_batch(&mut self, evs: &[Event], out: &mut Vec<Output>) {
        for chunk in evs.chunks(BATCH) {
            let mut hints = [NIL; BATCH];
            let mut touched = 0u64;
            for (hint, ev) in hints.iter_mut().zip(chunk) {
                let EventKind::Packet(Packet {
                    sock: Some(sa),
                    transport,
                    ..
                }) = &ev.kind
                else {
                    continue;
                };
                let Some(&s) = self.sock_index.get(sa) else {
                    continue;
                };
                *hint = s;
                if let Some(so) = self.sockets.get(s) {
                    let f = match transport {
                        Transport::Tcp => so.tcp_flow,
                        Transport::Udp => so.udp_hint,
                    };
                    // Start loading the flow too; the value is irrelevant.
                    touched ^= self.flows.get(f).map_or(0, |fl| fl.id);
                }
            }
            std::hint::black_box(touched);
            for (&hint, ev) in hints.iter().zip(chunk) {
                self.handle_hinted(ev, hint, out);
            }
        }
    }

    /// The slot of the tracked socket at `sa`; `hint` is a slot looked up
    /// earlier, used when it still holds that socket.
    fn sock_slot(&self, sa: SockAddr, hint: u32) -> Option<u32> {
        if self.sockets.get(hint).is_some_and(|so| so.addr == sa) {
            return Some(hint);
        }
        self.sock_index.get(&sa).copied()
    }

    fn handle_hinted(&mut self, ev: &Event, hint: u32, out: &mut Vec<Output>) {
        let t = ev.time;
        if let EventKind::Packet(p) = &ev.kind {
            self.on_packet(t, p, hint, out);
            return;
        }
        match &ev.kind {
            EventKind::Packet(_) => {}
            EventKind::SockCreate { sock, transport } => {
                if let Some(&old) = self.sock_index.get(sock) {
                    self.reuse(old, out);
                }
                let s = self.new_socket(t, *sock, *transport, true, out);
                self.attribute(s, ev.task);
            }
            EventKind::TcpConnect {
                sock,
                local,
                remote,
            } => {
                let tuple = Tuple::of(local, remote);
                self.on_tcp_open(t, ev.task, *sock, tuple, FlowDirection::Egress, out);
            }
            EventKind::TcpAccept {
                sock,
                local,
                remote,
            } => {
                let tuple = Tuple::of(local, remote);
                self.on_tcp_open(t, ev.task, *sock, tuple, FlowDirection::Ingress, out);
            }
            EventKind::SockActivity {
                sock,
                transport,
                op,
                ..
            } => self.on_activity(t, ev.task, *sock, *transport, *op, out),
            EventKind::UdpRecv { sock, local } => {
                self.on_activity(t, ev.task, *sock, Transport::Udp, SockOp::Recv, out);
                self.bind_udp_local(*sock, local, out);
            }
            EventKind::SockClose { sock } => {
                let Some(&s) = self.sock_index.get(sock) else {
                    self.stats.ignored_events += 1;
                    return;
                };
                self.attribute(s, ev.task);
                let gen = if let Some(so) = self.sockets.get_mut(s) {
                    so.last = so.last.max(t);
                    if so.closed_at.is_some() {
                        return;
                    }
                    so.closed_at = Some(t);
                    so.gen
                } else {
                    return;
                };
                self.sock_due
                    .push(Reverse((t.saturating_add(self.termination), s, gen)));
            }
            EventKind::Exec { pid, filename } => self.procs.on_exec(*pid, filename),
            EventKind::Fork { parent, child } => {
                let wall = self.clock.wall(t);
                self.procs.on_fork(*parent, *child, wall);
                self.dns_fork(t, *parent, *child);
            }
            EventKind::Exit { tid, pid } => {
                self.procs.on_exit(*pid, *tid, t);
                self.dns_exit(t, *pid, *tid);
            }
            EventKind::Creds(c) => match ev.task {
                Some(task) => self.procs.on_creds(task.pid, *c),
                None => self.stats.ignored_events += 1,
            },
        }
        self.note_process_evictions(t);
    }

    fn note_process_evictions(&mut self, t: KernelTime) {
        let n = self.procs.take_evictions();
        if n > 0 {
            self.stats.process_evictions += n;
            self.note_loss(2, n, t);
        }
    }

    fn note_loss(&mut self, idx: usize, n: u64, t: KernelTime) {
        let l = &mut self.losses[idx];
        if l.count == 0 {
            l.first = t;
        }
        l.count += n;
        l.last = t;
    }

    /// A fork: the child's pid is new, so answers still held for an exited
    /// process of that pid go now; then the child inherits the parent's.
    fn dns_fork(&mut self, t: KernelTime, parent: u32, child: u32) {
        let Some(table) = self.dns.as_mut() else {
            return;
        };
        if self.dns_exit_due.remove(&child).is_some() {
            table.on_exit(child);
        }
        table.fork(t, parent, child);
    }

    /// An exit: a thread's inherited copy (made by its creation's fork
    /// event) goes now; a process's answers go after the grace period.
    fn dns_exit(&mut self, t: KernelTime, pid: u32, tid: u32) {
        let Some(table) = self.dns.as_mut() else {
            return;
        };
        if tid != pid {
            if !self.dns_exit_due.contains_key(&tid) {
                table.on_exit(tid);
            }
            return;
        }
        let at = t.saturating_add(self.dns_exit_grace);
        self.dns_exit_due.insert(pid, at);
        self.dns_exits.push_back((at, pid));
    }

    /// Drops the answers of processes whose exit grace ended by `now`, and
    /// expired table entries.
    fn dns_tick(&mut self, now: KernelTime) {
        let Some(table) = self.dns.as_mut() else {
            return;
        };
        while let Some(&(at, pid)) = self.dns_exits.front() {
            if at > now {
                break;
            }
            self.dns_exits.pop_front();
            if self.dns_exit_due.get(&pid) == Some(&at) {
                self.dns_exit_due.remove(&pid);
                table.on_exit(pid);
            }
        }
        table.expire(now);
    }

    /// Names the flow's remote address from its owner's DNS answers, if it
    /// has no name yet.
    fn resolve_domain(dns: &mut Option<DnsTable>, fl: &mut Flow) {
        if fl.domain.is_some() {
            return;
        }
        let (Some(table), Some(owner)) = (dns.as_mut(), fl.owner.as_ref()) else {
            return;
        };
        if let Some(m) = table.lookup_counted(fl.first, owner.pid, fl.remote.ip_addr()) {
            if m.source == MatchSource::Process {
                fl.domain = Some(m.domain().into());
            }
        }
    }

    fn on_tcp_open(
        &mut self,
        t: KernelTime,
        task: Option<Task>,
        sock: SockAddr,
        tuple: Tuple,
        dir: FlowDirection,
        out: &mut Vec<Output>,
    ) {
        let s = match self.sock_index.get(&sock).copied() {
            Some(s)
                if self.sockets.get(s).is_some_and(|so| {
                    so.closed_at.is_none()
                        && so.tuple.is_none()
                        && so.transport != Some(Transport::Udp)
                }) =>
            {
                s
            }
            other => {
                if let Some(old) = other {
                    self.reuse(old, out);
                }
                self.new_socket(t, sock, Some(Transport::Tcp), true, out)
            }
        };
        if let Some(so) = self.sockets.get_mut(s) {
            so.transport = Some(Transport::Tcp);
            so.origin_seen = true;
            so.tcp_dir = dir;
            so.last = so.last.max(t);
        }
        self.attribute(s, task);
        self.bind_tuple(t, s, tuple, dir, true, out);
    }

    fn on_activity(
        &mut self,
        t: KernelTime,
        task: Option<Task>,
        sock: SockAddr,
        transport: Transport,
        _op: SockOp,
        out: &mut Vec<Output>,
    ) {
        let s = match self.sock_index.get(&sock).copied() {
            Some(s)
                if self.sockets.get(s).is_some_and(|so| {
                    so.closed_at.is_none() && so.transport.is_none_or(|tr| tr == transport)
                }) =>
            {
                s
            }
            other => {
                if let Some(old) = other {
                    self.reuse(old, out);
                }
                self.new_socket(t, sock, Some(transport), false, out)
            }
        };
        if let Some(so) = self.sockets.get_mut(s) {
            so.transport = Some(transport);
            so.data_seen = true;
            so.last = so.last.max(t);
        }
        self.attribute(s, task);
    }

    /// Records the bound local address of a UDP socket seen receiving, so
    /// its ingress packets (which carry no socket) find it even when it
    /// never sends. A wildcard bind is indexed by port only.
    fn bind_udp_local(&mut self, sock: SockAddr, local: &SocketAddr, out: &mut Vec<Output>) {
        if local.port() == 0 {
            return;
        }
        let Some(&s) = self.sock_index.get(&sock) else {
            return;
        };
        let Some(so) = self.sockets.get_mut(s) else {
            return;
        };
        if so.udp_local.is_some() || so.transport != Some(Transport::Udp) {
            return;
        }
        let l = Ep::of(local);
        so.udp_local = Some(l);
        let wildcard = local.ip().is_unspecified();
        if !wildcard {
            self.udp_local.insert(l, sock);
        }
        self.udp_port.insert(l.port, sock);
        self.claim_parked(s, l, wildcard, out);
    }

    /// Sets the socket's owner from a syscall-context task and gives it to
    /// the socket's flows that have none yet.
    fn attribute(&mut self, s: u32, task: Option<Task>) {
        let Some(task) = task else { return };
        let info = self.procs.lookup(task.pid);
        if self
            .sockets
            .get(s)
            .and_then(|so| so.owner.as_ref())
            .is_some_and(|o| Arc::ptr_eq(o, &info))
        {
            return;
        }
        let Some(so) = self.sockets.get_mut(s) else {
            return;
        };
        so.owner = Some(Arc::clone(&info));
        if so.unowned_flows == 0 {
            return;
        }
        so.unowned_flows = 0;
        let mut f = so.first_flow;
        while f != NIL {
            let Some(fl) = self.flows.get_mut(f) else {
                break;
            };
            if fl.owner.is_none() {
                fl.owner = Some(Arc::clone(&info));
            }
            f = fl.next;
        }
    }

    // ----- packets -----

    fn on_packet(&mut self, t: KernelTime, p: &Packet, hint: u32, out: &mut Vec<Output>) {
        let (local, remote) = match p.dir {
            PacketDir::Egress => (&p.src, &p.dst),
            PacketDir::Ingress => (&p.dst, &p.src),
        };
        let (l, r) = (Ep::of(local), Ep::of(remote));
        match p.transport {
            Transport::Tcp => self.tcp_packet(
                t,
                p,
                hint,
                Tuple {
                    local: l,
                    remote: r,
                },
                out,
            ),
            Transport::Udp => self.udp_packet(t, p, hint, (l, r), out),
        }
    }

    fn tcp_packet(
        &mut self,
        t: KernelTime,
        p: &Packet,
        hint: u32,
        tuple: Tuple,
        out: &mut Vec<Output>,
    ) {
        // Fast path, same result as the tuple index (a socket's tuple is
        // indexed to that socket alone) with a smaller table to probe.
        if let Some(sa) = p.sock {
            if let Some(so) = self.sock_slot(sa, hint).and_then(|s| self.sockets.get(s)) {
                // The socket's live flow carries the socket's tuple.
                let f = so.tcp_flow;
                if let Some(fl) = self
                    .flows
                    .get_mut(f)
                    .filter(|fl| fl.local == tuple.local && fl.remote == tuple.remote)
                {
                    fl.count(p.dir, p.ip_len, t);
                    return;
                }
            }
        }
        if let Some(&TupleRef { sock, flow }) = self.tuple_index.get(&tuple) {
            let flow = if flow != NIL {
                flow
            } else {
                // The flow ended by inactivity; the connection resumes.
                let dir = self
                    .sockets
                    .get(sock)
                    .map_or(FlowDirection::Unknown, |so| so.tcp_dir);
                let f = self.new_flow(
                    t,
                    sock,
                    Transport::Tcp,
                    tuple.local,
                    tuple.remote,
                    dir,
                    false,
                    out,
                );
                self.set_tcp_flow(sock, tuple, f);
                f
            };
            if let Some(f) = self.flows.get_mut(flow) {
                f.count(p.dir, p.ip_len, t);
            }
            return;
        }
        if let Some(sa) = p.sock {
            if let Some(&s) = self.sock_index.get(&sa) {
                let (conflict, data) = match self.sockets.get(s) {
                    Some(so) => (
                        so.tuple.is_some()
                            || so.transport == Some(Transport::Udp)
                            || so.closed_at.is_some(),
                        so.data_seen,
                    ),
                    None => (false, false),
                };
                if conflict {
                    // A connected socket never changes its tuple, and a closed
                    // one sends nothing new: the address was reused (for a
                    // connection not accepted yet, say) without the events
                    // that would have said so.
                    self.reuse(s, out);
                } else if data {
                    // Lost connect: a socket that carries data owns this tuple.
                    if let Some(so) = self.sockets.get_mut(s) {
                        so.transport = Some(Transport::Tcp);
                    }
                    if let Some(f) =
                        self.bind_tuple(t, s, tuple, FlowDirection::Unknown, false, out)
                    {
                        if let Some(f) = self.flows.get_mut(f) {
                            f.count(p.dir, p.ip_len, t);
                        }
                    }
                    return;
                }
            }
        }
        self.embryo_packet(t, p, tuple);
    }

    /// Records `f` as the live flow of TCP socket `s` with `tuple`.
    fn set_tcp_flow(&mut self, s: u32, tuple: Tuple, f: u32) {
        if let Some(so) = self.sockets.get_mut(s) {
            so.tcp_flow = f;
        }
        if let Some(r) = self.tuple_index.get_mut(&tuple) {
            if r.sock == s {
                r.flow = f;
            }
        }
    }

    fn embryo_packet(&mut self, t: KernelTime, p: &Packet, tuple: Tuple) {
        let hint = p.sock.filter(|sa| {
            self.sock_index
                .get(sa)
                .and_then(|&s| self.sockets.get(s))
                .is_none_or(|so| so.tuple.is_none() && so.data_seen)
        });
        let e = match self.embryo_index.get(&tuple) {
            Some(&e) => e,
            None => {
                if self.embryos.len() >= self.max_embryonic {
                    self.stats.embryonic_dropped += 1;
                    return;
                }
                let id = self.id();
                let e = self.embryos.insert(Embryo {
                    id,
                    tuple,
                    out_packets: 0,
                    out_bytes: 0,
                    in_packets: 0,
                    in_bytes: 0,
                    first: t,
                    last: t,
                    hint: None,
                });
                self.embryo_index.insert(tuple, e);
                self.embryo_due
                    .push(Reverse((t.saturating_add(self.termination), e, id)));
                e
            }
        };
        if let Some(em) = self.embryos.get_mut(e) {
            match p.dir {
                PacketDir::Egress => {
                    em.out_packets += 1;
                    em.out_bytes += u64::from(p.ip_len);
                }
                PacketDir::Ingress => {
                    em.in_packets += 1;
                    em.in_bytes += u64::from(p.ip_len);
                }
            }
            em.last = em.last.max(t);
            if hint.is_some() {
                em.hint = hint;
            }
        }
    }

    fn udp_packet(
        &mut self,
        t: KernelTime,
        p: &Packet,
        hint: u32,
        (l, r): (Ep, Ep),
        out: &mut Vec<Output>,
    ) {
        let sa = match p.sock {
            Some(sa) => sa,
            None => match self
                .udp_local
                .get(&l)
                .or_else(|| self.udp_port.get(&l.port))
            {
                Some(&sa) => sa,
                None => {
                    if p.dir == PacketDir::Ingress {
                        self.park(t, l, r, p.ip_len);
                    } else {
                        self.stats.unmatched_packets += 1;
                    }
                    return;
                }
            },
        };
        if p.dir == PacketDir::Egress && r.port == DNS_PORT {
            self.dns_claim(t, sa, hint, p.src);
        }
        // Fast path: the flow this socket used last.
        if let Some(s) = self.sock_slot(sa, hint) {
            if let Some(so) = self.sockets.get(s) {
                let f = so.udp_hint;
                if let Some(fl) = self
                    .flows
                    .get_mut(f)
                    .filter(|fl| fl.sock == s && fl.remote == r)
                {
                    fl.count(p.dir, p.ip_len, t);
                    return;
                }
            }
        }
        if let Some(&f) = self.peer_index.get(&(sa, r)) {
            if let Some(fl) = self.flows.get_mut(f) {
                fl.count(p.dir, p.ip_len, t);
                let s = fl.sock;
                if let Some(so) = self.sockets.get_mut(s) {
                    so.udp_hint = f;
                }
            }
            return;
        }
        let s = match self.sock_index.get(&sa).copied() {
            Some(s)
                if self
                    .sockets
                    .get(s)
                    .is_some_and(|so| so.transport != Some(Transport::Tcp)) =>
            {
                s
            }
            other => {
                if let Some(old) = other {
                    self.reuse(old, out);
                }
                self.new_socket(t, sa, Some(Transport::Udp), false, out)
            }
        };
        let (dir, complete, learnt) = match self.sockets.get_mut(s) {
            Some(so) => {
                so.transport = Some(Transport::Udp);
                let learnt = so.udp_local.is_none();
                if learnt {
                    so.udp_local = Some(l);
                    self.udp_local.insert(l, sa);
                    self.udp_port.insert(l.port, sa);
                }
                let dir = match (so.origin_seen, p.dir) {
                    (false, _) => FlowDirection::Unknown,
                    (true, PacketDir::Egress) => FlowDirection::Egress,
                    (true, PacketDir::Ingress) => FlowDirection::Ingress,
                };
                (dir, so.origin_seen, learnt)
            }
            None => return,
        };
        let f = self.new_flow(t, s, Transport::Udp, l, r, dir, complete, out);
        self.peer_index.insert((sa, r), f);
        if let Some(so) = self.sockets.get_mut(s) {
            so.udp_hint = f;
        }
        if let Some(fl) = self.flows.get_mut(f) {
            fl.count(p.dir, p.ip_len, t);
        }
        if learnt {
            self.claim_parked(s, l, false, out);
        }
    }

    // ----- parked UDP datagrams -----

    /// Parks an ingress datagram no socket matched.
    fn park(&mut self, t: KernelTime, local: Ep, remote: Ep, len: u32) {
        let port = self.parked.entry(local.port).or_default();
        port.last = port.last.max(t);
        if let Some(pk) = port
            .pairs
            .iter_mut()
            .find(|pk| pk.local == local && pk.remote == remote)
        {
            pk.packets += 1;
            pk.bytes += u64::from(len);
            pk.last = pk.last.max(t);
            return;
        }
        if self.parked_pairs >= self.max_parked_udp {
            if port.pairs.is_empty() {
                self.parked.remove(&local.port);
            }
            self.stats.unmatched_packets += 1;
            return;
        }
        let fresh = port.pairs.is_empty();
        port.pairs.push(Parked {
            local,
            remote,
            packets: 1,
            bytes: u64::from(len),
            first: t,
            last: t,
        });
        self.parked_pairs += 1;
        if fresh {
            self.parked_due
                .push(Reverse((t.saturating_add(self.inactive), local.port)));
        }
    }

    /// Gives socket `s`, now known to receive at `local` (any address of
    /// that port when `wildcard`), the datagrams parked for it.
    fn claim_parked(&mut self, s: u32, local: Ep, wildcard: bool, out: &mut Vec<Output>) {
        let Some(mut port) = self.parked.remove(&local.port) else {
            return;
        };
        let (mine, rest): (Vec<Parked>, Vec<Parked>) = port
            .pairs
            .drain(..)
            .partition(|pk| wildcard || pk.local == local);
        if !rest.is_empty() {
            port.pairs = rest;
            self.parked.insert(local.port, port);
        }
        let Some(so) = self.sockets.get(s) else {
            self.stats.unmatched_packets += mine.iter().map(|pk| pk.packets).sum::<u64>();
            self.parked_pairs -= mine.len();
            return;
        };
        let (sa, complete) = (so.addr, so.origin_seen);
        let dir = if complete {
            FlowDirection::Ingress
        } else {
            FlowDirection::Unknown
        };
        for pk in mine {
            self.parked_pairs -= 1;
            self.stats.parked_udp_claimed += 1;
            let f = match self.peer_index.get(&(sa, pk.remote)) {
                Some(&f) => f,
                None => {
                    let f = self.new_flow(
                        pk.first,
                        s,
                        Transport::Udp,
                        pk.local,
                        pk.remote,
                        dir,
                        complete,
                        out,
                    );
                    self.peer_index.insert((sa, pk.remote), f);
                    f
                }
            };
            if let Some(fl) = self.flows.get_mut(f) {
                fl.in_packets += pk.packets;
                fl.in_bytes += pk.bytes;
                fl.first = fl.first.min(pk.first);
                fl.last = fl.last.max(pk.last);
            }
        }
    }

    /// Drops parked ports whose last datagram is `flow_inactive_timeout`
    /// old, counting their datagrams as unmatched.
    fn expire_parked(&mut self, now: KernelTime) {
        while let Some(&Reverse((due, port))) = self.parked_due.peek() {
            if due > now {
                break;
            }
            self.parked_due.pop();
            let Some(p) = self.parked.get(&port) else {
                continue;
            };
            let again = p.last.saturating_add(self.inactive);
            if again > now {
                self.parked_due.push(Reverse((again, port)));
                continue;
            }
            if let Some(p) = self.parked.remove(&port) {
                self.parked_pairs -= p.pairs.len();
                self.stats.unmatched_packets += p.pairs.iter().map(|pk| pk.packets).sum::<u64>();
            }
        }
    }

    /// A query left the local endpoint `src` of socket `sa`: the socket's
    /// owner will receive the responses sent back to it.
    fn dns_claim(&mut self, t: KernelTime, sa: SockAddr, hint: u32, src: SocketAddr) {
        if self.dns.is_none() {
            return;
        }
        let owner = self
            .sock_slot(sa, hint)
            .and_then(|s| self.sockets.get(s))
            .and_then(|so| so.owner.as_ref())
            .map(|o| o.pid);
        if let (Some(table), Some(pid)) = (self.dns.as_mut(), owner) {
            table.claim(t, src, pid);
        }
    }

    // ----- table maintenance -----

    fn new_socket(
        &mut self,
        t: KernelTime,
        addr: SockAddr,
        transport: Option<Transport>,
        origin_seen: bool,
        out: &mut Vec<Output>,
    ) -> u32 {
        while self.sockets.len() >= self.max_sockets {
            if !self.evict_socket(t, out) {
                break;
            }
        }
        let gen = self.id();
        let s = self.sockets.insert(Socket {
            addr,
            gen,
            transport,
            owner: None,
            origin_seen,
            data_seen: false,
            tcp_dir: FlowDirection::Unknown,
            tcp_flow: NIL,
            udp_hint: NIL,
            tuple: None,
            udp_local: None,
            closed_at: None,
            last: t,
            first_flow: NIL,
            unowned_flows: 0,
        });
        self.sock_index.insert(addr, s);
        self.sock_due
            .push(Reverse((t.saturating_add(self.sock_inactive), s, gen)));
        if self.sock_due.len() > HEAP_SLACK_FACTOR * self.sockets.len() + HEAP_SLACK_MIN
            || self.embryo_due.len() > HEAP_SLACK_FACTOR * self.embryos.len() + HEAP_SLACK_MIN
        {
            self.compact_timers();
        }
        s
    }

    /// Binds a TCP tuple to a socket and creates its flow, claiming the
    /// embryonic entry of the tuple. Returns the flow's slot.
    fn bind_tuple(
        &mut self,
        t: KernelTime,
        s: u32,
        tuple: Tuple,
        dir: FlowDirection,
        complete: bool,
        out: &mut Vec<Output>,
    ) -> Option<u32> {
        if let Some(old) = self.tuple_index.get(&tuple).map(|r| r.sock) {
            // Two live sockets never share a 4-tuple: the old one is gone.
            if old != s {
                self.reuse(old, out);
            }
        }
        let so = self.sockets.get_mut(s)?;
        so.tuple = Some(tuple);
        let f = self.new_flow(
            t,
            s,
            Transport::Tcp,
            tuple.local,
            tuple.remote,
            dir,
            complete,
            out,
        );
        self.tuple_index
            .insert(tuple, TupleRef { sock: s, flow: f });
        if let Some(so) = self.sockets.get_mut(s) {
            so.tcp_flow = f;
        }
        if let Some(e) = self.embryo_index.remove(&tuple) {
            if let (Some(em), Some(fl)) = (self.embryos.remove(e), self.flows.get_mut(f)) {
                fl.out_packets += em.out_packets;
                fl.out_bytes += em.out_bytes;
                fl.in_packets += em.in_packets;
                fl.in_bytes += em.in_bytes;
                fl.first = fl.first.min(em.first);
                fl.last = fl.last.max(em.last);
                self.stats.embryonic_claimed += 1;
            }
        }
        Some(f)
    }

    #[allow(clippy::too_many_arguments)]
    fn new_flow(
        &mut self,
        t: KernelTime,
        s: u32,
        transport: Transport,
        local: Ep,
        remote: Ep,
        direction: FlowDirection,
        complete: bool,
        out: &mut Vec<Output>,
    ) -> u32 {
        while self.flows.len() >= self.max_flows {
            if !self.evict_flow(t, out) {
                break;
            }
        }
        let id = self.id();
        let (owner, head) = match self.sockets.get(s) {
            Some(so) => (so.owner.clone(), so.first_flow),
            None => (None, NIL),
        };
        let unowned = owner.is_none();
        let next_update = if self.update == 0 {
            u64::MAX
        } else {
            t.saturating_add(self.update)
        };
        let f = self.flows.insert(Flow {
            id,
            sock: s,
            transport,
            local,
            remote,
            out_packets: 0,
            out_bytes: 0,
            in_packets: 0,
            in_bytes: 0,
            first: t,
            last: t,
            direction,
            complete,
            owner,
            domain: None,
            next_update,
            sched_last: t,
            reported_packets: 0,
            prev: NIL,
            next: head,
        });
        if let Some(h) = self.flows.get_mut(head) {
            h.prev = f;
        }
        if let Some(fl) = self.flows.get_mut(f) {
            Self::resolve_domain(&mut self.dns, fl);
        }
        if let Some(so) = self.sockets.get_mut(s) {
            so.first_flow = f;
            if unowned {
                so.unowned_flows += 1;
            }
        }
        self.stats.flows_created += 1;
        let due = t.saturating_add(self.inactive).min(next_update);
        self.flow_due.push(Reverse((due, f, id)));
        if self.flow_due.len() > HEAP_SLACK_FACTOR * self.flows.len() + HEAP_SLACK_MIN {
            self.compact_timers();
        }
        f
    }

    /// Drops stale timer entries (of removed flows, sockets and embryonic
    /// entries). Called when a heap holds several times more entries than
    /// live items, so the cost is amortised over the insertions that made
    /// the garbage.
    fn compact_timers(&mut self) {
        let flows = &self.flows;
        self.flow_due
            .retain(|Reverse((_, f, id))| flows.get(*f).is_some_and(|fl| fl.id == *id));
        let sockets = &self.sockets;
        self.sock_due
            .retain(|Reverse((_, s, gen))| sockets.get(*s).is_some_and(|so| so.gen == *gen));
        let embryos = &self.embryos;
        self.embryo_due
            .retain(|Reverse((_, e, id))| embryos.get(*e).is_some_and(|em| em.id == *id));
    }

    /// Emits a flow's final record and removes it from every index.
    fn finish_flow(&mut self, f: u32, out: &mut Vec<Output>) {
        let Some(mut fl) = self.flows.remove(f) else {
            return;
        };
        Self::resolve_domain(&mut self.dns, &mut fl);
        if let Some(p) = self.flows.get_mut(fl.prev) {
            p.next = fl.next;
        }
        if let Some(n) = self.flows.get_mut(fl.next) {
            n.prev = fl.prev;
        }
        let addr = match self.sockets.get_mut(fl.sock) {
            Some(so) => {
                if so.first_flow == f {
                    so.first_flow = fl.next;
                }
                if fl.owner.is_none() {
                    so.unowned_flows = so.unowned_flows.saturating_sub(1);
                }
                if so.tcp_flow == f {
                    so.tcp_flow = NIL;
                }
                if so.udp_hint == f {
                    so.udp_hint = NIL;
                }
                so.addr
            }
            None => 0,
        };
        match fl.transport {
            Transport::Tcp => {
                let tuple = Tuple {
                    local: fl.local,
                    remote: fl.remote,
                };
                if let Some(r) = self.tuple_index.get_mut(&tuple) {
                    if r.flow == f {
                        r.flow = NIL;
                    }
                }
            }
            Transport::Udp => {
                if self.peer_index.get(&(addr, fl.remote)) == Some(&f) {
                    self.peer_index.remove(&(addr, fl.remote));
                }
            }
        }
        self.emit(&fl, addr, true, out);
    }

    /// Ends a socket: its flows become final and it leaves every index.
    fn end_socket(&mut self, s: u32, out: &mut Vec<Output>) {
        loop {
            let head = match self.sockets.get(s) {
                Some(so) => so.first_flow,
                None => return,
            };
            if head == NIL {
                break;
            }
            self.finish_flow(head, out);
        }
        let Some(so) = self.sockets.remove(s) else {
            return;
        };
        if let Some(tuple) = so.tuple {
            if self.tuple_index.get(&tuple).is_some_and(|r| r.sock == s) {
                self.tuple_index.remove(&tuple);
            }
        }
        if let Some(l) = so.udp_local {
            if let Some(table) = self.dns.as_mut() {
                table.release(SocketAddr::new(l.ip_addr(), l.port));
            }
            if self.udp_local.get(&l) == Some(&so.addr) {
                self.udp_local.remove(&l);
            }
            if self.udp_port.get(&l.port) == Some(&so.addr) {
                self.udp_port.remove(&l.port);
            }
        }
        if self.sock_index.get(&so.addr) == Some(&s) {
            self.sock_index.remove(&so.addr);
        }
    }

    /// A new socket took the address of socket `s`. A closed TCP socket
    /// whose termination wait is still running is *retired*: it leaves the
    /// address index to the new socket but keeps its flows (and their tuple)
    /// until its close timer ends it, so the late packets of the old
    /// connection (a FIN's ACK, sent after the kernel freed the socket and
    /// reused its memory) still count. Any other socket ends at once.
    fn reuse(&mut self, s: u32, out: &mut Vec<Output>) {
        self.stats.socket_reuses += 1;
        let retire = self.sockets.get(s).is_some_and(|so| {
            so.closed_at.is_some() && so.tuple.is_some() && so.udp_local.is_none()
        });
        if !retire {
            self.end_socket(s, out);
            return;
        }
        if let Some(so) = self.sockets.get(s) {
            if self.sock_index.get(&so.addr) == Some(&s) {
                self.sock_index.remove(&so.addr);
            }
        }
    }

    /// Evicts one flow: the earliest-deadline flow not active since it was
    /// scheduled, or after [`EVICTION_PROBES`] candidates the first one.
    fn evict_flow(&mut self, t: KernelTime, out: &mut Vec<Output>) -> bool {
        let mut spared: [Option<Due>; EVICTION_PROBES] = [None; EVICTION_PROBES];
        let mut victim = None;
        let mut probes = 0;
        while let Some(Reverse((due, f, id))) = self.flow_due.pop() {
            let Some(fl) = self.flows.get_mut(f).filter(|fl| fl.id == id) else {
                continue; // stale
            };
            if fl.last > fl.sched_last && probes + 1 < EVICTION_PROBES {
                // Second chance: active since scheduled; look further.
                fl.sched_last = fl.last;
                let next = fl
                    .last
                    .saturating_add(self.inactive)
                    .min(fl.next_update)
                    .max(due);
                spared[probes] = Some(Reverse((next, f, id)));
                probes += 1;
                continue;
            }
            // This one goes; its timer entry is consumed with it.
            victim = Some(f);
            break;
        }
        // Everything probed was active: take the first one spared.
        if victim.is_none() {
            if let Some(Reverse((_, f, _))) = spared[0].take() {
                victim = Some(f);
            }
        }
        for d in spared.into_iter().flatten() {
            self.flow_due.push(d);
        }
        match victim {
            Some(f) => {
                self.evicted_flow(t, f, out);
                true
            }
            None => false,
        }
    }

    fn evicted_flow(&mut self, t: KernelTime, f: u32, out: &mut Vec<Output>) {
        self.stats.flow_evictions += 1;
        self.note_loss(1, 1, t);
        self.finish_flow(f, out);
    }

    /// Evicts the socket with the earliest deadline.
    fn evict_socket(&mut self, t: KernelTime, out: &mut Vec<Output>) -> bool {
        while let Some(Reverse((_, s, gen))) = self.sock_due.pop() {
            if self.sockets.get(s).is_some_and(|so| so.gen == gen) {
                self.stats.socket_evictions += 1;
                self.note_loss(0, 1, t);
                self.end_socket(s, out);
                return true;
            }
        }
        // Every socket has a pending deadline, so this is unreachable while
        // the table is non-empty; an empty table needs no eviction.
        false
    }

    // ----- time -----

    /// Advances time to `now`: expires flows, sockets, embryonic entries and
    /// exited processes, emits interim records and pending loss notices.
    pub fn tick(&mut self, now: KernelTime, out: &mut Vec<Output>) {
        // Deadlines are handled in time order across the three heaps, so a
        // socket closed at 6 s ends its flows before their 11 s update.
        loop {
            let next = |h: &BinaryHeap<Due>| h.peek().map_or(u64::MAX, |Reverse(d)| d.0);
            let (f, e, s) = (
                next(&self.flow_due),
                next(&self.embryo_due),
                next(&self.sock_due),
            );
            let min = f.min(e).min(s);
            if min > now || min == u64::MAX {
                break;
            }
            if min == s {
                if let Some(Reverse((_, slot, gen))) = self.sock_due.pop() {
                    self.fire_socket(slot, gen, now, out);
                }
            } else if min == e {
                if let Some(Reverse((_, slot, id))) = self.embryo_due.pop() {
                    self.fire_embryo(slot, id, out);
                }
            } else if let Some(Reverse((_, slot, id))) = self.flow_due.pop() {
                self.fire_flow(slot, id, now, out);
            }
        }
        self.expire_parked(now);
        self.procs.expire(now);
        self.dns_tick(now);
        self.note_process_evictions(now);
        self.flush_losses(out);
    }

    fn fire_flow(&mut self, f: u32, id: u64, now: KernelTime, out: &mut Vec<Output>) {
        let Some(fl) = self.flows.get_mut(f).filter(|fl| fl.id == id) else {
            return; // stale
        };
        if fl.last.saturating_add(self.inactive) <= now {
            self.finish_flow(f, out);
            return;
        }
        let mut interim = false;
        if fl.next_update <= now {
            let point = fl.next_update;
            while fl.next_update <= now {
                fl.next_update = fl.next_update.saturating_add(self.update);
            }
            // Long-lived: changed since the last record and still active in
            // the interval that just ended.
            interim =
                fl.packets() != fl.reported_packets && fl.last.saturating_add(self.update) > point;
        }
        fl.sched_last = fl.last;
        let next = fl.last.saturating_add(self.inactive).min(fl.next_update);
        let sock = fl.sock;
        self.flow_due.push(Reverse((next, f, id)));
        let closing = self
            .sockets
            .get(sock)
            .is_some_and(|so| so.closed_at.is_some());
        if interim && !closing {
            self.interim(f, out);
        }
    }

    fn interim(&mut self, f: u32, out: &mut Vec<Output>) {
        if let Some(fl) = self.flows.get_mut(f) {
            Self::resolve_domain(&mut self.dns, fl);
        }
        let Some(fl) = self.flows.get(f) else { return };
        let addr = self.sockets.get(fl.sock).map_or(0, |so| so.addr);
        let packets = fl.packets();
        match self.record(fl, addr, false) {
            Some(rec) => {
                self.stats.interim_records += 1;
                out.push(Output::Flow(Arc::new(rec)));
            }
            None => self.stats.self_suppressed += 1,
        }
        if let Some(fl) = self.flows.get_mut(f) {
            fl.reported_packets = packets;
        }
    }

    fn fire_embryo(&mut self, e: u32, id: u64, out: &mut Vec<Output>) {
        if self.embryos.get(e).is_none_or(|em| em.id != id) {
            return; // claimed or replaced
        }
        let Some(em) = self.embryos.remove(e) else {
            return;
        };
        self.embryo_index.remove(&em.tuple);
        self.promote_or_drop(em, out);
    }

    fn promote_or_drop(&mut self, em: Embryo, out: &mut Vec<Output>) {
        let target = match em.hint {
            Some(sa) => match self.sock_index.get(&sa).copied() {
                None => Some(self.new_socket(em.last, sa, Some(Transport::Tcp), false, out)),
                Some(s) => self
                    .sockets
                    .get(s)
                    .filter(|so| so.tuple.is_none() && so.data_seen && so.closed_at.is_none())
                    .map(|_| s),
            },
            None => None,
        };
        let Some(s) = target else {
            self.stats.embryonic_expired += 1;
            return;
        };
        if let Some(so) = self.sockets.get_mut(s) {
            so.transport = Some(Transport::Tcp);
        }
        // bind_tuple merges counters from the embryonic table; re-insert it
        // there for the merge.
        let tuple = em.tuple;
        let first = em.first;
        let e = self.embryos.insert(em);
        self.embryo_index.insert(tuple, e);
        if self
            .bind_tuple(first, s, tuple, FlowDirection::Unknown, false, out)
            .is_some()
        {
            self.stats.embryonic_claimed -= 1;
            self.stats.embryonic_promoted += 1;
        }
    }

    fn fire_socket(&mut self, s: u32, gen: u64, now: KernelTime, out: &mut Vec<Output>) {
        let Some(so) = self.sockets.get(s).filter(|so| so.gen == gen) else {
            return; // stale
        };
        if let Some(closed) = so.closed_at {
            let at = closed.saturating_add(self.termination);
            if at <= now {
                self.end_socket(s, out);
            } else {
                self.sock_due.push(Reverse((at, s, gen)));
            }
            return;
        }
        let mut last = so.last;
        let mut f = so.first_flow;
        while let Some(fl) = self.flows.get(f) {
            last = last.max(fl.last);
            f = fl.next;
        }
        let at = last.saturating_add(self.sock_inactive);
        if at <= now {
            self.stats.sockets_expired += 1;
            self.end_socket(s, out);
        } else {
            self.sock_due.push(Reverse((at, s, gen)));
        }
    }

    fn flush_losses(&mut self, out: &mut Vec<Output>) {
        for (i, src) in LOSS_SOURCES.iter().enumerate() {
            let l = std::mem::take(&mut self.losses[i]);
            if l.count > 0 {
                out.push(Output::Loss(Loss {
                    source: *src,
                    cpu: None,
                    count: l.count,
                    first: self.clock.wall(l.first),
                    last: self.clock.wall(l.last),
                }));
            }
        }
    }

    /// Ends everything (shutdown): every flow is emitted as final, tables
    /// are emptied, pending loss notices are emitted.
    pub fn flush(&mut self, out: &mut Vec<Output>) {
        let slots: Vec<u32> = self.sockets.slots().collect();
        for s in slots {
            self.end_socket(s, out);
        }
        self.embryos = Slab::default();
        self.embryo_index.clear();
        let parked: u64 = self
            .parked
            .values()
            .flat_map(|p| p.pairs.iter())
            .map(|pk| pk.packets)
            .sum();
        self.stats.unmatched_packets += parked;
        self.parked.clear();
        self.parked_pairs = 0;
        self.parked_due.clear();
        self.flow_due.clear();
        self.sock_due.clear();
        self.embryo_due.clear();
        self.flush_losses(out);
    }

    // ----- records -----

    /// Builds and pushes the record of a flow; false when withheld.
    fn emit(&mut self, fl: &Flow, sock: SockAddr, is_final: bool, out: &mut Vec<Output>) -> bool {
        match self.record(fl, sock, is_final) {
            Some(rec) => {
                if is_final {
                    self.stats.final_records += 1;
                } else {
                    self.stats.interim_records += 1;
                }
                out.push(Output::Flow(Arc::new(rec)));
                true
            }
            None => {
                self.stats.self_suppressed += 1;
                false
            }
        }
    }

    /// Whether a flow belongs to the daemon itself: owned by its pid, or a
    /// TCP flow without an owner on one of its listening ports (a
    /// connection the daemon accepted before any syscall on it was seen).
    fn is_own(&self, fl: &Flow) -> bool {
        match fl.owner.as_ref() {
            Some(o) => o.pid == self.own_pid,
            None => {
                fl.transport == Transport::Tcp
                    && fl.direction != FlowDirection::Egress
                    && self.own_tcp_ports.contains(&fl.local.port)
            }
        }
    }

    /// The record of a flow, or `None` when it belongs to the daemon itself
    /// and `include_self` is off.
    fn record(&self, fl: &Flow, sock: SockAddr, is_final: bool) -> Option<FlowRecord> {
        if !self.include_self && self.is_own(fl) {
            return None;
        }
        let (lip, rip) = (fl.local.ip_addr(), fl.remote.ip_addr());
        Some(FlowRecord {
            id: fl.id,
            is_final,
            complete: fl.complete,
            transport: fl.transport,
            direction: fl.direction,
            local: Endpoint {
                ip: lip,
                port: fl.local.port,
                packets: fl.out_packets,
                bytes: fl.out_bytes,
                domain: None,
            },
            remote: Endpoint {
                ip: rip,
                port: fl.remote.port,
                packets: fl.in_packets,
                bytes: fl.in_bytes,
                domain: fl.domain.as_deref().map(str::to_string),
            },
            start: self.clock.wall(fl.first),
            end: self.clock.wall(fl.last),
            community_id: community_id(fl.transport, lip, fl.local.port, rip, fl.remote.port),
            sock,
            process: fl.owner.as_deref().cloned(),
        })
    }
}
