//! Decoder behaviour on hand-built and corrupted records, using formats
//! recorded on Debian 6.1.

use std::net::SocketAddr;

use sockscope::decode::{DecodeError, DecodeErrorKind, Decoder, DecoderKind, EventDesc, IpFamily};
use sockscope::model::{EventKind, PacketDir, RawSample, SockOp, Transport};

const IP_IN: &str = include_str!("fixtures/6.1/ip_in.format");
const IP6_OUT: &str = include_str!("fixtures/6.1/ip6_out.format");
const CONNECT: &str = include_str!("fixtures/6.1/tcp_connect.format");
const UDP6_SEND: &str = include_str!("fixtures/6.1/udp6_send.format");
const EXEC: &str = include_str!("fixtures/6.1/sched_process_exec.format");

fn id(format: &str) -> u16 {
    sockscope::decode::Format::parse(format).unwrap().id as u16
}

fn decoder() -> Decoder {
    Decoder::new(&[
        EventDesc {
            kind: DecoderKind::Packet {
                dir: PacketDir::Ingress,
                family: IpFamily::V4,
            },
            task_context: false,
            format: IP_IN,
        },
        EventDesc {
            kind: DecoderKind::Packet {
                dir: PacketDir::Egress,
                family: IpFamily::V6,
            },
            task_context: false,
            format: IP6_OUT,
        },
        EventDesc {
            kind: DecoderKind::TcpConnect,
            task_context: true,
            format: CONNECT,
        },
        EventDesc {
            kind: DecoderKind::SockActivity {
                transport: Transport::Udp,
                op: SockOp::Send,
                peer: Some(IpFamily::V6),
            },
            task_context: true,
            format: UDP6_SEND,
        },
        EventDesc {
            kind: DecoderKind::Exec,
            task_context: true,
            format: EXEC,
        },
    ])
    .unwrap()
}

fn field(format: &str, name: &str) -> usize {
    let f = sockscope::decode::Format::parse(format).unwrap();
    f.field(name).unwrap().offset as usize
}

fn record(format: &str, size: usize, flags: u8) -> Vec<u8> {
    let mut r = vec![0u8; size];
    r[0..2].copy_from_slice(&id(format).to_le_bytes());
    r[2] = flags;
    r
}

fn sample(event: u32, data: &[u8]) -> RawSample<'_> {
    RawSample {
        event,
        time: 5,
        cpu: 1,
        pid: 100,
        tid: 101,
        data,
    }
}

/// IPv4 TCP packet with `ihl` 32-bit words of header.
fn ip_in_record(ihl: u8, proto: u8, frag: u16) -> Vec<u8> {
    let mut r = record(IP_IN, 128, 0);
    let len = field(IP_IN, "len");
    r[len..len + 4].copy_from_slice(&1500u32.to_le_bytes());
    let h = field(IP_IN, "hdr");
    r[h] = 0x40 | ihl;
    r[h + 6..h + 8].copy_from_slice(&frag.to_be_bytes());
    r[h + 9] = proto;
    r[h + 12..h + 16].copy_from_slice(&[10, 0, 0, 1]);
    r[h + 16..h + 20].copy_from_slice(&[10, 0, 0, 2]);
    let l4 = h + usize::from(ihl) * 4;
    r[l4..l4 + 2].copy_from_slice(&443u16.to_be_bytes());
    r[l4 + 2..l4 + 4].copy_from_slice(&50000u16.to_be_bytes());
    r
}

#[test]
fn ipv4_packet_with_options_takes_ports_after_options() {
    let d = decoder();
    for ihl in [5u8, 6, 15] {
        let r = ip_in_record(ihl, 6, 0x4000);
        let ev = d.decode(&sample(0, &r)).unwrap().unwrap();
        let EventKind::Packet(p) = ev.kind else {
            panic!()
        };
        assert_eq!(p.src, "10.0.0.1:443".parse::<SocketAddr>().unwrap());
        assert_eq!(p.dst, "10.0.0.2:50000".parse::<SocketAddr>().unwrap());
        assert_eq!(p.ip_len, 1500);
        assert_eq!(p.dir, PacketDir::Ingress);
        assert_eq!(ev.task, None);
    }
}

