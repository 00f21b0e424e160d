//! Pipeline stage: flow — the socket/flow state machine and its expiry.
//!
//! [`Engine::handle`] takes decoded [`Event`](crate::model::Event)s in
//! timestamp order and [`Engine::tick`] advances time; both append
//! [`Output`](crate::model::Output)s (flow records and
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
//! with a task, and an egress packet sampled in the task that sent it, which
//! counts as a send; not a kernel thread's); events without a task (ingress
//! packets, anything from a softirq) never attribute. A flow
//! keeps the first owner it was attributed to (a snapshot of the process at
//! that moment, immune to pid reuse); new flows take the socket's latest
//! owner. One exception: a send or receive (an egress packet sampled in its
//! task), or the socket's last close, by a child forked from a flow's
//! owner hands the flow to that child (a forking server's parent accepts,
//! the child serves the connection). Flows owned by the daemon's own pid are tracked but not reported
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
//! in a [`Loss`](crate::model::Loss) of its own source, coalesced and
//! emitted at the next tick.
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

mod events;
mod expiry;
mod keys;
mod naming;
mod preexisting;
mod records;
mod seq;
mod slab;
mod table;
mod tcp;
#[cfg(test)]
mod tests;
mod udp;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, SystemTime};

use hashbrown::HashMap;

use crate::enrich::dns::DnsTable;
use crate::enrich::process::ProcessTable;
use crate::model::{Accounting, KernelTime, SockAddr};
use keys::{Due, Ep, Tuple, TupleRef};
use records::{EvictionLoss, UnreportedEvictions};
use slab::Slab;
use table::{Flow, Socket};
use tcp::Embryo;
use udp::{Parked, ParkedPort};

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
    /// How TCP flows are counted: with [`Accounting::SocketCounters`] a
    /// TCP flow takes its counters from its socket's close event and
    /// does not end by inactivity while its socket is open.
    pub accounting: Accounting,
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
    /// TCP flows that took their counters from their socket.
    pub socket_counted: u64,
    /// TCP flows whose owner came from the start-up socket snapshot.
    pub seeded_owners: u64,
    /// Flows handed from their owner to a child it forked that used their
    /// socket.
    pub handed_to_children: u64,
    /// TCP flows of socket-counter accounting that ended before their
    /// socket's counters came (reported as uncounted).
    pub uncounted_flows: u64,
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
    /// TCP counted from socket close events.
    socket_counters: bool,
    /// Connections and listeners that existed at start.
    pre: preexisting::Preexisting,

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
    losses: [UnreportedEvictions; EvictionLoss::COUNT],
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
            socket_counters: cfg.accounting == Accounting::SocketCounters,
            pre: preexisting::Preexisting::default(),
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
            losses: [UnreportedEvictions::default(); EvictionLoss::COUNT],
            stats: EngineStats::default(),
            dns: None,
            dns_exits: VecDeque::new(),
            dns_exit_due: HashMap::new(),
            dns_exit_grace: ns(cfg.flow_termination_timeout).saturating_add(ns(DNS_EXIT_SLACK)),
        }
    }

    /// Estimated bytes held by the engine's own tables (slabs, indices,
    /// timer heaps), from their capacities and element sizes. Process
    /// snapshots (shared between the sockets of a process) are not counted.
    pub fn memory_bytes(&self) -> usize {
        self.memory_parts().iter().map(|(_, b)| b).sum()
    }

    /// [`Engine::memory_bytes`] table by table.
    pub fn memory_parts(&self) -> [(&'static str, usize); 14] {
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
        [
            ("sockets", self.sockets.heap_bytes()),
            ("flows", self.flows.heap_bytes()),
            ("embryos", self.embryos.heap_bytes()),
            ("sock_index", map(&self.sock_index)),
            ("tuple_index", map(&self.tuple_index)),
            ("peer_index", map(&self.peer_index)),
            ("udp_local", map(&self.udp_local)),
            ("udp_port", map(&self.udp_port)),
            ("embryo_index", map(&self.embryo_index)),
            ("flow_due", heap(&self.flow_due)),
            ("sock_due", heap(&self.sock_due)),
            ("embryo_due", heap(&self.embryo_due)),
            (
                "parked",
                map(&self.parked) + self.parked_pairs * std::mem::size_of::<Parked>(),
            ),
            (
                "parked_due",
                self.parked_due.capacity() * std::mem::size_of::<Reverse<(KernelTime, u16)>>(),
            ),
        ]
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

    pub(super) fn id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }
}
