//! Correlation of DNS answers with processes.
//!
//! Times are nanoseconds on any monotonic clock, as long as every call uses
//! the same one (the flow engine's kernel timestamps work).
//!
//! Life of an answer:
//! 1. [`DnsTable::observe_response`] records each address of a response in
//!    the host-wide map and, if the client endpoint is already claimed by a
//!    process, in that process's map; otherwise it parks the response under
//!    the client endpoint for [`TableLimits::pending_window`].
//! 2. [`DnsTable::claim`] binds a client endpoint to a process for
//!    [`TableLimits::claim_window`] (refreshed on every call) and moves the
//!    parked responses of that endpoint into the process's map.
//! 3. [`DnsTable::lookup`] consults the process's map, then the host-wide
//!    map, and says which one answered ([`MatchSource`]).
//!
//! The host-wide map holds every observed answer, claimed or not. Besides
//! responses whose socket was never claimed (socket closed before the
//! engine saw it, capture and probes racing), it covers resolvers that
//! answer processes over other channels (nscd, a Unix-socket resolver or a
//! caching daemon: the upstream socket belongs to the daemon, not to the
//! process that connects). It is only used when the process has no answer
//! for the address itself.
//!
//! An entry lives `clamp(ttl, min_retention, max_retention)` from the time
//! its response was observed. Every map is bounded; when full, the oldest
//! entry is evicted and counted.

use std::collections::VecDeque;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hashbrown::HashMap;

use super::{Address, DnsName, DnsResponse};

/// Default [`TableLimits::pending_window`].
pub const DEFAULT_PENDING_WINDOW: Duration = Duration::from_secs(10);
/// Default [`TableLimits::claim_window`].
pub const DEFAULT_CLAIM_WINDOW: Duration = Duration::from_secs(10);
/// Default [`TableLimits::min_retention`].
pub const DEFAULT_MIN_RETENTION: Duration = Duration::from_secs(60);
/// Default [`TableLimits::max_retention`].
pub const DEFAULT_MAX_RETENTION: Duration = Duration::from_secs(3600);
/// Default [`TableLimits::max_pending_clients`].
pub const DEFAULT_MAX_PENDING_CLIENTS: usize = 4096;
/// Default [`TableLimits::max_responses_per_client`].
pub const DEFAULT_MAX_RESPONSES_PER_CLIENT: usize = 16;
/// Default [`TableLimits::max_claims`].
pub const DEFAULT_MAX_CLAIMS: usize = 16_384;
/// Default [`TableLimits::max_process_entries`].
pub const DEFAULT_MAX_PROCESS_ENTRIES: usize = 65_536;
/// Default [`TableLimits::max_entries_per_process`].
pub const DEFAULT_MAX_ENTRIES_PER_PROCESS: usize = 4096;
/// Default [`TableLimits::max_host_entries`].
pub const DEFAULT_MAX_HOST_ENTRIES: usize = 16_384;
/// Stale FIFO-order slots tolerated beyond the live entries before the
/// order queue is compacted.
const ORDER_SLACK: usize = 1024;
/// The same for the per-process address indexes, which are many and small.
const PID_ORDER_SLACK: usize = 16;

/// Bounds and windows of a [`DnsTable`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableLimits {
    /// How long a response waits for its client endpoint to be claimed.
    pub pending_window: Duration,
    /// How long a claim routes new responses to its process after the last
    /// [`DnsTable::claim`] for that endpoint.
    pub claim_window: Duration,
    /// Shortest life of an answer, whatever its TTL (programs commonly
    /// connect after the TTL, and flows end long after).
    pub min_retention: Duration,
    /// Longest life of an answer, whatever its TTL.
    pub max_retention: Duration,
    /// Client endpoints with parked responses.
    pub max_pending_clients: usize,
    /// Parked responses per client endpoint.
    pub max_responses_per_client: usize,
    /// Claimed endpoints.
    pub max_claims: usize,
    /// ip → name entries over all processes.
    pub max_process_entries: usize,
    /// ip → name entries of one process.
    pub max_entries_per_process: usize,
    /// Entries of the host-wide map.
    pub max_host_entries: usize,
}

