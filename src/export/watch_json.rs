//! proto3 JSON of the flow stream's messages, written directly.
//!
//! `sockscope watch --format json` prints one `StreamFlowsResponse` per
//! line in the canonical proto3 JSON mapping (lowerCamelCase names, 64-bit
//! integers as strings, enums by name, default values left out, timestamps
//! in RFC 3339). The generic path ([`super::client::proto_json`]: encode,
//! decode into a reflective message, serialize) costs tens of microseconds
//! per record; this writer produces the same JSON from the generated types
//! in a fraction of that. A unit test checks both give the same JSON value
//! on varied messages; a message type this writer does not know about
//! would not compile here, and a field added to the proto but not here is
//! caught by that test (the reflective output would have it).

use std::io::Write;

use super::proto::stream_flows_response::Event;
use super::proto::{
    Accounting, Credentials, Direction, Flow, FlowEndpoint, IpVersion, LossNotice, LossSource,
    Network, Pod, Principal, Process, StreamFlowsResponse, Transport,
};

/// Nanoseconds per second.
const NANOS: i64 = 1_000_000_000;

/// A JSON object being written: commas between fields, defaults left out.
struct Obj<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

impl<'a> Obj<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Obj { out, first: true }
    }

    fn key(&mut self, name: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    /// A key that may need escaping (a map's).
    fn key_escaped(&mut self, name: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        string(self.out, name);
        self.out.push(b':');
    }

    fn str(&mut self, name: &str, v: &str) {
        if !v.is_empty() {
            self.key(name);
            string(self.out, v);
        }
    }

    fn u32(&mut self, name: &str, v: u32) {
        if v != 0 {
            self.key(name);
            uint(self.out, u64::from(v));
        }
    }

    /// 64-bit integers are strings in proto3 JSON.
    fn u64(&mut self, name: &str, v: u64) {
        if v != 0 {
            self.key(name);
            self.out.push(b'"');
            uint(self.out, v);
            self.out.push(b'"');
        }
    }

    fn bool(&mut self, name: &str, v: bool) {
        if v {
            self.key(name);
            self.out.extend_from_slice(b"true");
        }
    }

    /// An enum by name; a number the schema does not know as a number.
    fn enumeration(&mut self, name: &str, v: i32, known: Option<&'static str>) {
        if v != 0 {
            self.key(name);
            match known {
                Some(n) => string(self.out, n),
                None => {
                    self.out
                        .extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
                }
            }
        }
    }

    fn timestamp(&mut self, name: &str, t: Option<&prost_types::Timestamp>) {
        if let Some(t) = t {
            self.key(name);
            timestamp(self.out, t);
        }
    }

    fn end(self) {
        self.out.push(b'}');
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        // Nothing to escape (the common case): copied as it is.
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // serde_json's escaping, written into the buffer.
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// An unsigned integer in decimal.
fn uint(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// `v` in decimal with leading zeros to `width` digits (wider when it
/// needs more).
fn padded(out: &mut Vec<u8>, v: u64, width: usize) {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(v).as_bytes();
    out.extend(std::iter::repeat_n(
        b'0',
        width.saturating_sub(digits.len()),
    ));
    out.extend_from_slice(digits);
}

/// Fractional seconds as proto3 JSON writes them: none, or 3, 6 or 9
/// digits.
fn fraction(out: &mut Vec<u8>, nanos: u32) {
    if nanos == 0 {
        return;
    }
    out.push(b'.');
    let nanos = u64::from(nanos);
    if nanos % 1_000_000 == 0 {
        padded(out, nanos / 1_000_000, 3);
    } else if nanos % 1_000 == 0 {
        padded(out, nanos / 1_000, 6);
    } else {
        padded(out, nanos, 9);
    }
}

fn timestamp(out: &mut Vec<u8>, t: &prost_types::Timestamp) {
    let total = i128::from(t.seconds) * i128::from(NANOS) + i128::from(t.nanos);
    let secs = total.div_euclid(i128::from(NANOS));
    let nanos = total.rem_euclid(i128::from(NANOS)) as u32;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days as i64);
    out.push(b'"');
    match u64::try_from(y) {
        Ok(y) => padded(out, y, 4),
        Err(_) => {
            let _ = write!(out, "{y:04}");
        }
    }
    // Within a day: fits any integer type.
    let rem = rem as u64;
    for (sep, v) in [
        (b'-', u64::from(m)),
        (b'-', u64::from(d)),
        (b'T', rem / 3600),
        (b':', rem % 3600 / 60),
        (b':', rem % 60),
    ] {
        out.push(sep);
        padded(out, v, 2);
    }
    fraction(out, nanos);
    out.extend_from_slice(b"Z\"");
}

/// Year, month, day of a day count from 1970-01-01 (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn duration(out: &mut Vec<u8>, d: &prost_types::Duration) {
    let total = i128::from(d.seconds) * i128::from(NANOS) + i128::from(d.nanos);
    let neg = total < 0;
    let abs = total.unsigned_abs();
    out.push(b'"');
    if neg {
        out.push(b'-');
    }
    match u64::try_from(abs / NANOS as u128) {
        Ok(secs) => uint(out, secs),
        Err(_) => {
            let _ = write!(out, "{}", abs / NANOS as u128);
        }
    }
    fraction(out, (abs % NANOS as u128) as u32);
    out.extend_from_slice(b"s\"");
}

fn endpoint(o: &mut Obj<'_>, name: &str, e: Option<&FlowEndpoint>) {
    let Some(e) = e else { return };
    o.key(name);
    let mut x = Obj::new(o.out);
    x.str("ip", &e.ip);
    x.u32("port", e.port);
    x.u64("packets", e.packets);
    x.u64("bytes", e.bytes);
    x.str("domain", &e.domain);
    if let Some(q) = e.sequence_space.as_ref() {
        x.key("sequenceSpace");
        let mut y = Obj::new(x.out);
        y.u64("payloadBytes", q.payload_bytes);
        y.u64("uncountedBytes", q.uncounted_bytes);
        y.bool("fromSyn", q.from_syn);
        y.end();
    }
    x.end();
}

fn network(o: &mut Obj<'_>, n: Option<&Network>) {
    let Some(n) = n else { return };
    o.key("network");
    let mut x = Obj::new(o.out);
    let known = |v| Transport::try_from(v).ok().map(|e| e.as_str_name());
    x.enumeration("transport", n.transport, known(n.transport));
    let known = IpVersion::try_from(n.r#type).ok().map(|e| e.as_str_name());
    x.enumeration("type", n.r#type, known);
    let known = Direction::try_from(n.direction)
        .ok()
        .map(|e| e.as_str_name());
    x.enumeration("direction", n.direction, known);
    x.str("communityId", &n.community_id);
    x.u64("packets", n.packets);
    x.u64("bytes", n.bytes);
    x.end();
}

fn process(o: &mut Obj<'_>, p: Option<&Process>) {
    let Some(p) = p else { return };
    o.key("process");
    let mut x = Obj::new(o.out);
    x.u32("pid", p.pid);
    x.u32("ppid", p.ppid);
    x.str("name", &p.name);
    if !p.args.is_empty() {
        x.key("args");
        x.out.push(b'[');
        for (i, a) in p.args.iter().enumerate() {
            if i > 0 {
                x.out.push(b',');
            }
            string(x.out, a);
        }
        x.out.push(b']');
    }
    x.str("executable", &p.executable);
    x.timestamp("created", p.created.as_ref());
    x.end();
}

fn strings(o: &mut Obj<'_>, name: &str, v: &[String]) {
    if v.is_empty() {
        return;
    }
    o.key(name);
    o.out.push(b'[');
    for (i, a) in v.iter().enumerate() {
        if i > 0 {
            o.out.push(b',');
        }
        string(o.out, a);
    }
    o.out.push(b']');
}

/// A `map<string, string>`, keys in order.
fn map(o: &mut Obj<'_>, name: &str, m: &std::collections::HashMap<String, String>) {
    if m.is_empty() {
        return;
    }
    o.key(name);
    let mut keys: Vec<&String> = m.keys().collect();
    keys.sort();
    let mut x = Obj::new(o.out);
    for k in keys {
        x.key_escaped(k);
        string(x.out, &m[k]);
    }
    x.end();
}

fn pod(o: &mut Obj<'_>, name: &str, p: Option<&Pod>) {
    let Some(p) = p else { return };
    o.key(name);
    let mut x = Obj::new(o.out);
    x.str("name", &p.name);
    x.str("namespace", &p.namespace);
    x.str("uid", &p.uid);
    map(&mut x, "labels", &p.labels);
    map(&mut x, "annotations", &p.annotations);
    if let Some(w) = &p.workload {
        x.key("workload");
        let mut y = Obj::new(x.out);
        y.str("kind", &w.kind);
        y.str("name", &w.name);
        y.end();
    }
    x.str("containerName", &p.container_name);
    x.str("image", &p.image);
    strings(&mut x, "ips", &p.ips);
    x.end();
}

fn principal(o: &mut Obj<'_>, name: &str, p: Option<&Principal>) {
    let Some(p) = p else { return };
    o.key(name);
    let mut x = Obj::new(o.out);
    x.u32("id", p.id);
    x.str("name", &p.name);
    x.end();
}

fn credentials(o: &mut Obj<'_>, c: Option<&Credentials>) {
    let Some(c) = c else { return };
    o.key("credentials");
    let mut x = Obj::new(o.out);
    x.u32("uid", c.uid);
    x.u32("gid", c.gid);
    x.u32("euid", c.euid);
    x.u32("egid", c.egid);
    x.end();
}

fn flow(out: &mut Vec<u8>, f: &Flow) {
    let mut o = Obj::new(out);
    o.u64("id", f.id);
    o.bool("final", f.r#final);
    o.bool("complete", f.complete);
    endpoint(&mut o, "source", f.source.as_ref());
    endpoint(&mut o, "destination", f.destination.as_ref());
    endpoint(&mut o, "client", f.client.as_ref());
    endpoint(&mut o, "server", f.server.as_ref());
    endpoint(&mut o, "local", f.local.as_ref());
    endpoint(&mut o, "remote", f.remote.as_ref());
    network(&mut o, f.network.as_ref());
    process(&mut o, f.process.as_ref());
    principal(&mut o, "user", f.user.as_ref());
    principal(&mut o, "group", f.group.as_ref());
    credentials(&mut o, f.credentials.as_ref());
    o.timestamp("start", f.start.as_ref());
    o.timestamp("end", f.end.as_ref());
    if let Some(d) = &f.duration {
        o.key("duration");
        duration(o.out, d);
    }
    o.str("kernelSockAddress", &f.kernel_sock_address);
    o.str("hostName", &f.host_name);
    o.str("containerId", &f.container_id);
    o.str("podUid", &f.pod_uid);
    let known = Accounting::try_from(f.accounting)
        .ok()
        .map(|e| e.as_str_name());
    o.enumeration("accounting", f.accounting, known);
    pod(&mut o, "pod", f.pod.as_ref());
    pod(&mut o, "remotePod", f.remote_pod.as_ref());
    o.end();
}

fn loss(out: &mut Vec<u8>, l: &LossNotice) {
    let mut o = Obj::new(out);
    let known = LossSource::try_from(l.source).ok().map(|e| e.as_str_name());
    o.enumeration("source", l.source, known);
    if let Some(cpu) = l.cpu {
        // Explicit presence: written even when zero.
        o.key("cpu");
        uint(o.out, u64::from(cpu));
    }
    o.u64("count", l.count);
    o.timestamp("first", l.first.as_ref());
    o.timestamp("last", l.last.as_ref());
    o.end();
}

/// One response as a line of proto3 JSON (no newline) into `out`, cleared
/// first.
pub fn response_line(r: &StreamFlowsResponse, out: &mut Vec<u8>) {
    out.clear();
    let mut o = Obj::new(out);
    match &r.event {
        Some(Event::Flow(f)) => {
            o.key("flow");
            flow(o.out, f);
        }
        Some(Event::Loss(l)) => {
            o.key("loss");
            loss(o.out, l);
        }
        None => {}
    }
    if !r.flows.is_empty() {
        o.key("flows");
        o.out.push(b'[');
        for (i, f) in r.flows.iter().enumerate() {
            if i > 0 {
                o.out.push(b',');
            }
            flow(o.out, f);
        }
        o.out.push(b']');
    }
    o.str("nodeName", &r.node_name);
    o.timestamp("time", r.time.as_ref());
    o.u64("sequence", r.sequence);
    o.end();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::client::proto_json;
    use crate::export::proto::{SequenceSpace, Workload};

    const NAME: &str = "sockscope.v1.StreamFlowsResponse";

    /// A small deterministic generator (xorshift).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn some(&mut self) -> bool {
            self.pick(3) != 0
        }
        fn text(&mut self) -> String {
            const PARTS: [&str; 6] = ["", "curl", "a\"b\\c", "é ✓", "line\nbreak", "\u{1}"];
            PARTS[self.pick(PARTS.len() as u64) as usize].to_string()
        }
        fn small(&mut self) -> u32 {
            [0, 1, 80, u32::MAX][self.pick(4) as usize]
        }
        fn big(&mut self) -> u64 {
            [0, 1, 1 << 40, u64::MAX][self.pick(4) as usize]
        }
        fn nanos(&mut self) -> i32 {
            [0, 1, 123_000_000, 123_456_000, 999_999_999][self.pick(5) as usize]
        }
        fn time(&mut self) -> Option<prost_types::Timestamp> {
            self.some().then(|| prost_types::Timestamp {
                seconds: [0, 1_764_630_000, 951_782_400, 4_102_444_799][self.pick(4) as usize],
                nanos: self.nanos(),
            })
        }
        fn enumeration(&mut self, max: i32) -> i32 {
            [0, 1, max, max + 7][self.pick(4) as usize]
        }
        fn endpoint(&mut self) -> Option<FlowEndpoint> {
            self.some().then(|| FlowEndpoint {
                ip: ["", "10.0.0.1", "::1"][self.pick(3) as usize].into(),
                port: self.small(),
                packets: self.big(),
                bytes: self.big(),
                domain: self.text(),
                sequence_space: self.some().then(|| SequenceSpace {
                    payload_bytes: self.big(),
                    uncounted_bytes: self.big(),
                    from_syn: self.some(),
                }),
            })
        }
        fn flow(&mut self) -> Flow {
            Flow {
                id: self.big(),
                r#final: self.some(),
                complete: self.some(),
                source: self.endpoint(),
                destination: self.endpoint(),
                client: self.endpoint(),
                server: self.endpoint(),
                local: self.endpoint(),
                remote: self.endpoint(),
                network: self.some().then(|| Network {
                    transport: self.enumeration(2),
                    r#type: self.enumeration(2),
                    direction: self.enumeration(3),
                    community_id: self.text(),
                    packets: self.big(),
                    bytes: self.big(),
                }),
                process: self.some().then(|| Process {
                    pid: self.small(),
                    ppid: self.small(),
                    name: self.text(),
                    args: (0..self.pick(3)).map(|_| self.text()).collect(),
                    executable: self.text(),
                    created: self.time(),
                }),
                user: self.some().then(|| Principal {
                    id: self.small(),
                    name: self.text(),
                }),
                group: self.some().then(|| Principal {
                    id: self.small(),
                    name: self.text(),
                }),
                credentials: self.some().then(|| Credentials {
                    uid: self.small(),
                    gid: self.small(),
                    euid: self.small(),
                    egid: self.small(),
                }),
                start: self.time(),
                end: self.time(),
                duration: self.some().then(|| prost_types::Duration {
                    seconds: [0, 3, 86_400][self.pick(3) as usize],
                    nanos: self.nanos(),
                }),
                kernel_sock_address: self.text(),
                host_name: self.text(),
                container_id: self.text(),
                pod_uid: self.text(),
                accounting: self.enumeration(2),
                pod: self.some().then(|| self.pod()),
                remote_pod: self.some().then(|| self.pod()),
            }
        }
        fn pod(&mut self) -> Pod {
            let map = |rng: &mut Self| {
                (0..rng.pick(3))
                    .map(|_| (rng.text(), rng.text()))
                    .collect::<std::collections::HashMap<_, _>>()
            };
            Pod {
                name: self.text(),
                namespace: self.text(),
                uid: self.text(),
                labels: map(self),
                annotations: map(self),
                workload: self.some().then(|| Workload {
                    kind: self.text(),
                    name: self.text(),
                }),
                container_name: self.text(),
                image: self.text(),
                ips: (0..self.pick(3)).map(|_| self.text()).collect(),
            }
        }
        fn response(&mut self) -> StreamFlowsResponse {
            StreamFlowsResponse {
                event: match self.pick(3) {
                    0 => None,
                    1 => Some(Event::Flow(self.flow())),
                    _ => Some(Event::Loss(LossNotice {
                        source: self.enumeration(10),
                        cpu: self.some().then(|| self.small()),
                        count: self.big(),
                        first: self.time(),
                        last: self.time(),
                    })),
                },
                flows: (0..self.pick(3)).map(|_| self.flow()).collect(),
                node_name: self.text(),
                time: self.time(),
                sequence: self.big(),
            }
        }
    }

    #[test]
    fn direct_json_equals_the_reflective_json() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut line = Vec::new();
        for i in 0..2000 {
            let r = rng.response();
            response_line(&r, &mut line);
            let got: serde_json::Value = serde_json::from_slice(&line)
                .unwrap_or_else(|e| panic!("#{i}: {e}: {}", String::from_utf8_lossy(&line)));
            let want = proto_json(&r, NAME).expect("reflective json");
            assert_eq!(got, want, "#{i}: {r:?}");
            assert!(!line.contains(&b'\n'));
        }
    }

    #[test]
    fn dates_around_leap_years_and_the_epoch() {
        for (secs, want) in [
            (0, "\"1970-01-01T00:00:00Z\""),
            (951_782_400, "\"2000-02-29T00:00:00Z\""),
            (4_102_444_799, "\"2099-12-31T23:59:59Z\""),
            (-1, "\"1969-12-31T23:59:59Z\""),
        ] {
            let mut out = Vec::new();
            timestamp(
                &mut out,
                &prost_types::Timestamp {
                    seconds: secs,
                    nanos: 0,
                },
            );
            assert_eq!(String::from_utf8(out).unwrap(), want);
        }
    }
}
