//! `sockscope replay` on the connection-churn recordings of every kernel
//! (tests/fixtures/recorded/<kernel>/churn.rec): the flows it prints are
//! checked against the tcpdump capture made while the recording ran
//! (churn.totals.txt), not against anything the daemon computed.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use sockscope::ring::recording::{Recorder, Replay};
use sockscope::ring::RingItem;

/// Kernels with recorded sessions.
const KERNELS: [&str; 4] = ["5.10", "6.1", "6.12", "7.2"];
/// The HTTP server port of the churn workload.
const SERVER_PORT: u64 = 8081;

/// (packets, IP bytes) sent per (source, destination) of TCP port
/// [`SERVER_PORT`] in a capture totals file.
fn captured(kernel: &str) -> HashMap<(String, String), (u64, u64)> {
    let path = format!(
        "{}/tests/fixtures/recorded/{kernel}/churn.totals.txt",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).expect("capture totals");
    let mut out = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [proto, src, dst, dir, packets, bytes] = f[..] else {
            panic!("{path}: odd line {line:?}");
        };
        let port_of = |ep: &str| ep.rsplit(':').next().and_then(|p| p.parse::<u64>().ok());
        if proto != "tcp"
            || dir != "sent"
            || (port_of(src) != Some(SERVER_PORT) && port_of(dst) != Some(SERVER_PORT))
        {
            continue;
        }
        let e = out
            .entry((src.to_string(), dst.to_string()))
            .or_insert((0, 0));
        e.0 += packets.parse::<u64>().expect("packets");
        e.1 += bytes.parse::<u64>().expect("bytes");
    }
    out
}

fn endpoint(doc: &serde_json::Value, side: &str) -> String {
    format!(
        "{}:{}",
        doc[side]["ip"].as_str().unwrap_or("?"),
        doc[side]["port"]
    )
}

/// Replays `rec` and checks its flows of the churn server against the
/// capture of `kernel`, flow by flow; every such flow must be complete and
/// have the direction of its socket (the server's accepted sockets
/// inbound, the clients' outbound).
fn check_replay(kernel: &str, rec: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_sockscope"))
        .arg("replay")
        .arg("--ecs")
        .arg(rec)
        .output()
        .expect("run sockscope replay");
    assert!(
        out.status.success(),
        "{kernel}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stderr);
    assert!(summary.contains("decode errors 0"), "{kernel}: {summary}");
    let capture = captured(kernel);
    assert!(
        capture.len() >= 200,
        "{kernel}: capture holds {} directions",
        capture.len()
    );
    let mut flows = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let doc: serde_json::Value = serde_json::from_str(line).expect("ECS document");
        if doc["network"]["transport"] != "tcp"
            || (doc["source"]["port"] != SERVER_PORT && doc["destination"]["port"] != SERVER_PORT)
        {
            continue;
        }
        flows += 1;
        // Both sockets of a loopback connection see every packet of
        // it: each flow's totals are the capture's two directions.
        let (c, s) = (endpoint(&doc, "client"), endpoint(&doc, "server"));
        let up = capture
            .get(&(c.clone(), s.clone()))
            .copied()
            .unwrap_or_default();
        let down = capture
            .get(&(s.clone(), c.clone()))
            .copied()
            .unwrap_or_default();
        assert_eq!(
            (
                doc["network"]["packets"].as_u64(),
                doc["network"]["bytes"].as_u64()
            ),
            (Some(up.0 + down.0), Some(up.1 + down.1)),
            "{kernel}: flow {c} -> {s}"
        );
        assert_eq!(doc["flow"]["complete"], true, "{kernel}: {c} -> {s}");
        // Nothing was lost: each end's sequence numbers, from its SYN,
        // show no byte that no counted packet carried.
        for side in ["client", "server"] {
            let q = &doc[side]["sequence_space"];
            assert_eq!(
                (q["uncounted_bytes"].as_u64(), q["from_syn"].as_bool()),
                (Some(0), Some(true)),
                "{kernel}: {c} -> {s}: {side} {q}"
            );
        }
        let server_side =
            doc["server"]["port"] == SERVER_PORT && doc["network"]["direction"] == "inbound";
        let client_side =
            doc["client"]["port"] != SERVER_PORT && doc["network"]["direction"] == "outbound";
        assert!(
            server_side || client_side,
            "{kernel}: {c} -> {s}: {}",
            doc["network"]
        );
    }
    // Two flows (client and server socket) per captured connection.
    assert_eq!(
        flows,
        capture.len(),
        "{kernel}: flows vs captured directions"
    );
}

fn churn_recording(kernel: &str) -> String {
    format!(
        "{}/tests/fixtures/recorded/{kernel}/churn.rec",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn replayed_churn_flows_match_the_capture() {
    for kernel in KERNELS {
        check_replay(kernel, Path::new(&churn_recording(kernel)));
    }
}

/// The same recordings without their `tcp_accept` and `tcp_connect`
/// samples, as if every accept had been blocked before the probes were
/// installed and every connect had been missed: the handshake alone gives
/// each flow its direction, and the counters do not change.
#[test]
fn without_connect_and_accept_the_handshake_gives_direction() {
    let dir = tempfile::tempdir().expect("tempdir");
    for kernel in KERNELS {
        let mut replay = Replay::open(Path::new(&churn_recording(kernel))).expect("recording");
        let header = replay.header().clone();
        let dropped: Vec<u32> = header
            .events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.name.ends_with("/tcp_accept") || e.name.ends_with("/tcp_connect"))
            .map(|(i, _)| i as u32)
            .collect();
        assert_eq!(dropped.len(), 2, "{kernel}: both probes recorded");
        let path = dir.path().join(format!("{kernel}.rec"));
        let mut rec = Recorder::create(&path, &header).expect("create");
        let (mut kept, mut removed) = (0u64, 0u64);
        replay
            .for_each(|item| {
                if matches!(&item, RingItem::Sample(s) if dropped.contains(&s.event)) {
                    removed += 1;
                } else {
                    kept += 1;
                    rec.write(&item).expect("write");
                }
            })
            .expect("replay");
        rec.finish().expect("finish");
        assert!(
            removed >= 240,
            "{kernel}: {removed} connect/accept samples removed"
        );
        assert!(kept > removed, "{kernel}");
        check_replay(kernel, &path);
    }
}

#[test]
fn replay_of_a_missing_or_foreign_file_fails_clearly() {
    let out = Command::new(env!("CARGO_BIN_EXE_sockscope"))
        .args(["replay", "/nonexistent/recording"])
        .output()
        .expect("run sockscope replay");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/recording"));
    let not_a_recording = format!("{}/Cargo.toml", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_sockscope"))
        .args(["replay", &not_a_recording])
        .output()
        .expect("run sockscope replay");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
