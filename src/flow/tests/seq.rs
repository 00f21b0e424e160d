//! TCP sequence space per endpoint: the payload the sequence numbers cover
//! and the bytes of it no counted packet carried.

use super::super::seq::{SeqTrack, MAX_SEQ_ADVANCE, SEQ_GAPS};
use super::*;
use crate::model::{SeqSpace, TcpSeq, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

const SYN: u8 = TCP_SYN;
const SYN_ACK: u8 = TCP_SYN | TCP_ACK;
const ACK: u8 = TCP_ACK;
const FIN_ACK: u8 = TCP_FIN | TCP_ACK;
/// IPv4 and TCP headers without options.
const HDRS: u32 = 40;

fn track(packets: &[(u8, u32, u32)]) -> SeqSpace {
    let mut t = SeqTrack::default();
    for &(flags, seq, payload) in packets {
        t.add(Some(flags), TcpSeq { seq, payload });
    }
    t.space().expect("packets were seen")
}

fn space(payload_bytes: u64, uncounted_bytes: u64, from_syn: bool) -> SeqSpace {
    SeqSpace {
        payload_bytes,
        uncounted_bytes,
        from_syn,
    }
}

#[test]
fn nothing_seen_is_unknown() {
    assert_eq!(SeqTrack::default().space(), None);
}

#[test]
fn syn_and_fin_take_a_number_each_and_are_no_payload() {
    let s = track(&[
        (SYN, 1000, 0),
        (ACK, 1001, 100),
        (ACK, 1101, 100),
        (FIN_ACK, 1201, 0),
        (ACK, 1202, 0),
    ]);
    assert_eq!(s, space(200, 0, true));
    // Payload on the SYN (TCP Fast Open) starts after the SYN's number.
    let s = track(&[(SYN, 7, 50), (ACK, 58, 10)]);
    assert_eq!(s, space(60, 0, true));
}

#[test]
fn a_lost_segment_is_the_shortfall() {
    let s = track(&[
        (SYN, 0, 0),
        (ACK, 1, 1000),
        // 1001..2001 lost
        (ACK, 2001, 1000),
        (FIN_ACK, 3001, 0),
    ]);
    assert_eq!(s, space(3000, 1000, true));
}

#[test]
fn a_lost_segment_before_the_fin_shows_through_the_fin() {
    let s = track(&[(SYN, 0, 0), (ACK, 1, 1000), (FIN_ACK, 2001, 0)]);
    assert_eq!(s, space(2000, 1000, true));
}

#[test]
fn retransmissions_are_counted_once_and_fill_what_they_carry() {
    // Retransmission of counted bytes: no shortfall, covered once.
    let s = track(&[
        (SYN, 0, 0),
        (ACK, 1, 1000),
        (ACK, 1, 1000),
        (ACK, 1001, 500),
    ]);
    assert_eq!(s, space(1500, 0, true));
    // A real loss on the way in: the later segment arrives, then the
    // retransmission of the lost one fills the gap.
    let s = track(&[
        (SYN, 0, 0),
        (ACK, 1, 1000),
        (ACK, 2001, 1000),
        (ACK, 3001, 1000),
        (ACK, 1001, 1000),
    ]);
    assert_eq!(s, space(4000, 0, true));
    // A retransmission that repacketizes: overlapping both counted bytes
    // and the gap, and one filling the gap's middle only.
    let s = track(&[
        (ACK, 0, 100),
        (ACK, 300, 100),
        (ACK, 50, 100),
        (ACK, 200, 50),
    ]);
    assert_eq!(s, space(400, 100, false));
    let s = track(&[(ACK, 0, 100), (ACK, 300, 100), (ACK, 150, 100)]);
    assert_eq!(s, space(400, 100, false));
}

#[test]
fn reordering_is_no_shortfall() {
    let s = track(&[(SYN, 99, 0), (ACK, 1100, 500), (ACK, 100, 1000)]);
    assert_eq!(s, space(1500, 0, true));
}

#[test]
fn wraparound_is_serial() {
    let isn = u32::MAX - 1500;
    let s = track(&[
        (SYN, isn, 0),
        (ACK, isn.wrapping_add(1), 1000),
        // lost: the 1000 bytes across the wrap
        (ACK, isn.wrapping_add(2001), 1000),
        (FIN_ACK, isn.wrapping_add(3001), 0),
    ]);
    assert_eq!(s, space(3000, 1000, true));
    // A gap across the wrap, filled by its retransmission.
    let s = track(&[
        (ACK, u32::MAX - 499, 300),
        (ACK, 300, 200),
        (ACK, u32::MAX - 199, 500),
    ]);
    assert_eq!(s, space(1000, 0, false));
}

#[test]
fn long_flows_cover_more_than_the_sequence_space() {
    let mut t = SeqTrack::default();
    let seg = 60_000u32;
    let mut seq = 5u32;
    // 200,000 segments: 12 GB, three wraps.
    for _ in 0..200_000 {
        t.add(Some(ACK), TcpSeq { seq, payload: seg });
        seq = seq.wrapping_add(seg);
    }
    assert_eq!(t.space(), Some(space(200_000 * u64::from(seg), 0, false)));
}

#[test]
fn a_missed_start_starts_at_the_first_packet_seen() {
    // An older connection: earlier bytes retransmitted later are not in
    // the figures, and do not count as a shortfall.
    let s = track(&[
        (ACK, 50_000, 1000),
        (ACK, 49_000, 1000),
        (ACK, 51_000, 1000),
    ]);
    assert_eq!(s, space(2000, 0, false));
}

#[test]
fn an_older_idle_connection_starts_where_its_bytes_do() {
    // A keepalive (one below the next byte) and bare ACKs come first: the
    // figures start at the first packet with payload, with no false gap.
    let s = track(&[
        (ACK, 99, 0),
        (ACK, 100, 0),
        (ACK, 100, 500),
        (ACK, 600, 500),
    ]);
    assert_eq!(s, space(1000, 0, false));
    // Only bare ACKs: known, nothing covered.
    assert_eq!(track(&[(ACK, 99, 0), (ACK, 100, 0)]), space(0, 0, false));
}

#[test]
fn pure_acks_keepalives_and_resets_change_nothing() {
    let s = track(&[
        (SYN, 0, 0),
        (ACK, 1, 100),
        (ACK, 101, 0),
        // keepalive: one below the next sequence number, no payload
        (ACK, 100, 0),
        (TCP_RST, 4_000_000, 0),
        (TCP_RST | ACK, 101, 0),
    ]);
    assert_eq!(s, space(100, 0, true));
}

#[test]
fn implausible_packets_are_not_of_the_stream() {
    let s = track(&[
        (ACK, 0, 100),
        (ACK, 100 + MAX_SEQ_ADVANCE, 100),
        (ACK, 100, u32::MAX),
        (ACK, 100, 100),
    ]);
    assert_eq!(s, space(200, 0, false));
}

#[test]
fn gaps_beyond_the_remembered_ones_are_settled_as_missing() {
    // SEQ_GAPS + 1 gaps of 10 bytes; the oldest is settled, the rest
    // remembered; retransmissions then fill every gap.
    let gaps = SEQ_GAPS as u32 + 1;
    let mut p = vec![(ACK, 0u32, 10u32)];
    for i in 1..=gaps {
        p.push((ACK, 20 * i, 10));
    }
    let covered = u64::from(20 * gaps + 10);
    assert_eq!(
        track(&p),
        space(covered, 10 * u64::from(gaps), false),
        "every gap counts"
    );
    for i in 0..gaps {
        p.push((ACK, 20 * i + 10, 10));
    }
    assert_eq!(
        track(&p),
        space(covered, 10, false),
        "the settled gap stays missing, the remembered ones are filled"
    );
}

#[test]
fn arbitrary_input_never_panics_and_stays_consistent() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..200 {
        let mut t = SeqTrack::default();
        for _ in 0..200 {
            let r = next();
            let seq = if r & 1 == 0 {
                r as u32
            } else {
                (r >> 40) as u32 % 5000
            };
            t.add(
                Some((r >> 32) as u8),
                TcpSeq {
                    seq,
                    payload: (r >> 48) as u32 % 3000,
                },
            );
            let s = t.space().unwrap_or_default();
            assert!(s.uncounted_bytes <= s.payload_bytes, "{s:?}");
        }
    }
}