impl Default for TableLimits {
    fn default() -> Self {
        TableLimits {
            pending_window: DEFAULT_PENDING_WINDOW,
            claim_window: DEFAULT_CLAIM_WINDOW,
            min_retention: DEFAULT_MIN_RETENTION,
            max_retention: DEFAULT_MAX_RETENTION,
            max_pending_clients: DEFAULT_MAX_PENDING_CLIENTS,
            max_responses_per_client: DEFAULT_MAX_RESPONSES_PER_CLIENT,
            max_claims: DEFAULT_MAX_CLAIMS,
            max_process_entries: DEFAULT_MAX_PROCESS_ENTRIES,
            max_entries_per_process: DEFAULT_MAX_ENTRIES_PER_PROCESS,
            max_host_entries: DEFAULT_MAX_HOST_ENTRIES,
        }
    }
}

/// Which map answered a [`DnsTable::lookup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MatchSource {
    /// The process (or an ancestor it inherited from) received the answer.
    Process,
    /// Host-wide fallback: someone on the host received the answer, not
    /// necessarily this process.
    Host,
}

impl MatchSource {
    /// Stable name (`process`, `host`).
    pub fn as_str(self) -> &'static str {
        match self {
            MatchSource::Process => "process",
            MatchSource::Host => "host",
        }
    }
}

/// Result of a [`DnsTable::lookup`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsMatch<'a> {
    /// The name and its CNAME chain.
    pub name: &'a DnsName,
    /// Which map it came from.
    pub source: MatchSource,
}

impl DnsMatch<'_> {
    /// The name the client asked for.
    pub fn domain(&self) -> &str {
        self.name.domain()
    }
}

/// Counters and sizes of a [`DnsTable`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TableStats {
    /// Responses given to [`DnsTable::observe_response`].
    pub responses_observed: u64,
    /// Responses without any address (NXDOMAIN, no A/AAAA, ...).
    pub responses_without_addresses: u64,
    /// Addresses stored in a process map (directly or after a claim).
    pub answers_kept: u64,
    /// Responses routed straight to a process by an existing claim.
    pub claimed_on_arrival: u64,
    /// Parked responses moved to a process by a later claim.
    pub claimed_later: u64,
    /// Parked responses that expired unclaimed (still in the host map).
    pub pending_expired: u64,
    /// Process-map entries evicted because a bound was reached.
    pub process_evictions: u64,
    /// Host-map entries evicted because the bound was reached.
    pub host_evictions: u64,
    /// Parked responses evicted because a bound (clients, or responses per
    /// client) was reached.
    pub pending_evictions: u64,
    /// Claims evicted because the bound was reached.
    pub claim_evictions: u64,
    /// Lookups answered from a process map.
    pub lookups_process: u64,
    /// Lookups answered from the host-wide map.
    pub lookups_host: u64,
    /// Client endpoints with parked responses now.
    pub pending_clients: usize,
    /// Claimed endpoints now.
    pub claims: usize,
    /// Processes with at least one entry now.
    pub processes: usize,
    /// Process-map entries now.
    pub process_entries: usize,
    /// Host-map entries now.
    pub host_entries: usize,
    /// Estimated bytes held by the maps (hash slots, order queues and
    /// parked address lists; the name strings, shared between entries, are
    /// not included).
    pub approx_bytes: usize,
}

/// A map with per-entry expiry, a size bound and first-in-first-out
/// eviction.
#[derive(Debug)]
struct FifoMap<K, V> {
    map: HashMap<K, Slot<V>>,
    /// Keys in insertion order with the sequence number of that insertion;
    /// slots whose sequence no longer matches are stale.
    order: VecDeque<(K, u64)>,
    cap: usize,
    /// Stale order slots tolerated beyond twice the live entries.
    slack: usize,
    next_seq: u64,
}

