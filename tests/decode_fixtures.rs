//! Decoding of raw records captured in VMs running each supported kernel
//! (tests/fixtures/<kernel>/), checked against the traffic that produced
//! them: the packets tcpdump saw on lo, the listener and UDP addresses.

use std::collections::HashMap;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;

use sockscope::decode::{Decoder, DecoderKind, EventDesc, IpFamily};
use sockscope::model::{EventKind, PacketDir, RawSample, SockOp, Transport};

/// Kernels whose fixtures must be present.
const KERNELS: [&str; 4] = ["5.10", "6.1", "6.12", "7.2"];

fn kind_of(name: &str) -> (DecoderKind, bool) {
    use DecoderKind as K;
    let act = |transport, op, peer| K::SockActivity {
        transport,
        op,
        peer,
    };
    let pkt = |dir, family| K::Packet { dir, family };
    match name {
        "sock_create" => (K::SockCreate, true),
        "tcp_connect" => (K::TcpConnect, true),
        "tcp_accept" => (K::TcpAccept, true),
        "sock_close" => (K::SockClose, true),
        "tcp_send" => (act(Transport::Tcp, SockOp::Send, None), true),
        "tcp_recv" => (act(Transport::Tcp, SockOp::Recv, None), true),
        "udp_send" => (act(Transport::Udp, SockOp::Send, Some(IpFamily::V4)), true),
        "udp_recv" => (act(Transport::Udp, SockOp::Recv, None), true),
        "udp6_send" => (act(Transport::Udp, SockOp::Send, Some(IpFamily::V6)), true),
        "udp6_recv" => (act(Transport::Udp, SockOp::Recv, None), true),
        "ip_out" => (pkt(PacketDir::Egress, IpFamily::V4), false),
        "ip6_out" => (pkt(PacketDir::Egress, IpFamily::V6), false),
        "ip_in" => (pkt(PacketDir::Ingress, IpFamily::V4), false),
        "ip6_in" => (pkt(PacketDir::Ingress, IpFamily::V6), false),
        "creds" => (K::Creds, true),
        "sched_process_exec" => (K::Exec, true),
        "sched_process_fork" => (K::Fork, true),
        "sched_process_exit" => (K::Exit, true),
        other => panic!("fixture event {other} has no decoder"),
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

type Pkt = (u8, SocketAddr, SocketAddr, u32);

fn check_kernel(kernel: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(kernel);
    assert!(dir.is_dir(), "missing fixtures {}", dir.display());
    let mut names = Vec::new();
    let mut formats = Vec::new();
    for e in fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "format") {
            names.push(p.file_stem().unwrap().to_string_lossy().to_string());
            formats.push(fs::read_to_string(&p).unwrap());
        }
    }
    assert_eq!(names.len(), 18, "{kernel}: all probe formats recorded");
    let descs: Vec<EventDesc> = names
        .iter()
        .zip(&formats)
        .map(|(n, f)| {
            let (kind, task_context) = kind_of(n);
            EventDesc {
                kind,
                task_context,
                format: f,
            }
        })
        .collect();
    let dec = Decoder::new(&descs).unwrap_or_else(|e| panic!("{kernel}: {e}"));
    let index: HashMap<&str, u32> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as u32))
        .collect();

    let mut egress: Vec<Pkt> = Vec::new();
    let mut ingress: Vec<Pkt> = Vec::new();
    let mut events = Vec::new();
    let records = fs::read_to_string(dir.join("records.txt")).unwrap();
    for line in records
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let data = hex(parts[3]);
        if parts[0] == "ip_in" || parts[0] == "ip6_in" {
            // Ingress runs in softirq on every kernel: the reason packet
            // probes never carry a task.
            assert_ne!(
                data[2] & sockscope::decode::TRACE_FLAG_SOFTIRQ,
                0,
                "{kernel}: ingress record without the softirq flag"
            );
        }
        let pid: u32 = parts[2].parse().unwrap();
        let s = RawSample {
            event: index[parts[0]],
            time: 0,
            cpu: parts[1].parse().unwrap(),
            pid,
            tid: pid,
            data: &data,
        };
        let Some(ev) = dec
            .decode(&s)
            .unwrap_or_else(|e| panic!("{kernel}: {line}: {e}"))
        else {
            continue;
        };
        if let EventKind::Packet(p) = &ev.kind {
            assert_eq!(ev.task, None, "{kernel}: packets carry no task");
            let t = (p.transport.number(), p.src, p.dst, p.ip_len);
            match p.dir {
                PacketDir::Egress => egress.push(t),
                PacketDir::Ingress => ingress.push(t),
            }
        }
        events.push(ev);
    }
    let mut pcap: Vec<Pkt> = fs::read_to_string(dir.join("pcap.txt"))
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let p: Vec<&str> = l.split_whitespace().collect();
            (
                p[0].parse().unwrap(),
                p[1].parse().unwrap(),
                p[2].parse().unwrap(),
                p[3].parse().unwrap(),
            )
        })
        .collect();
    assert!(pcap.len() >= 20, "{kernel}: oracle has the test traffic");
    pcap.sort();
    egress.sort();
    ingress.sort();
    assert_eq!(egress, pcap, "{kernel}: egress packets = tcpdump");
    assert_eq!(ingress, pcap, "{kernel}: ingress packets = tcpdump");

    let traffic = fs::read_to_string(dir.join("traffic.txt")).unwrap();
    let mut families = 0;
    for line in traffic.lines().filter(|l| l.starts_with("tcp ")) {
        let p: Vec<&str> = line.split_whitespace().collect();
        let listener: SocketAddr = p[1].parse().unwrap();
        let (usend, urecv): (SocketAddr, SocketAddr) =
            (p[3].parse().unwrap(), p[4].parse().unwrap());
        let connect = events
            .iter()
            .find_map(|e| match e.kind {
                EventKind::TcpConnect { local, remote, .. } if remote == listener => {
                    assert!(e.task.is_some(), "{kernel}: connect has a task");
                    Some(local)
                }
                _ => None,
            })
            .unwrap_or_else(|| panic!("{kernel}: connect to {listener}"));
        assert!(
            events.iter().any(|e| matches!(e.kind,
                EventKind::TcpAccept { local, remote, .. } if local == listener && remote == connect)),
            "{kernel}: accept on {listener} from {connect}"
        );
        assert!(
            events.iter().any(|e| matches!(e.kind,
                EventKind::SockActivity { op: SockOp::Send, transport: Transport::Udp, peer: Some(p), .. } if p == urecv)),
            "{kernel}: UDP send to {urecv}"
        );
        assert!(
            events.iter().any(|e| matches!(e.kind,
                EventKind::SockActivity { op: SockOp::Send, transport: Transport::Udp, peer: Some(p), .. } if p == usend)),
            "{kernel}: UDP reply to {usend}"
        );
        families += 1;
    }
    assert_eq!(families, 2, "{kernel}: IPv4 and IPv6 traffic recorded");
    assert!(
        events.iter().any(
            |e| matches!(&e.kind, EventKind::Exec { filename, .. } if filename == "/bin/busybox")
        ),
        "{kernel}: exec of busybox"
    );
    assert!(events.iter().any(|e| matches!(e.kind, EventKind::Creds(_))));
    assert!(events
        .iter()
        .any(|e| matches!(e.kind, EventKind::SockClose { .. })));
    assert!(events.iter().any(|e| matches!(
        e.kind,
        EventKind::SockCreate {
            transport: Some(Transport::Udp),
            ..
        }
    )));
    assert!(dec.error_counts().iter().all(|(_, n)| *n == 0));
}

#[test]
fn fixtures_decode_to_the_recorded_traffic() {
    for k in KERNELS {
        check_kernel(k);
    }
}