/// A TCP packet with its sequence figures: `payload` bytes after
/// [`HDRS`] header bytes.
#[allow(clippy::too_many_arguments)]
fn tcp(
    h: &mut H,
    t: KernelTime,
    sock: Option<SockAddr>,
    dir: PacketDir,
    (src, dst): (&str, &str),
    flags: u8,
    seq: u32,
    payload: u32,
) {
    let p = Packet {
        sock,
        dir,
        transport: Tcp,
        src: sa(src),
        dst: sa(dst),
        ip_len: HDRS + payload,
        tcp_flags: Some(flags),
        tcp_seq: Some(TcpSeq { seq, payload }),
    };
    h.ev(t, None, EventKind::Packet(p));
}

/// A download over a connection the daemon saw open, IPv4 or IPv6: the
/// client sends 100 bytes, the server 3 segments of 1000; `lose` names
/// the server segments whose samples were lost.
fn download(h: &mut H, (l, r): (&str, &str), lose: &[usize]) -> FlowRecord {
    let sk = 0xa000;
    h.create(S, 100, sk, Some(Tcp));
    h.connect(S, 100, sk, l, r);
    let (cli, srv) = (10_000u32, 4_000_000_000u32);
    tcp(h, S, Some(sk), Out, (l, r), SYN, cli, 0);
    tcp(h, S + MS, None, In, (r, l), SYN_ACK, srv, 0);
    tcp(h, S + 2 * MS, Some(sk), Out, (l, r), ACK, cli + 1, 100);
    for i in 0..3 {
        if !lose.contains(&i) {
            let seq = srv.wrapping_add(1 + 1000 * i as u32);
            tcp(h, S + 3 * MS, None, In, (r, l), ACK, seq, 1000);
        }
    }
    tcp(
        h,
        S + 4 * MS,
        None,
        In,
        (r, l),
        FIN_ACK,
        srv.wrapping_add(3001),
        0,
    );
    tcp(h, S + 5 * MS, Some(sk), Out, (l, r), FIN_ACK, cli + 101, 0);
    h.close(2 * S, Some(100), sk);
    // Past socket_inactive_timeout: a socket-counter flow whose counters
    // never came ends uncounted.
    h.tick(100 * S);
    only(h.flows())
}