#[derive(Debug)]
struct Slot<V> {
    value: V,
    expires: u64,
    seq: u64,
}

impl<K: Hash + Eq + Clone, V> FifoMap<K, V> {
    fn new(cap: usize) -> Self {
        Self::with_slack(cap, ORDER_SLACK)
    }

    fn with_slack(cap: usize, slack: usize) -> Self {
        FifoMap {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
            slack,
            next_seq: 0,
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn get(&self, key: &K, now: u64) -> Option<&V> {
        self.map
            .get(key)
            .filter(|s| s.expires > now)
            .map(|s| &s.value)
    }

    fn get_mut(&mut self, key: &K, now: u64) -> Option<&mut V> {
        self.map
            .get_mut(key)
            .filter(|s| s.expires > now)
            .map(|s| &mut s.value)
    }

    fn contains(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    /// Inserts or replaces; returns the entry evicted to make room.
    fn insert(&mut self, key: K, value: V, expires: u64) -> Option<(K, V)> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut evicted = None;
        if !self.map.contains_key(&key) && self.map.len() >= self.cap {
            evicted = self.pop_oldest();
        }
        self.map.insert(
            key.clone(),
            Slot {
                value,
                expires,
                seq,
            },
        );
        self.order.push_back((key, seq));
        if self.order.len() > self.map.len() * 2 + self.slack {
            let map = &self.map;
            self.order
                .retain(|(k, s)| map.get(k).is_some_and(|slot| slot.seq == *s));
        }
        evicted
    }

    /// Sets the expiry of an existing entry.
    fn set_expiry(&mut self, key: &K, expires: u64) {
        if let Some(slot) = self.map.get_mut(key) {
            slot.expires = expires;
        }
    }

    fn pop_oldest(&mut self) -> Option<(K, V)> {
        while let Some((k, seq)) = self.order.pop_front() {
            if self.map.get(&k).is_some_and(|s| s.seq == seq) {
                let slot = self.map.remove(&k)?;
                return Some((k, slot.value));
            }
        }
        None
    }

    fn remove(&mut self, key: &K) -> Option<V> {
        self.map.remove(key).map(|s| s.value)
    }

    /// Removes expired entries, handing each to `gone`.
    fn expire(&mut self, now: u64, mut gone: impl FnMut(&K, V)) {
        let expired: Vec<K> = self
            .map
            .iter()
            .filter(|(_, s)| s.expires <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in expired {
            if let Some(slot) = self.map.remove(&k) {
                gone(&k, slot.value);
            }
        }
        let map = &self.map;
        self.order
            .retain(|(k, s)| map.get(k).is_some_and(|slot| slot.seq == *s));
    }

    /// Estimated bytes of the hash table and order queue themselves.
    fn approx_bytes(&self) -> usize {
        self.map.capacity() * (std::mem::size_of::<(K, Slot<V>)>() + 1)
            + self.order.capacity() * std::mem::size_of::<(K, u64)>()
    }

    fn iter(&self) -> impl Iterator<Item = (&K, &V, u64)> {
        self.map.iter().map(|(k, s)| (k, &s.value, s.expires))
    }

    fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        self.map.retain(|k, s| keep(k, &s.value));
    }
}

/// A response parked under its client endpoint.
#[derive(Debug, Clone)]
struct Parked {
    name: Arc<DnsName>,
    addresses: Vec<Address>,
    /// When it was observed (for the answers' retention).
    observed: u64,
}

/// Key of a claim: the client endpoint, or (unspecified address, port) for
/// a socket bound to the wildcard address.
type ClientKey = SocketAddr;

/// DNS answers per process, see the module documentation.
#[derive(Debug)]
pub struct DnsTable {
    limits: TableLimits,
    pending: FifoMap<ClientKey, Vec<Parked>>,
    /// Ports with parked responses, with their count of parked clients, so
    /// wildcard claims scan only when something may match.
    pending_ports: HashMap<u16, usize>,
    claims: FifoMap<ClientKey, u32>,
    procs: FifoMap<(u32, IpAddr), Arc<DnsName>>,
    /// Per process, its addresses in insertion order (for the per-process
    /// bound).
    by_pid: HashMap<u32, FifoMap<IpAddr, ()>>,
    host: FifoMap<IpAddr, Arc<DnsName>>,
    stats: TableStats,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Maps IPv4-mapped IPv6 addresses (dual-stack sockets) to IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

fn canonical_endpoint(ep: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical(ep.ip()), ep.port())
}

fn wildcard_of(ep: SocketAddr) -> SocketAddr {
    let ip = match ep.ip() {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, ep.port())
}

impl DnsTable {
    /// An empty table.
    pub fn new(limits: TableLimits) -> Self {
        DnsTable {
            pending: FifoMap::new(limits.max_pending_clients),
            pending_ports: HashMap::new(),
            claims: FifoMap::new(limits.max_claims),
            procs: FifoMap::new(limits.max_process_entries),
            by_pid: HashMap::new(),
            host: FifoMap::new(limits.max_host_entries),
            limits,
            stats: TableStats::default(),
        }
    }

    fn expiry(&self, observed: u64, ttl: u32) -> u64 {
        let ttl = Duration::from_secs(u64::from(ttl))
            .clamp(self.limits.min_retention, self.limits.max_retention);
        observed.saturating_add(nanos(ttl))
    }

    /// Records a response. `now` is the current time on the table's clock.
    pub fn observe_response(&mut self, now: u64, response: &DnsResponse) {
        self.stats.responses_observed += 1;
        if response.addresses.is_empty() {
            self.stats.responses_without_addresses += 1;
            return;
        }
        for a in &response.addresses {
            let expires = self.expiry(now, a.ttl);
            if self
                .host
                .insert(canonical(a.ip), Arc::clone(&response.name), expires)
                .is_some()
            {
                self.stats.host_evictions += 1;
            }
        }
        let client = canonical_endpoint(response.client);
        let owner = self
            .claims
            .get(&client, now)
            .or_else(|| self.claims.get(&wildcard_of(client), now))
            .copied();
        let parked = Parked {
            name: Arc::clone(&response.name),
            addresses: response.addresses.clone(),
            observed: now,
        };
        if let Some(pid) = owner {
            self.stats.claimed_on_arrival += 1;
            self.store(pid, &parked);
            return;
        }
        let expires = now.saturating_add(nanos(self.limits.pending_window));
        let per_client = self.limits.max_responses_per_client.max(1);
        if let Some(list) = self.pending.get_mut(&client, now) {
            if list.len() >= per_client {
                list.remove(0);
                self.stats.pending_evictions += 1;
            }
            list.push(parked);
            self.pending.set_expiry(&client, expires);
            return;
        }
        // A stale (expired, not yet swept) entry is replaced here.
        match self.pending.remove(&client) {
            Some(stale) => self.stats.pending_expired += stale.len() as u64,
            None => *self.pending_ports.entry(client.port()).or_insert(0) += 1,
        }
        if let Some((old, list)) = self.pending.insert(client, vec![parked], expires) {
            self.stats.pending_evictions += list.len() as u64;
            self.unpark_port(old.port());
        }
    }

    fn unpark_port(&mut self, port: u16) {
        if let Some(n) = self.pending_ports.get_mut(&port) {
            *n -= 1;
            if *n == 0 {
                self.pending_ports.remove(&port);
            }
        }
    }

    /// Stores the addresses of a response in `pid`'s map.
    fn store(&mut self, pid: u32, parked: &Parked) {
        for a in &parked.addresses {
            let expires = self.expiry(parked.observed, a.ttl);
            self.insert_process_entry(pid, canonical(a.ip), Arc::clone(&parked.name), expires);
            self.stats.answers_kept += 1;
        }
    }

    fn insert_process_entry(&mut self, pid: u32, ip: IpAddr, name: Arc<DnsName>, expires: u64) {
        let per_process = self.limits.max_entries_per_process;
        let index = self
            .by_pid
            .entry(pid)
            .or_insert_with(|| FifoMap::with_slack(per_process, PID_ORDER_SLACK));
        // The index never expires on its own: entries leave with their
        // process-map entry.
        if let Some((victim, ())) = index.insert(ip, (), u64::MAX) {
            self.procs.remove(&(pid, victim));
            self.stats.process_evictions += 1;
        }
        if let Some(((old_pid, old_ip), _)) = self.procs.insert((pid, ip), name, expires) {
            self.stats.process_evictions += 1;
            self.forget_index(old_pid, old_ip);
        }
    }

    fn forget_index(&mut self, pid: u32, ip: IpAddr) {
        if let Some(index) = self.by_pid.get_mut(&pid) {
            index.remove(&ip);
            if index.len() == 0 {
                self.by_pid.remove(&pid);
            }
        }
    }

    /// Binds the client endpoint to `pid`: parked responses of that
    /// endpoint move to the process, and responses arriving within
    /// [`TableLimits::claim_window`] of the last claim go straight to it.
    /// Call it when a process's UDP socket sends to port 53 (or whenever the
    /// engine learns the owner of a UDP socket). A wildcard address (socket
    /// bound to 0.0.0.0 or ::) matches responses to any address on that
    /// port.
    pub fn claim(&mut self, now: u64, client: SocketAddr, pid: u32) {
        let client = canonical_endpoint(client);
        let expires = now.saturating_add(nanos(self.limits.claim_window));
        if self.claims.get(&client, now) == Some(&pid) {
            self.claims.set_expiry(&client, expires);
        } else if self.claims.insert(client, pid, expires).is_some() {
            self.stats.claim_evictions += 1;
        }
        if !self.pending_ports.contains_key(&client.port()) {
            return;
        }
        let keys: Vec<ClientKey> = if client.ip().is_unspecified() {
            self.pending
                .iter()
                .filter(|(k, _, exp)| {
                    *exp > now && k.port() == client.port() && k.is_ipv4() == client.is_ipv4()
                })
                .map(|(k, _, _)| *k)
                .collect()
        } else {
            vec![client]
        };
        for key in keys {
            if !self.pending.contains(&key) {
                continue;
            }
            let live = self.pending.get(&key, now).is_some();
            let Some(list) = self.pending.remove(&key) else {
                continue;
            };
            self.unpark_port(key.port());
            if !live {
                self.stats.pending_expired += list.len() as u64;
                continue;
            }
            for parked in &list {
                self.stats.claimed_later += 1;
                self.store(pid, parked);
            }
        }
    }

    /// Forgets the claim on an endpoint (its socket was closed), so a later
    /// socket reusing the port is not mistaken for the same process.
    pub fn release(&mut self, client: SocketAddr) {
        self.claims.remove(&canonical_endpoint(client));
    }

    /// The name `pid` resolved to reach `ip`, or failing that the host-wide
    /// answer for `ip`.
    pub fn lookup(&self, now: u64, pid: u32, ip: IpAddr) -> Option<DnsMatch<'_>> {
        let ip = canonical(ip);
        if let Some(name) = self.procs.get(&(pid, ip), now) {
            return Some(DnsMatch {
                name,
                source: MatchSource::Process,
            });
        }
        self.host.get(&ip, now).map(|name| DnsMatch {
            name,
            source: MatchSource::Host,
        })
    }

    /// Like [`DnsTable::lookup`], also counting which map answered.
    pub fn lookup_counted(&mut self, now: u64, pid: u32, ip: IpAddr) -> Option<DnsMatch<'_>> {
        let source = self.lookup(now, pid, ip).map(|m| m.source);
        match source {
            Some(MatchSource::Process) => self.stats.lookups_process += 1,
            Some(MatchSource::Host) => self.stats.lookups_host += 1,
            None => {}
        }
        self.lookup(now, pid, ip)
    }

