//! The DNS table: answers observed and claimed by processes, retention,
//! bounds and lookups.

use std::sync::Arc;
use std::time::Duration;

use super::*;

const SEC: u64 = 1_000_000_000;

fn response(client: &str, name: &str, ips: &[&str], ttl: u32) -> DnsResponse {
    DnsResponse {
        client: ep(client),
        server: ep("192.0.2.53:53"),
        id: 1,
        rcode: 0,
        qtype: TYPE_A,
        name: Arc::new(DnsName::new(vec![name.to_string()])),
        addresses: ips
            .iter()
            .map(|s| Address {
                ip: s.parse().unwrap(),
                ttl,
            })
            .collect(),
        truncated: false,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn domain(t: &DnsTable, now: u64, pid: u32, addr: &str) -> Option<(String, MatchSource)> {
    t.lookup(now, pid, ip(addr))
        .map(|m| (m.domain().to_string(), m.source))
}

#[test]
fn observe_then_claim_moves_answers_to_the_process() {
    let mut t = DnsTable::new(TableLimits::default());
    t.observe_response(
        0,
        &response("192.0.2.2:40000", "a.test", &["10.0.0.1", "10.0.0.2"], 300),
    );
    assert_eq!(
        domain(&t, SEC, 100, "10.0.0.1"),
        Some(("a.test".into(), MatchSource::Host))
    );
    t.claim(SEC, ep("192.0.2.2:40000"), 100);
    assert_eq!(
        domain(&t, 2 * SEC, 100, "10.0.0.1"),
        Some(("a.test".into(), MatchSource::Process))
    );
    assert_eq!(
        domain(&t, 2 * SEC, 100, "10.0.0.2"),
        Some(("a.test".into(), MatchSource::Process))
    );
    assert_eq!(
        domain(&t, 2 * SEC, 200, "10.0.0.1"),
        Some(("a.test".into(), MatchSource::Host))
    );
    assert_eq!(domain(&t, 2 * SEC, 100, "10.0.0.3"), None);
    let s = t.stats();
    assert_eq!(
        (s.claimed_later, s.answers_kept, s.pending_clients),
        (1, 2, 0)
    );
    assert_eq!((s.processes, s.process_entries, s.host_entries), (1, 2, 2));
}

#[test]
fn claim_then_observe_goes_straight_to_the_process() {
    let mut t = DnsTable::new(TableLimits::default());
    t.claim(0, ep("192.0.2.2:40000"), 7);
    t.observe_response(
        SEC,
        &response("192.0.2.2:40000", "b.test", &["10.0.0.9"], 30),
    );
    assert_eq!(
        domain(&t, SEC, 7, "10.0.0.9"),
        Some(("b.test".into(), MatchSource::Process))
    );
    assert_eq!(t.stats().claimed_on_arrival, 1);
    // After the claim window, responses are parked again.
    t.observe_response(
        20 * SEC,
        &response("192.0.2.2:40000", "c.test", &["10.0.0.10"], 30),
    );
    assert_eq!(
        domain(&t, 20 * SEC, 7, "10.0.0.10"),
        Some(("c.test".into(), MatchSource::Host))
    );
    assert_eq!(t.stats().pending_clients, 1);
}

#[test]
fn process_answer_wins_over_host_answer() {
    let mut t = DnsTable::new(TableLimits::default());
    t.claim(0, ep("192.0.2.2:1000"), 1);
    t.observe_response(
        0,
        &response("192.0.2.2:1000", "mine.test", &["10.1.1.1"], 60),
    );
    // Another client later resolves a different name to the same address.
    t.observe_response(
        SEC,
        &response("192.0.2.2:2000", "theirs.test", &["10.1.1.1"], 60),
    );
    assert_eq!(
        domain(&t, 2 * SEC, 1, "10.1.1.1"),
        Some(("mine.test".into(), MatchSource::Process))
    );
    assert_eq!(
        domain(&t, 2 * SEC, 2, "10.1.1.1"),
        Some(("theirs.test".into(), MatchSource::Host))
    );
    assert!(t.lookup_counted(2 * SEC, 1, ip("10.1.1.1")).is_some());
    assert!(t.lookup_counted(2 * SEC, 2, ip("10.1.1.1")).is_some());
    assert!(t.lookup_counted(2 * SEC, 2, ip("10.9.9.9")).is_none());
    let s = t.stats();
    assert_eq!((s.lookups_process, s.lookups_host), (1, 1));
}

#[test]
fn wildcard_and_mapped_claims() {
    let mut t = DnsTable::new(TableLimits::default());
    t.observe_response(0, &response("192.0.2.2:5000", "w.test", &["10.2.2.2"], 60));
    t.observe_response(
        0,
        &response("[2001:db8::2]:5000", "w6.test", &["2001:db8::99"], 60),
    );
    t.claim(SEC, ep("0.0.0.0:5000"), 42);
    assert_eq!(
        domain(&t, SEC, 42, "10.2.2.2"),
        Some(("w.test".into(), MatchSource::Process))
    );
    assert_eq!(
        domain(&t, SEC, 42, "2001:db8::99"),
        Some(("w6.test".into(), MatchSource::Host)),
        "a v4 wildcard does not claim v6 responses"
    );
    // A dual-stack socket reports v4 peers as v4-mapped addresses.
    t.claim(SEC, ep("[::ffff:192.0.2.2]:6000"), 43);
    t.observe_response(
        SEC,
        &response("192.0.2.2:6000", "m.test", &["10.3.3.3"], 60),
    );
    assert_eq!(
        domain(&t, SEC, 43, "::ffff:10.3.3.3"),
        Some(("m.test".into(), MatchSource::Process))
    );
}

#[test]
fn retention_is_clamped_ttl() {
    let limits = TableLimits {
        min_retention: Duration::from_secs(60),
        max_retention: Duration::from_secs(600),
        ..TableLimits::default()
    };
    let mut t = DnsTable::new(limits);
    t.claim(0, ep("192.0.2.2:1"), 1);
    t.observe_response(0, &response("192.0.2.2:1", "short.test", &["10.0.0.1"], 5));
    t.observe_response(0, &response("192.0.2.2:1", "mid.test", &["10.0.0.2"], 120));
    t.observe_response(
        0,
        &response("192.0.2.2:1", "long.test", &["10.0.0.3"], 86_400),
    );
    assert!(domain(&t, 59 * SEC, 1, "10.0.0.1").is_some());
    assert!(domain(&t, 61 * SEC, 1, "10.0.0.1").is_none());
    assert!(domain(&t, 119 * SEC, 1, "10.0.0.2").is_some());
    assert!(domain(&t, 121 * SEC, 1, "10.0.0.2").is_none());
    assert!(domain(&t, 599 * SEC, 1, "10.0.0.3").is_some());
    assert!(domain(&t, 601 * SEC, 1, "10.0.0.3").is_none());
    t.expire(121 * SEC);
    let s = t.stats();
    assert_eq!((s.process_entries, s.host_entries, s.processes), (1, 1, 1));
    assert!(s.approx_bytes > 0);
    t.expire(601 * SEC);
    let s = t.stats();
    assert_eq!(
        (s.process_entries, s.host_entries, s.processes, s.claims),
        (0, 0, 0, 0)
    );
}

#[test]
fn unclaimed_responses_expire_from_the_pending_window() {
    let mut t = DnsTable::new(TableLimits::default());
    t.observe_response(0, &response("192.0.2.2:1", "late.test", &["10.0.0.1"], 300));
    t.claim(11 * SEC, ep("192.0.2.2:1"), 5);
    assert_eq!(
        domain(&t, 11 * SEC, 5, "10.0.0.1"),
        Some(("late.test".into(), MatchSource::Host))
    );
    assert_eq!(t.stats().pending_expired, 1);
    t.observe_response(
        20 * SEC,
        &response("192.0.2.2:2", "gone.test", &["10.0.0.2"], 300),
    );
    t.expire(31 * SEC);
    let s = t.stats();
    assert_eq!((s.pending_expired, s.pending_clients), (2, 0));
}

#[test]
fn fork_inherits_and_exit_forgets() {
    let mut t = DnsTable::new(TableLimits::default());
    t.claim(0, ep("192.0.2.2:1"), 10);
    t.observe_response(0, &response("192.0.2.2:1", "p.test", &["10.0.0.1"], 300));
    t.fork(SEC, 10, 11);
    assert_eq!(
        domain(&t, SEC, 11, "10.0.0.1"),
        Some(("p.test".into(), MatchSource::Process))
    );
    // Later answers of the parent are its own.
    t.observe_response(
        2 * SEC,
        &response("192.0.2.2:1", "q.test", &["10.0.0.2"], 300),
    );
    assert_eq!(
        domain(&t, 2 * SEC, 11, "10.0.0.2").map(|d| d.1),
        Some(MatchSource::Host)
    );
    t.on_exit(10);
    assert_eq!(
        domain(&t, 3 * SEC, 10, "10.0.0.1").map(|d| d.1),
        Some(MatchSource::Host)
    );
    assert_eq!(
        domain(&t, 3 * SEC, 11, "10.0.0.1").map(|d| d.1),
        Some(MatchSource::Process)
    );
    // The exited process's claim is gone: new responses are parked.
    t.observe_response(
        3 * SEC,
        &response("192.0.2.2:1", "r.test", &["10.0.0.3"], 300),
    );
    let s = t.stats();
    assert_eq!((s.claims, s.pending_clients, s.processes), (0, 1, 1));
}

#[test]
fn release_forgets_the_claim() {
    let mut t = DnsTable::new(TableLimits::default());
    t.claim(0, ep("192.0.2.2:1"), 10);
    t.release(ep("192.0.2.2:1"));
    t.observe_response(0, &response("192.0.2.2:1", "x.test", &["10.0.0.1"], 300));
    assert_eq!(
        domain(&t, 0, 10, "10.0.0.1").map(|d| d.1),
        Some(MatchSource::Host)
    );
}

#[test]
fn bounds_are_enforced_and_counted() {
    let limits = TableLimits {
        max_entries_per_process: 4,
        max_process_entries: 6,
        max_host_entries: 5,
        max_pending_clients: 2,
        max_responses_per_client: 2,
        ..TableLimits::default()
    };
    let mut t = DnsTable::new(limits);
    t.claim(0, ep("192.0.2.2:1"), 1);
    for i in 0..6u64 {
        let a = format!("10.0.0.{i}");
        // Later addresses get longer TTLs, so the per-process eviction
        // (earliest expiry) drops the first ones.
        t.observe_response(
            i,
            &response("192.0.2.2:1", "n.test", &[a.as_str()], 100 + i as u32 * 100),
        );
    }
    let s = t.stats();
    assert_eq!((s.process_entries, s.host_entries), (4, 5));
    assert_eq!((s.process_evictions, s.host_evictions), (2, 1));
    assert!(domain(&t, 10, 1, "10.0.0.1").map(|d| d.1) != Some(MatchSource::Process));
    assert_eq!(
        domain(&t, 10, 1, "10.0.0.5").map(|d| d.1),
        Some(MatchSource::Process)
    );

    // The global bound evicts the oldest entries of any process.
    t.claim(0, ep("192.0.2.2:2"), 2);
    t.observe_response(
        10,
        &response(
            "192.0.2.2:2",
            "o.test",
            &["10.1.0.1", "10.1.0.2", "10.1.0.3"],
            300,
        ),
    );
    let s = t.stats();
    assert_eq!(s.process_entries, 6);
    assert_eq!(s.process_evictions, 3);
    assert_eq!(s.processes, 2);

    // Pending: two clients, two responses each.
    for port in 10..13u16 {
        for k in 0..3 {
            t.observe_response(
                20,
                &response(
                    &format!("192.0.2.2:{port}"),
                    "p.test",
                    &["10.2.0.1"],
                    300 + k,
                ),
            );
        }
    }
    let s = t.stats();
    assert_eq!(s.pending_clients, 2);
    // 3 clients x 1 per-client overflow + the first client's 2 responses.
    assert_eq!(s.pending_evictions, 5);
}

#[test]
fn responses_without_addresses_are_counted_not_stored() {
    let mut t = DnsTable::new(TableLimits::default());
    t.observe_response(0, &response("192.0.2.2:1", "nx.test", &[], 0));
    let s = t.stats();
    assert_eq!(
        (
            s.responses_observed,
            s.responses_without_addresses,
            s.pending_clients
        ),
        (1, 1, 0)
    );
}
