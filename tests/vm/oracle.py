"""Ground truth from packet captures: a pure-Python pcap reader.

Understands classic pcap (micro- and nanosecond, either byte order) with
link types Linux cooked v1 (SLL, 113) and v2 (SLL2, 276), Ethernet (1) and
raw IP (101), IPv4/IPv6 with TCP/UDP.  :class:`Totals` sums packets and IP
bytes (IPv4 total length, IPv6 payload length + 40) per 5-tuple and
direction, the same byte accounting as flow records (UDP = payload + 28 or
+ 48).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct
from collections import defaultdict

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276
#: Linux packet types (if_packet.h).
PACKET_HOST, PACKET_BROADCAST, PACKET_MULTICAST, PACKET_OTHERHOST, PACKET_OUTGOING = range(5)
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
IPPROTO_TCP, IPPROTO_UDP = 6, 17
#: IPv6 extension headers skipped to reach the transport header.
IPV6_EXT_HEADERS = {0, 43, 60}
#: ARPHRD_LOOPBACK: the device type of lo in cooked headers.
ARPHRD_LOOPBACK = 772
PCAP_HEADER_LEN = 24
PCAP_RECORD_LEN = 16


class PcapError(ValueError):
    """The capture file is not a pcap this reader understands."""


@dataclasses.dataclass(frozen=True)
class PacketRecord:
    """One captured TCP/UDP packet."""

    ts: float
    outgoing: bool  # sent by this host (PACKET_OUTGOING); False for link types without direction
    loopback: bool  # captured on a loopback device: both sent and received by this host
    ifindex: int | None
    proto: str  # "tcp" | "udp"
    src: tuple[str, int]
    dst: tuple[str, int]
    ip_len: int
    tcp_flags: int
    #: UDP payload as captured (up to the IP length; cut by the snap length).
    udp_payload: bytes = dataclasses.field(default=b"", repr=False)
    #: TCP payload bytes (from the IP length and the TCP data offset).
    tcp_payload: int = 0
    #: TCP sequence number, when the header holds it.
    tcp_seq: int | None = None


def _ip(packet: bytes, ts: float, outgoing: bool, loopback: bool, ifindex: int | None) -> PacketRecord | None:
    if len(packet) < 1:
        return None
    version = packet[0] >> 4
    if version == 4:
        if len(packet) < 20:
            return None
        ihl = (packet[0] & 0x0F) * 4
        total = struct.unpack_from("!H", packet, 2)[0]
        frag = struct.unpack_from("!H", packet, 6)[0] & 0x1FFF
        proto = packet[9]
        src, dst = str(ipaddress.IPv4Address(packet[12:16])), str(ipaddress.IPv4Address(packet[16:20]))
        l4 = ihl if frag == 0 else None
    elif version == 6:
        if len(packet) < 40:
            return None
        total = struct.unpack_from("!H", packet, 4)[0] + 40
        proto = packet[6]
        src, dst = str(ipaddress.IPv6Address(packet[8:24])), str(ipaddress.IPv6Address(packet[24:40]))
        off = 40
        while proto in IPV6_EXT_HEADERS and len(packet) >= off + 2:
            proto, off = packet[off], off + (packet[off + 1] + 1) * 8
        l4 = off
    else:
        return None
    if proto not in (IPPROTO_TCP, IPPROTO_UDP) or l4 is None or len(packet) < l4 + 4:
        return None
    sport, dport = struct.unpack_from("!HH", packet, l4)
    flags = packet[l4 + 13] if proto == IPPROTO_TCP and len(packet) > l4 + 13 else 0
    payload = packet[l4 + 8:total] if proto == IPPROTO_UDP else b""
    tcp_payload = 0
    tcp_seq = None
    if proto == IPPROTO_TCP and len(packet) > l4 + 12:
        tcp_payload = max(0, total - l4 - (packet[l4 + 12] >> 4) * 4)
        tcp_seq = struct.unpack_from("!I", packet, l4 + 4)[0]
    return PacketRecord(ts, outgoing, loopback, ifindex, "tcp" if proto == IPPROTO_TCP else "udp",
                        (src, sport), (dst, dport), total, flags, payload, tcp_payload, tcp_seq)


TCP_FIN_SYN_RST = (0x01, 0x02, 0x04)
SEQ_MOD = 1 << 32


def tcp_payload_span(packets: list[PacketRecord]) -> int | None:
    """Payload bytes one side's sequence numbers cover in a capture: from the byte after its
    SYN to the end of its highest payload (retransmitted bytes once); None without its SYN."""
    fin, syn, rst = TCP_FIN_SYN_RST
    syns = [p for p in packets if p.tcp_flags & syn and p.tcp_seq is not None]
    if not syns:
        return None
    start = (syns[0].tcp_seq + 1) % SEQ_MOD
    end = 0
    for p in packets:
        # Bytes end where a payload or a FIN does; a bare ACK after the FIN is one past it.
        if p.tcp_seq is None or p.tcp_flags & rst or not (p.tcp_payload or p.tcp_flags & fin):
            continue
        at = (p.tcp_seq + (1 if p.tcp_flags & syn else 0) - start) % SEQ_MOD
        if at < SEQ_MOD // 2:
            end = max(end, at + p.tcp_payload)
    return end


def parse_pcap(data: bytes) -> list[PacketRecord]:
    """All TCP/UDP packets of a classic pcap file."""
    if len(data) < PCAP_HEADER_LEN:
        raise PcapError(f"pcap too short ({len(data)} bytes)")
    magic = data[:4]
    table = {b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
             b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9)}
    if magic not in table:
        raise PcapError(f"not a classic pcap (magic {magic.hex()})")
    end, scale = table[magic]
    linktype = struct.unpack_from(end + "I", data, 20)[0] & 0x0FFFFFFF
    out: list[PacketRecord] = []
    off = PCAP_HEADER_LEN
    while off + PCAP_RECORD_LEN <= len(data):
        sec, frac, incl, _orig = struct.unpack_from(end + "IIII", data, off)
        off += PCAP_RECORD_LEN
        frame = data[off:off + incl]
        off += incl
        if len(frame) < incl:
            break  # truncated last record (capture stopped mid-write)
        ts = sec + frac * scale
        rec = None
        if linktype == LINKTYPE_LINUX_SLL and len(frame) >= 16:
            pkttype, hatype = struct.unpack_from("!HH", frame, 0)
            proto = struct.unpack_from("!H", frame, 14)[0]
            if proto in (ETH_P_IP, ETH_P_IPV6):
                rec = _ip(frame[16:], ts, pkttype == PACKET_OUTGOING, hatype == ARPHRD_LOOPBACK, None)
        elif linktype == LINKTYPE_LINUX_SLL2 and len(frame) >= 20:
            proto, _res, ifindex, hatype = struct.unpack_from("!HHIH", frame, 0)
            pkttype = frame[10]
            if proto in (ETH_P_IP, ETH_P_IPV6):
                rec = _ip(frame[20:], ts, pkttype == PACKET_OUTGOING, hatype == ARPHRD_LOOPBACK, ifindex)
        elif linktype == LINKTYPE_ETHERNET and len(frame) >= 14:
            if struct.unpack_from("!H", frame, 12)[0] in (ETH_P_IP, ETH_P_IPV6):
                rec = _ip(frame[14:], ts, False, False, None)
        elif linktype == LINKTYPE_RAW:
            rec = _ip(frame, ts, False, False, None)
        elif linktype not in (LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, LINKTYPE_ETHERNET):
            raise PcapError(f"unsupported link type {linktype}")
        if rec is not None:
            out.append(rec)
    return out


def count_records(data: bytes) -> int:
    """Complete packet records in a classic pcap file, whatever they hold (a
    cut-off last record is not counted)."""
    if len(data) < PCAP_HEADER_LEN:
        raise PcapError(f"pcap too short ({len(data)} bytes)")
    end = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">",
           b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}.get(data[:4])
    if end is None:
        raise PcapError(f"not a classic pcap (magic {data[:4].hex()})")
    n, off = 0, PCAP_HEADER_LEN
    while off + PCAP_RECORD_LEN <= len(data):
        incl = struct.unpack_from(end + "I", data, off + 8)[0]
        off += PCAP_RECORD_LEN + incl
        if off > len(data):
            break
        n += 1
    return n


def dns_answers(payload: bytes) -> int | None:
    """A and AAAA records (class IN) in the answer section of a DNS response
    message; None when it is not a response or is cut short."""
    if len(payload) < 12 or not payload[2] & 0x80:
        return None
    qdcount, ancount = struct.unpack_from("!HH", payload, 4)

    def skip_name(off: int) -> int:
        while off < len(payload):
            n = payload[off]
            if n & 0xC0 == 0xC0:
                return off + 2
            if n == 0:
                return off + 1
            off += 1 + n
        raise IndexError("name runs past the message")

    try:
        off = 12
        for _ in range(qdcount):
            off = skip_name(off) + 4
        found = 0
        for _ in range(ancount):
            off = skip_name(off)
            rtype, rclass, _ttl, rdlen = struct.unpack_from("!HHIH", payload, off)
            off += 10 + rdlen
            if off > len(payload):
                return None
            found += rtype in (1, 28) and rclass == 1
        return found
    except (IndexError, struct.error):
        return None


def _norm(ep: tuple[str, int]) -> tuple[str, int]:
    return (str(ipaddress.ip_address(ep[0])), int(ep[1]))


@dataclasses.dataclass(frozen=True)
class Counter:
    """Packets and IP bytes."""

    packets: int = 0
    bytes: int = 0


@dataclasses.dataclass(frozen=True)
class FlowTotals:
    """Ground truth for one flow as seen from its local endpoint."""

    local: Counter  # sent by the local endpoint
    remote: Counter  # received from the remote endpoint


class Totals:
    """Per 5-tuple and direction packet/byte totals of a capture.

    ``sent[(proto, src, dst)]`` counts packets the host transmitted (packet
    type OUTGOING); ``received[...]`` counts packets delivered to the host.
    AF_PACKET shows a loopback packet once (as incoming); it is counted in
    both tables, as it is both sent and received by this host.
    """

    def __init__(self, packets: list[PacketRecord]):
        self.sent: dict[tuple, Counter] = defaultdict(Counter)
        self.received: dict[tuple, Counter] = defaultdict(Counter)
        for p in packets:
            key = (p.proto, p.src, p.dst)
            tables = (self.sent, self.received) if p.loopback else (self.sent if p.outgoing else self.received,)
            for table in tables:
                c = table[key]
                table[key] = Counter(c.packets + 1, c.bytes + p.ip_len)

    def flow(self, proto: str, local: tuple[str, int], remote: tuple[str, int]) -> FlowTotals:
        """Totals for the flow between ``local`` and ``remote`` (``(ip, port)``)."""
        local, remote = _norm(local), _norm(remote)
        return FlowTotals(self.sent.get((proto, local, remote), Counter()),
                          self.received.get((proto, remote, local), Counter()))

    def tuples(self) -> set[tuple]:
        """All (proto, src, dst) seen in either direction."""
        return set(self.sent) | set(self.received)


def assert_flow_matches(totals: Totals, proto: str, local: tuple[str, int], remote: tuple[str, int], *,
                        local_packets: int, local_bytes: int, remote_packets: int, remote_bytes: int,
                        packet_slack: int = 0, byte_slack: int = 0) -> FlowTotals:
    """Compare daemon-reported counters of one flow against the capture.

    ``*_slack`` allow that many packets/bytes of difference (e.g. a FIN that
    raced the end of a capture).  Raises AssertionError with both sides.
    """
    want = totals.flow(proto, local, remote)
    got = FlowTotals(Counter(local_packets, local_bytes), Counter(remote_packets, remote_bytes))
    ok = (abs(want.local.packets - got.local.packets) <= packet_slack
          and abs(want.remote.packets - got.remote.packets) <= packet_slack
          and abs(want.local.bytes - got.local.bytes) <= byte_slack
          and abs(want.remote.bytes - got.remote.bytes) <= byte_slack)
    assert ok, (f"{proto} {local} -> {remote}: daemon reported {got}, capture says {want} "
                f"(slack {packet_slack} packets, {byte_slack} bytes)")
    return want
