//! AF_PACKET DNS capture on the loopback interface. Needs root (CAP_NET_RAW
//! and CAP_NET_ADMIN); fails, never skips, without it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sockscope::config::DnsConfig;
use sockscope::enrich::dns::{DnsCapture, DnsResponse, DropReason};

/// How long to wait for a sent datagram to come out of the capture.
const DEADLINE: Duration = Duration::from_secs(5);
/// How long to keep reading after the expected response, to catch copies.
const LINGER: Duration = Duration::from_millis(500);

fn config(interface: &str) -> DnsConfig {
    let mut cfg = DnsConfig::default();
    cfg.af_packet.interface = interface.to_string();
    cfg
}

fn open_capture_on(interface: &str) -> DnsCapture {
    DnsCapture::open(&config(interface)).unwrap_or_else(|e| {
        panic!(
            "opening the AF_PACKET capture on {interface} failed (this test must run as root): {e}"
        )
    })
}

fn open_capture() -> DnsCapture {
    open_capture_on("lo")
}

/// A per-run unique tag, so concurrent runs and other traffic on lo are
/// told apart.
fn unique() -> u32 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::process::id().wrapping_mul(2_654_435_761) ^ nanos
}

/// A loopback server address for this run: 127.53.x.y (all of 127/8 is
/// local), so port 53 is free even if a resolver listens on 127.0.0.1.
fn server_v4(tag: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        53,
        (tag >> 8) as u8,
        1 + (tag % 254) as u8,
    ))
}

fn enc_name(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// A response to `name` with a CNAME to `alias` and the given addresses.
fn dns_response(id: u16, name: &str, alias: &str, ips: &[IpAddr]) -> Vec<u8> {
    let mut m = Vec::new();
    for v in [id, 0x8180, 1, 1 + ips.len() as u16, 0, 0] {
        m.extend(v.to_be_bytes());
    }
    m.extend(enc_name(name));
    m.extend([0, 1, 0, 1]);
    // name CNAME alias
    m.extend([0xC0, 12, 0, 5, 0, 1, 0, 0, 0, 60]);
    let alias_wire = enc_name(alias);
    let alias_at = m.len() + 2;
    m.extend((alias_wire.len() as u16).to_be_bytes());
    m.extend(alias_wire);
    for ip in ips {
        let (ty, data) = match ip {
            IpAddr::V4(a) => (1u16, a.octets().to_vec()),
            IpAddr::V6(a) => (28u16, a.octets().to_vec()),
        };
        m.extend([0xC0 | (alias_at >> 8) as u8, alias_at as u8]);
        m.extend(ty.to_be_bytes());
        m.extend([0, 1, 0, 0, 1, 44]);
        m.extend((data.len() as u16).to_be_bytes());
        m.extend(data);
    }
    m
}

/// Reads from the capture until `done` says so or the deadline passes;
/// returns the responses sent by `server`.
fn collect(
    cap: &mut DnsCapture,
    server: IpAddr,
    wait: Duration,
    mut done: impl FnMut(&[DnsResponse]) -> bool,
) -> Vec<DnsResponse> {
    let start = Instant::now();
    let mut got = Vec::new();
    while start.elapsed() < wait && !done(&got) {
        if let Some(r) = cap.next_response().expect("receive on the capture socket") {
            if r.server.ip() == server {
                got.push(r);
            }
        }
    }
    got
}

fn run_roundtrip(interface: &str, server_ip: IpAddr, client_ip: IpAddr, answer: IpAddr) {
    let tag = unique();
    let mut cap = open_capture_on(interface);
    let client = UdpSocket::bind(SocketAddr::new(client_ip, 0)).expect("bind client socket");
    let client_addr = client.local_addr().unwrap();
    let dns_server = UdpSocket::bind(SocketAddr::new(server_ip, 53))
        .unwrap_or_else(|e| panic!("bind {server_ip}:53 (needs root): {e}"));
    let other = UdpSocket::bind(SocketAddr::new(server_ip, 0)).expect("bind non-DNS socket");

    let name = format!("t{tag:08x}.sockscope.test");
    let alias = format!("edge-{tag:08x}.cdn.test");
    let decoy_id = (tag & 0xFFFF) as u16;
    let real_id = decoy_id.wrapping_add(1);
    // The same kind of bytes from a port other than 53 must not pass the
    // kernel filter, nor must plain non-DNS payloads.
    other
        .send_to(
            &dns_response(decoy_id, &name, &alias, &[answer]),
            client_addr,
        )
        .expect("send decoy");
    other
        .send_to(b"not dns at all", client_addr)
        .expect("send non-DNS");
    dns_server
        .send_to(
            &dns_response(real_id, &name, &alias, &[answer]),
            client_addr,
        )
        .expect("send response");

    let got = collect(&mut cap, server_ip, DEADLINE, |g| {
        g.iter().any(|r| r.id == real_id)
    });
    // Give a duplicate (the outgoing copy on lo) a moment to show up too.
    let extra = collect(&mut cap, server_ip, LINGER, |_| false);
    let all: Vec<&DnsResponse> = got.iter().chain(extra.iter()).collect();

    let ours: Vec<&&DnsResponse> = all.iter().filter(|r| r.id == real_id).collect();
    assert_eq!(ours.len(), 1, "exactly one copy of the response: {all:#?}");
    let r = ours[0];
    assert_eq!(r.server, SocketAddr::new(server_ip, 53));
    assert_eq!(r.client, client_addr);
    assert_eq!(r.name.domain(), name);
    assert_eq!(
        r.name.chain().collect::<Vec<_>>(),
        vec![name.as_str(), alias.as_str()]
    );
    assert_eq!(r.addresses.len(), 1);
    assert_eq!(r.addresses[0].ip, answer);
    // The CNAME's TTL (60) is below the address record's (300).
    assert_eq!(r.addresses[0].ttl, 60);
    assert!(!r.truncated);
    assert!(
        all.iter().all(|r| r.id != decoy_id),
        "decoy from a non-53 port was delivered"
    );

    let stats = cap.counters().snapshot();
    assert_eq!(
        stats.dropped(DropReason::NotDnsPort),
        0,
        "non-DNS traffic reached user space: the kernel filter did not apply"
    );
    assert_eq!(
        stats.dropped(DropReason::Outgoing),
        0,
        "outgoing copies reached user space"
    );
    assert!(stats.responses_parsed >= 1);
    cap.refresh_kernel_stats().expect("PACKET_STATISTICS");
    let stats = cap.counters().snapshot();
    assert!(
        stats.kernel_packets >= 1,
        "kernel counted no packets: {stats:?}"
    );
    assert_eq!(stats.kernel_drops, 0);
}

#[test]
#[ignore = "needs root and tracefs: tests/run-all runs it (cargo test -- --include-ignored)"]
fn captures_ipv4_dns_response_on_lo_and_filters_the_rest_in_kernel() {
    let tag = unique();
    run_roundtrip(
        "lo",
        server_v4(tag),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 77)),
    );
}