#[test]
fn non_tcp_udp_is_ignored_and_fragments_and_bad_headers_are_errors() {
    let d = decoder();
    assert_eq!(d.decode(&sample(0, &ip_in_record(5, 1, 0))).unwrap(), None);
    let e = d
        .decode(&sample(0, &ip_in_record(5, 17, 0x0010)))
        .unwrap_err();
    assert_eq!(e.kind(), DecodeErrorKind::Fragment);
    let e = d.decode(&sample(0, &ip_in_record(4, 6, 0))).unwrap_err();
    assert_eq!(e.kind(), DecodeErrorKind::BadPacket);
    let mut v6 = ip_in_record(5, 6, 0);
    v6[field(IP_IN, "hdr")] = 0x65;
    assert_eq!(
        d.decode(&sample(0, &v6)).unwrap_err().kind(),
        DecodeErrorKind::BadPacket
    );
    let counts = d.error_counts();
    let get = |k| counts.iter().find(|(x, _)| *x == k).unwrap().1;
    assert_eq!(get(DecodeErrorKind::Fragment), 1);
    assert_eq!(get(DecodeErrorKind::BadPacket), 2);
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let d = decoder();
    let mut r = record(IP6_OUT, 128, 0);
    let h = field(IP6_OUT, "hdr");
    r[h] = 0x60;
    r[h + 6] = 0; // hop-by-hop
    r[h + 8..h + 24].copy_from_slice(
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    r[h + 24..h + 40].copy_from_slice(
        &"2001:db8::2"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    r[h + 40] = 17; // next: UDP
    r[h + 41] = 0; // 8 bytes
    r[h + 48..h + 50].copy_from_slice(&53u16.to_be_bytes());
    r[h + 50..h + 52].copy_from_slice(&4000u16.to_be_bytes());
    let sk = field(IP6_OUT, "sk");
    r[sk..sk + 8].copy_from_slice(&0xffff_8880_0000_1000u64.to_le_bytes());
    let ev = d.decode(&sample(1, &r)).unwrap().unwrap();
    let EventKind::Packet(p) = ev.kind else {
        panic!()
    };
    assert_eq!(p.transport, Transport::Udp);
    assert_eq!(p.src, "[2001:db8::1]:53".parse::<SocketAddr>().unwrap());
    assert_eq!(p.dst.port(), 4000);
    assert_eq!(p.sock, Some(0xffff_8880_0000_1000));
}

#[test]
fn connect_in_softirq_has_no_task_and_v4_mapped_becomes_v4() {
    let d = decoder();
    let mut r = record(CONNECT, 128, 0x10);
    let put = |r: &mut Vec<u8>, name: &str, b: &[u8]| {
        let o = field(CONNECT, name);
        r[o..o + b.len()].copy_from_slice(b);
    };
    put(&mut r, "sk", &7u64.to_le_bytes());
    put(&mut r, "family", &10u16.to_le_bytes());
    put(&mut r, "sport", &40000u16.to_le_bytes());
    put(&mut r, "dport", &80u16.to_be_bytes());
    let mapped = "::ffff:192.0.2.7"
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets();
    put(&mut r, "daddr6", &mapped);
    put(
        &mut r,
        "saddr6",
        &"::ffff:192.0.2.1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    let ev = d.decode(&sample(2, &r)).unwrap().unwrap();
    assert_eq!(ev.task, None, "softirq flag clears the task");
    let EventKind::TcpConnect {
        local,
        remote,
        sock,
    } = ev.kind
    else {
        panic!()
    };
    assert_eq!(sock, 7);
    assert_eq!(remote, "192.0.2.7:80".parse::<SocketAddr>().unwrap());
    assert_eq!(local, "192.0.2.1:40000".parse::<SocketAddr>().unwrap());
    r[2] = 0;
    let ev = d.decode(&sample(2, &r)).unwrap().unwrap();
    let task = ev.task.unwrap();
    assert_eq!((task.pid, task.tid), (100, 101));
}

#[test]
fn udp6_send_to_an_ipv4_sockaddr_has_no_peer() {
    let d = decoder();
    let mut r = record(UDP6_SEND, 128, 0);
    let nl = field(UDP6_SEND, "namelen");
    r[nl..nl + 4].copy_from_slice(&28u32.to_le_bytes());
    let nf = field(UDP6_SEND, "nfamily");
    r[nf..nf + 2].copy_from_slice(&2u16.to_le_bytes());
    let ev = d.decode(&sample(3, &r)).unwrap().unwrap();
    assert!(matches!(
        ev.kind,
        EventKind::SockActivity { peer: None, .. }
    ));
    r[nf..nf + 2].copy_from_slice(&10u16.to_le_bytes());
    let ev = d.decode(&sample(3, &r)).unwrap().unwrap();
    assert!(matches!(ev.kind, EventKind::SockActivity { peer: Some(p), .. } if p.port() == 0));
}

#[test]
fn truncated_wrong_type_and_unknown_event_are_errors() {
    let d = decoder();
    let r = ip_in_record(5, 6, 0);
    for cut in 0..r.len().min(40) {
        let e = d.decode(&sample(0, &r[..cut])).unwrap_err();
        assert_eq!(e.kind(), DecodeErrorKind::Truncated, "cut at {cut}");
    }
    let mut wrong = r.clone();
    wrong[0] ^= 1;
    assert!(matches!(
        d.decode(&sample(0, &wrong)),
        Err(DecodeError::TypeMismatch { .. })
    ));
    assert_eq!(d.decode(&sample(9, &r)), Err(DecodeError::UnknownEvent(9)));
}

#[test]
fn exec_filename_data_loc_out_of_bounds_is_an_error() {
    let d = decoder();
    let mut r = record(EXEC, 64, 0);
    let loc = field(EXEC, "filename");
    let text = b"/bin/sh\0";
    r[40..48].copy_from_slice(text);
    r[loc..loc + 4].copy_from_slice(&((8u32 << 16) | 40).to_le_bytes());
    let ev = d.decode(&sample(4, &r)).unwrap().unwrap();
    assert!(matches!(ev.kind, EventKind::Exec { ref filename, .. } if filename == "/bin/sh"));
    r[loc..loc + 4].copy_from_slice(&((200u32 << 16) | 40).to_le_bytes());
    assert_eq!(
        d.decode(&sample(4, &r)).unwrap_err().kind(),
        DecodeErrorKind::Truncated
    );
}

#[test]
fn random_bytes_never_panic() {
    let d = decoder();
    let mut seed = 0x9e37_79b9u32;
    for n in 0..2000usize {
        let len = n % 160;
        let mut r: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as u8
            })
            .collect();
        let ev = (n % 5) as u32;
        let fmts = [IP_IN, IP6_OUT, CONNECT, UDP6_SEND, EXEC];
        if r.len() >= 2 {
            r[0..2].copy_from_slice(&id(fmts[ev as usize]).to_le_bytes());
        }
        let _ = d.decode(&sample(ev, &r));
    }
}
