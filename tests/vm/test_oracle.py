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