    /// A process forked: the child inherits the parent's live answers (a
    /// copy; later answers of either are their own). Call it for processes,
    /// not threads (threads share their process's map).
    pub fn fork(&mut self, now: u64, parent: u32, child: u32) {
        let Some(ips) = self.by_pid.get(&parent) else {
            return;
        };
        let inherited: Vec<(IpAddr, Arc<DnsName>, u64)> = ips
            .iter()
            .filter_map(|(ip, (), _)| {
                let slot = self.procs.map.get(&(parent, *ip))?;
                (slot.expires > now).then(|| (*ip, Arc::clone(&slot.value), slot.expires))
            })
            .collect();
        for (ip, name, expires) in inherited {
            self.insert_process_entry(child, ip, name, expires);
        }
    }

    /// A process exited: its answers and the claims pointing at it go.
    pub fn on_exit(&mut self, pid: u32) {
        if let Some(index) = self.by_pid.remove(&pid) {
            for (ip, (), _) in index.iter() {
                self.procs.remove(&(pid, *ip));
            }
        }
        if self.claims.len() > 0 {
            self.claims.retain(|_, owner| *owner != pid);
        }
    }

    /// Drops everything that expired by `now`. Call it periodically (every
    /// second or so); lookups ignore expired entries in between.
    pub fn expire(&mut self, now: u64) {
        let mut pending_expired = 0u64;
        let mut freed_ports = Vec::new();
        self.pending.expire(now, |k, list| {
            pending_expired += list.len() as u64;
            freed_ports.push(k.port());
        });
        self.stats.pending_expired += pending_expired;
        for port in freed_ports {
            self.unpark_port(port);
        }
        self.claims.expire(now, |_, _| {});
        let mut gone = Vec::new();
        self.procs
            .expire(now, |(pid, ip), _| gone.push((*pid, *ip)));
        for (pid, ip) in gone {
            self.forget_index(pid, ip);
        }
        self.host.expire(now, |_, _| {});
    }

