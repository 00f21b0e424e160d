"""Host-only tests of the pcap oracle and the kernel package resolver."""

from __future__ import annotations

import ipaddress
import struct

import pytest

import kernels
import oracle


def _ipv4(src: str, dst: str, proto: int, sport: int, dport: int, payload: int, flags: int = 0x18) -> bytes:
    l4 = (struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) if proto == 6
          else struct.pack("!HHHH", sport, dport, 8 + payload, 0))
    total = 20 + len(l4) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, proto, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return hdr + l4 + b"x" * payload


def _ipv6(src: str, dst: str, proto: int, sport: int, dport: int, payload: int) -> bytes:
    l4 = (struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x10, 65535, 0, 0) if proto == 6
          else struct.pack("!HHHH", sport, dport, 8 + payload, 0))
    hdr = struct.pack("!IHBB16s16s", 6 << 28, len(l4) + payload, proto, 64,
                      ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed)
    return hdr + l4 + b"y" * payload


def _sll2(ip: bytes, pkttype: int, hatype: int = 1, ifindex: int = 2) -> bytes:
    proto = 0x86DD if ip[0] >> 4 == 6 else 0x0800
    return struct.pack("!HHIHBB8s", proto, 0, ifindex, hatype, pkttype, 6, b"\0" * 8) + ip


def _sll(ip: bytes, pkttype: int, hatype: int = 1) -> bytes:
    proto = 0x86DD if ip[0] >> 4 == 6 else 0x0800
    return struct.pack("!HHH8sH", pkttype, hatype, 6, b"\0" * 8, proto) + ip