#[test]
#[ignore = "needs root and tracefs: tests/run-all runs it (cargo test -- --include-ignored)"]
fn captures_ipv6_dns_response_on_lo() {
    run_roundtrip(
        "lo",
        IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V6("2001:db8::77".parse().unwrap()),
    );
}

/// The default interface, `any`, sees lo too (outgoing and incoming copies;
/// only the incoming one may come through).
#[test]
#[ignore = "needs root and tracefs: tests/run-all runs it (cargo test -- --include-ignored)"]
fn captures_on_the_any_interface() {
    let tag = unique().rotate_left(8);
    run_roundtrip(
        "any",
        server_v4(tag),
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 78)),
    );
}

#[test]
#[ignore = "needs root and tracefs: tests/run-all runs it (cargo test -- --include-ignored)"]
fn capture_thread_feeds_the_channel_and_stops() {
    let tag = unique();
    let cap = open_capture();
    let (thread, rx) = cap.spawn(16).expect("spawn capture thread");
    let server_ip = server_v4(tag.rotate_left(16));
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dns_server = UdpSocket::bind(SocketAddr::new(server_ip, 53))
        .unwrap_or_else(|e| panic!("bind {server_ip}:53 (needs root): {e}"));
    let id = (tag >> 3) as u16;
    let name = format!("thread-{tag:08x}.sockscope.test");
    dns_server
        .send_to(
            &dns_response(
                id,
                &name,
                "a.test",
                &[IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))],
            ),
            client.local_addr().unwrap(),
        )
        .unwrap();
    let start = Instant::now();
    let mut found = None;
    while start.elapsed() < DEADLINE && found.is_none() {
        if let Ok(r) = rx.recv_timeout(Duration::from_millis(100)) {
            if r.server.ip() == server_ip && r.id == id {
                found = Some(r);
            }
        }
    }
    let r = found.expect("response delivered through the channel");
    assert_eq!(r.name.domain(), name);
    assert!(thread.counters().snapshot().responses_parsed >= 1);
    let begun = Instant::now();
    thread.stop().expect("capture thread ends cleanly");
    assert!(
        begun.elapsed() < DEADLINE,
        "stop took {:?}",
        begun.elapsed()
    );
}