    /// Counters and current sizes. Walks the parked responses (bounded by
    /// the limits) to size them.
    pub fn stats(&self) -> TableStats {
        let parked: usize = self
            .pending
            .iter()
            .map(|(_, list, _)| {
                list.capacity() * std::mem::size_of::<Parked>()
                    + list
                        .iter()
                        .map(|p| p.addresses.capacity() * std::mem::size_of::<Address>())
                        .sum::<usize>()
            })
            .sum();
        let index: usize = self
            .by_pid
            .values()
            .map(|index| std::mem::size_of::<(u32, FifoMap<IpAddr, ()>)>() + index.approx_bytes())
            .sum();
        TableStats {
            approx_bytes: self.pending.approx_bytes()
                + parked
                + self.claims.approx_bytes()
                + self.procs.approx_bytes()
                + index
                + self.host.approx_bytes(),
            pending_clients: self.pending.len(),
            claims: self.claims.len(),
            processes: self.by_pid.len(),
            process_entries: self.procs.len(),
            host_entries: self.host.len(),
            ..self.stats.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_queue_stays_bounded_and_evicts_the_oldest_live_key() {
        let mut m: FifoMap<u32, ()> = FifoMap::new(4);
        for i in 0..10_000u64 {
            assert!(m.insert((i % 3) as u32, (), i + 100).is_none());
        }
        assert_eq!(m.len(), 3);
        assert!(
            m.order.len() <= 3 * 2 + ORDER_SLACK + 1,
            "order queue grew to {}",
            m.order.len()
        );
        assert!(m.insert(10, (), 0).is_none());
        // Keys were last written at i = 9997 (1), 9998 (2), 9999 (0).
        assert_eq!(m.insert(11, (), 0).map(|(k, _)| k), Some(1));
        assert_eq!(m.insert(12, (), 0).map(|(k, _)| k), Some(2));
        m.expire(50, |_, _| {});
        assert_eq!(
            m.len(),
            1,
            "entries expiring at 0 are gone, key 0 (expiry 10099) stays"
        );
        assert!(m.get(&0, 50).is_some());
        assert!(
            m.get(&0, 10_099).is_none(),
            "an entry is dead at its expiry time"
        );
    }
}