def _pcap(linktype: int, frames: list[bytes], snaplen: int = 96, big_endian: bool = False) -> bytes:
    e = ">" if big_endian else "<"
    out = struct.pack(e + "IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype)
    for i, f in enumerate(frames):
        cut = f[:snaplen]
        out += struct.pack(e + "IIII", 1000 + i, 0, len(cut), len(f)) + cut
    return out


def test_sll2_totals_per_direction_with_snaplen_cut():
    out = _ipv4("10.0.2.15", "10.0.2.2", 6, 40000, 80, 1000)
    back = _ipv4("10.0.2.2", "10.0.2.15", 6, 80, 40000, 3000)
    data = _pcap(oracle.LINKTYPE_LINUX_SLL2, [_sll2(out, 4), _sll2(back, 0), _sll2(back, 0)])
    t = oracle.Totals(oracle.parse_pcap(data))
    ft = t.flow("tcp", ("10.0.2.15", 40000), ("10.0.2.2", 80))
    assert ft.local == oracle.Counter(1, 1040)
    assert ft.remote == oracle.Counter(2, 6080)
    # the capture host is 10.0.2.15: seen from 10.0.2.2 nothing was sent or received here
    rev = t.flow("tcp", ("10.0.2.2", 80), ("10.0.2.15", 40000))
    assert rev == oracle.FlowTotals(oracle.Counter(), oracle.Counter())


def test_loopback_packets_count_as_sent_and_received():
    pkt = _ipv6("::1", "::1", 17, 5000, 53, 100)
    data = _pcap(oracle.LINKTYPE_LINUX_SLL, [_sll(pkt, 0, hatype=oracle.ARPHRD_LOOPBACK)], big_endian=True)
    t = oracle.Totals(oracle.parse_pcap(data))
    assert t.flow("udp", ("::1", 5000), ("::1", 53)).local == oracle.Counter(1, 148)
    assert t.flow("udp", ("::1", 53), ("::1", 5000)).remote == oracle.Counter(1, 148)


def test_assert_flow_matches_reports_mismatch_and_accepts_slack():
    pkt = _ipv4("127.0.0.1", "127.0.0.1", 17, 1, 2, 10)
    t = oracle.Totals(oracle.parse_pcap(_pcap(oracle.LINKTYPE_LINUX_SLL2,
                                              [_sll2(pkt, 0, hatype=oracle.ARPHRD_LOOPBACK)])))
    oracle.assert_flow_matches(t, "udp", ("127.0.0.1", 1), ("127.0.0.1", 2), local_packets=1, local_bytes=38,
                               remote_packets=0, remote_bytes=0)
    with pytest.raises(AssertionError, match="capture says"):
        oracle.assert_flow_matches(t, "udp", ("127.0.0.1", 1), ("127.0.0.1", 2), local_packets=2,
                                   local_bytes=38, remote_packets=0, remote_bytes=0)
    oracle.assert_flow_matches(t, "udp", ("127.0.0.1", 1), ("127.0.0.1", 2), local_packets=2, local_bytes=40,
                               remote_packets=0, remote_bytes=0, packet_slack=1, byte_slack=2)


def test_truncated_and_foreign_input():
    good = _pcap(oracle.LINKTYPE_LINUX_SLL2, [_sll2(_ipv4("1.1.1.1", "2.2.2.2", 6, 1, 2, 0), 4)] * 2)
    assert len(oracle.parse_pcap(good[:-5])) == 1  # half-written last record is ignored
    with pytest.raises(oracle.PcapError):
        oracle.parse_pcap(b"\x0a\x0d\x0d\x0a" + b"\0" * 40)  # pcapng is not accepted silently
    with pytest.raises(oracle.PcapError):
        oracle.parse_pcap(b"short")
    # non-IP frames and garbage IP are skipped, not fatal
    junk = struct.pack("!HHIHBB8s", 0x0806, 0, 2, 1, 0, 6, b"\0" * 8) + b"\x45" * 3
    assert oracle.parse_pcap(_pcap(oracle.LINKTYPE_LINUX_SLL2, [junk, _sll2(b"\x45\x00", 0)])) == []


def test_depends_parsing_takes_first_alternative_and_exact_version():
    fields = {"Depends": "dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, "
                         "linux-binary-7.2.13+deb14-cloud-amd64 (= 7.2.13-1), linux-modules-7.2.13+deb14-cloud-amd64 (= 7.2.13-1)"}
    assert kernels._depends(fields) == [("dracut", None), ("linux-binary-7.2.13+deb14-cloud-amd64", "7.2.13-1"),
                                        ("linux-modules-7.2.13+deb14-cloud-amd64", "7.2.13-1")]


def test_selected_suites_rejects_unknown(monkeypatch):
    monkeypatch.setenv("SOCKSCOPE_KERNELS", "bookworm, sid")
    assert kernels.selected_suites() == ["bookworm", "sid"]
    monkeypatch.setenv("SOCKSCOPE_KERNELS", "buster")
    with pytest.raises(kernels.KernelFetchError):
        kernels.selected_suites()
    monkeypatch.delenv("SOCKSCOPE_KERNELS")
    assert kernels.selected_suites() == list(kernels.SUITES)


def test_count_records_counts_every_complete_record():
    frames = [_sll2(_ipv4("1.1.1.1", "2.2.2.2", 6, 1, 2, 0), 4), b"\x00" * 30, _sll2(b"\x45", 0)]
    data = _pcap(oracle.LINKTYPE_LINUX_SLL2, frames)
    assert oracle.count_records(data) == 3
    assert oracle.count_records(data[:-1]) == 2  # a cut-off last record is not a packet
    with pytest.raises(oracle.PcapError):
        oracle.count_records(b"\x0a\x0d\x0d\x0a" + b"\0" * 40)


def _dns_response(answers: list[tuple[int, bytes]], qr: bool = True) -> bytes:
    name = b"\x04web4\x09sockscope\x04test\x00"
    msg = struct.pack("!HHHHHH", 7, 0x8180 if qr else 0x0100, 1, len(answers), 0, 0) + name + b"\x00\x01\x00\x01"
    for rtype, rdata in answers:
        msg += b"\xc0\x0c" + struct.pack("!HHIH", rtype, 1, 0, len(rdata)) + rdata
    return msg


def test_dns_answers_counts_a_and_aaaa_only():
    resp = _dns_response([(1, b"\x0a\x00\x02\x0f"), (5, b"\x00"), (28, b"\0" * 16)])
    assert oracle.dns_answers(resp) == 2
    assert oracle.dns_answers(_dns_response([])) == 0
    assert oracle.dns_answers(resp[:-3]) is None  # cut short
    assert oracle.dns_answers(_dns_response([], qr=False)) is None  # a query
    # The payload reaches the oracle through the capture.
    ip = bytearray(_ipv4("127.0.0.1", "127.0.0.1", 17, 53, 40000, len(resp)))
    ip[28:] = resp
    recs = oracle.parse_pcap(_pcap(oracle.LINKTYPE_LINUX_SLL2, [_sll2(bytes(ip), 0, hatype=oracle.ARPHRD_LOOPBACK)],
                                   snaplen=256))
    assert oracle.dns_answers(recs[0].udp_payload) == 2


def test_capture_stats_from_tcpdump_exit_lines():
    import bed
    log = ("tcpdump: listening on any, link-type LINUX_SLL2\n1 packet captured\n"
           "12 packets received by filter\n3 packets dropped by kernel\n")
    assert bed.capture_stats(log) == {"captured": 1, "received by filter": 12, "dropped by kernel": 3}
    assert bed.capture_stats("tcpdump: listening on any\n") is None


def test_profile_pairs_bare_names_with_events_and_keeps_one_group():
    import flowlib
    events = ("p:sockscope_195/ip_out ip_output sk=$arg2:x64\n"
              "p:other_1/ip_out ip_output\n"
              "r256:sockscope_195/tcp_accept inet_csk_accept sk=$retval:x64\n")
    profile = "  ip_out   113   2\n  ip_out   9   7\n  tcp_accept   15   74\n"
    assert flowlib.parse_profile(events, profile, "sockscope_195") == {"ip_out": 2, "tcp_accept": 74}
    assert flowlib.parse_profile(events, "  ip_out 1 0\n", "sockscope_195") is None  # read between changes
    assert flowlib.parse_profile(events, profile.replace("tcp_accept", "creds"), "sockscope_195") is None


def test_shortfall_bytes_must_be_some_missing_packets():
    import flowlib
    sizes = [60, 52, 1500, 1500, 52, 52]
    assert flowlib.explainable(0, 0, sizes)
    assert flowlib.explainable(1552, 2, sizes)
    assert flowlib.explainable(3000, 2, sizes)
    assert not flowlib.explainable(1500, 2, sizes)  # two packets cannot weigh one
    assert not flowlib.explainable(4500, 3, sizes)  # only two of 1500
    assert not flowlib.explainable(10, 0, sizes)
    assert not flowlib.explainable(0, 1, sizes)
    assert flowlib.explainable(156, 3, sizes) and not flowlib.explainable(157, 3, sizes)


def test_sequence_space_is_judged_against_the_capture():
    import types
    import flowlib
    SYN, ACK, FIN = 0x02, 0x10, 0x01

    def pkt(seq, payload, flags=ACK, ip_len=None):
        return oracle.PacketRecord(0.0, True, True, None, "tcp", ("127.0.0.1", 1), ("127.0.0.1", 2),
                                   ip_len if ip_len is not None else 52 + payload, flags,
                                   tcp_payload=payload, tcp_seq=seq)

    # SYN at 2^32 - 10: the span wraps; the bare ACK after the FIN is one past it.
    isn = (1 << 32) - 10
    side = [pkt(isn, 0, SYN, 60), pkt(isn + 1, 1000), pkt((isn + 1001) % (1 << 32), 1000),
            pkt((isn + 2001) % (1 << 32), 0, FIN | ACK), pkt((isn + 2002) % (1 << 32), 0)]
    assert oracle.tcp_payload_span(side) == 2000
    assert oracle.tcp_payload_span(side[1:]) is None

    def record(covered, uncounted, from_syn=True, accounting=0, present=True):
        q = types.SimpleNamespace(payload_bytes=covered, uncounted_bytes=uncounted, from_syn=from_syn)
        ep = types.SimpleNamespace(packets=5, sequence_space=q, HasField=lambda name: present)
        return types.SimpleNamespace(accounting=accounting), ep

    def problems(rec, short_packets=0, short_bytes=0):
        f, ep = rec
        return flowlib.sequence_problems(f, ep, "local", side, short_packets, short_bytes)

    assert problems(record(2000, 0)) == []
    assert problems(record(2000, 1)), "a shortfall with nothing missing"
    assert problems(record(1999, 0)), "not the capture's span"
    assert problems(record(2000, 0, from_syn=False)), "the SYN was counted"
    assert problems(record(0, 0, present=False)), "missing under per-packet accounting"
    assert problems(record(0, 0, accounting=1)), "present under socket-counter accounting"
    assert problems(record(0, 0, accounting=1, present=False)) == []
    # The second data segment (1052 IP bytes) missing: 1000 payload bytes no counted packet carried.
    assert problems(record(2000, 1000), 1, 1052) == []
    assert problems(record(2000, 999), 1, 1052)
    assert problems(record(2000, 0), 1, 1052)
    # The first one and the FIN missing: 1000 uncounted, the FIN's 52 header bytes the rest.
    assert problems(record(2000, 1000), 2, 1104) == []


def test_packet_probe_of_each_flow_side():
    import flowlib
    assert flowlib.packet_probe("tcp", "127.0.0.1", True) == "ip_out"
    assert flowlib.packet_probe("udp", "::1", True) == "ip6_out"
    assert flowlib.packet_probe("tcp", "::1", False) == "ip6_in"
    assert flowlib.packet_probe("tcp", "10.0.2.15", False) == "ip_in"
    assert flowlib.packet_probe("udp", "fd00:5c0:5c0::15", False) == "udp_in"


def test_archive_from_one_line_and_deb822_sources(tmp_path, monkeypatch):
    one = tmp_path / "sources.list"
    one.write_text("# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.test/debian bookworm main contrib\n"
                   "deb-src http://mirror.test/debian bookworm main\n"
                   "deb http://security.test/debian-security bookworm-security main\n")
    d822 = tmp_path / "extra.sources"
    d822.write_text("Types: deb\nURIs: http://other.test/debian/\nSuites: trixie trixie-updates\n"
                    "Components: main\n\nTypes: deb\nURIs: http://third.test/repo\nSuites: nodistro\n"
                    "Components: main\n\nEnabled: no\nTypes: deb\nURIs: http://off.test/debian\n"
                    "Suites: sid\nComponents: main\n")
    monkeypatch.setattr(kernels, "source_files", lambda: [one, d822])
    assert kernels.archive_uris() == ["http://mirror.test/debian", "http://other.test/debian"]
    empty = tmp_path / "empty.list"
    empty.write_text("# nothing enabled\n")
    monkeypatch.setattr(kernels, "source_files", lambda: [empty])
    with pytest.raises(kernels.ArchiveTrustError, match="no Debian archive"):
        kernels.archive_uris()


def _verdict(records: list, misses: dict[str, int]):
    """Scenario.verdict over a synthetic loopback capture: client 40000 -> server 80,
    three packets each way (60, 52, 1052 bytes out; 60, 52, 552 bytes back)."""
    import types

    import flowlib
    cli, srv = ("127.0.0.1", 40000), ("127.0.0.1", 80)
    pkts = [oracle.PacketRecord(0, False, True, 1, "tcp", cli, srv, n, 0) for n in (60, 52, 1052)]
    pkts += [oracle.PacketRecord(0, False, True, 1, "tcp", srv, cli, n, 0) for n in (60, 52, 552)]
    vm = types.SimpleNamespace(accounting=[])
    sc = flowlib.Scenario(vm, "sockscope_1", {p: 0 for p in flowlib.PACKET_PROBES})
    sc._close(types.SimpleNamespace(packets=pkts, totals=oracle.Totals(pkts)),
              {p: misses.get(p, 0) for p in flowlib.PACKET_PROBES})
    for (lp, lb, rp, rb), (local, remote) in records:
        side = types.SimpleNamespace
        rec = side(local=side(ip=local[0], port=local[1], packets=lp, bytes=lb),
                   remote=side(ip=remote[0], port=remote[1], packets=rp, bytes=rb))
        sc.expect([rec], "tcp")
    return sc.verdict(), vm.accounting


CLIENT_SIDE = (("127.0.0.1", 40000), ("127.0.0.1", 80))
SERVER_SIDE = (("127.0.0.1", 80), ("127.0.0.1", 40000))


def test_verdict_exact_without_misses():
    result, acc = _verdict([((3, 1164, 3, 664), CLIENT_SIDE), ((3, 664, 3, 1164), SERVER_SIDE)], {})
    assert result["flows"] == 2 and result["flows_short"] == 0 and acc == [result]
    with pytest.raises(AssertionError, match="local side 2 packets/1112 bytes"):
        _verdict([((2, 1112, 3, 664), CLIENT_SIDE)], {})  # short, no misses
    with pytest.raises(AssertionError, match="over the capture"):
        _verdict([((3, 1164, 3, 665), CLIENT_SIDE)], {"ip_in": 5})  # over is never allowed
    with pytest.raises(AssertionError, match="over the capture"):
        _verdict([((4, 1216, 3, 664), CLIENT_SIDE)], {"ip_out": 5})


def test_verdict_allowance_is_the_probes_kernel_misses():
    # One client packet of 52 bytes missing: ip_out missed once.
    result, _ = _verdict([((2, 1112, 3, 664), CLIENT_SIDE)], {"ip_out": 1})
    assert (result["flows_short"], result["packets_short"], result["bytes_short"]) == (1, 1, 52)
    # The same shortfall against misses of another probe is not allowed.
    with pytest.raises(AssertionError, match="ip_out: 1 missing, 0 missed"):
        _verdict([((2, 1112, 3, 664), CLIENT_SIDE)], {"ip_in": 3})
    # Bytes no captured packet of that side weighs.
    with pytest.raises(AssertionError, match="add up to the 53 bytes"):
        _verdict([((2, 1111, 3, 664), CLIENT_SIDE)], {"ip_out": 1})
    # One budget for the scenario: two flows short by one each need two misses.
    flows = [((2, 1112, 3, 664), CLIENT_SIDE), ((2, 604, 3, 1164), SERVER_SIDE)]
    with pytest.raises(AssertionError, match="ip_out: 2 missing, 1 missed"):
        _verdict(flows, {"ip_out": 1})
    result, _ = _verdict(flows, {"ip_out": 2})
    assert (result["flows_short"], result["packets_short"]) == (2, 2)


def _udp_scenario(misses: dict[str, int]):
    """A scenario over a synthetic capture of three 228-byte datagrams from the host to a
    guest UDP server, with ``misses`` counted by the kernel over it."""
    import types

    import flowlib
    host, guest = ("10.0.2.2", 50000), ("10.0.2.15", 9181)
    pkts = [oracle.PacketRecord(0, False, False, 1, "udp", host, guest, 228, 0) for _ in range(3)]
    vm = types.SimpleNamespace(accounting=[])
    sc = flowlib.Scenario(vm, "sockscope_1", {p: 0 for p in flowlib.PACKET_PROBES})
    sc._close(types.SimpleNamespace(packets=pkts, totals=oracle.Totals(pkts)),
              {p: misses.get(p, 0) for p in flowlib.PACKET_PROBES})
    return sc, (guest, host)


def test_a_flow_without_record_is_allowed_only_when_the_kernel_missed_all_its_packets():
    import types

    import flowlib
    pb = types.SimpleNamespace(TRANSPORT_TCP=1, TRANSPORT_UDP=2)
    # Two misses cannot have taken three datagrams; misses at another probe count for nothing.
    for misses in ({"udp_in": 2}, {"ip_in": 3}):
        sc, pair = _udp_scenario(misses)
        assert not sc.misses_explain(pb, pb.TRANSPORT_UDP, [pair])
    # A flow the capture never saw is not explained by misses either.
    sc, (guest, host) = _udp_scenario({"udp_in": 3})
    assert not sc.misses_explain(pb, pb.TRANSPORT_UDP, [(guest, ("10.0.2.2", 50001))])
    # Three misses at udp_in: the absent flow is judged as zero packets, charged to them.
    assert sc.misses_explain(pb, pb.TRANSPORT_UDP, [(guest, host)])
    sc.expect([flowlib.AbsentFlow(guest, host)], "udp")
    result = sc.verdict()
    assert (result["flows_absent"], result["flows_short"], result["packets_short"], result["bytes_short"]) \
        == (1, 1, 3, 684)
    # The budget is shared: an absent flow and a short one cannot both live on three misses.
    sc, pair = _udp_scenario({"udp_in": 3})
    sc.expect([flowlib.AbsentFlow(*pair)], "udp")
    sc.expect([types.SimpleNamespace(local=types.SimpleNamespace(ip=pair[0][0], port=pair[0][1], packets=0, bytes=0),
                                     remote=types.SimpleNamespace(ip=pair[1][0], port=pair[1][1], packets=2,
                                                                  bytes=456))], "udp")
    with pytest.raises(AssertionError, match="udp_in: 4 missing, 3 missed"):
        sc.verdict()