#[test]
fn records_carry_each_endpoints_sequence_space() {
    let mut h = H::new();
    let r = download(&mut h, ("10.0.0.1:40000", "10.0.0.2:80"), &[]);
    assert_eq!(r.local.sequence, Some(space(100, 0, true)));
    assert_eq!(r.remote.sequence, Some(space(3000, 0, true)));
    assert_eq!(r.remote.bytes, u64::from(5 * HDRS + 3000));
}

#[test]
fn a_lost_sample_shows_as_the_shortfall_and_the_counters_stay_counted() {
    for (l, r) in [
        ("10.0.0.1:40000", "10.0.0.2:80"),
        ("[2001:db8::1]:40000", "[2001:db8::2]:80"),
    ] {
        let mut h = H::new();
        let rec = download(&mut h, (l, r), &[1]);
        assert_eq!(rec.remote.sequence, Some(space(3000, 1000, true)), "{l}");
        assert_eq!(rec.remote.packets, 4, "{l}: counted as counted");
        assert_eq!(rec.remote.bytes, u64::from(4 * HDRS + 2000), "{l}");
        assert_eq!(rec.local.sequence, Some(space(100, 0, true)), "{l}");
    }
}

#[test]
fn udp_flows_have_no_sequence_space() {
    let mut h = H::new();
    let sk = 0xb000;
    h.create(S, 300, sk, Some(Udp));
    h.pkt(S, Some(sk), Udp, Out, ("10.0.0.1:5000", "10.0.0.53:53"), 60);
    h.close(2 * S, Some(300), sk);
    h.tick(10 * S);
    let r = only(h.flows());
    assert_eq!((r.local.sequence, r.remote.sequence), (None, None));
}

#[test]
fn socket_counter_accounting_has_no_sequence_space() {
    let mut c = cfg();
    c.accounting = crate::model::Accounting::SocketCounters;
    let mut h = H::with(c, 1024);
    let r = download(&mut h, ("10.0.0.1:40000", "10.0.0.2:80"), &[]);
    assert_eq!(r.accounting, crate::model::Accounting::Uncounted);
    assert_eq!((r.local.sequence, r.remote.sequence), (None, None));
}
