//! `sockscope replay` on the connection-churn recordings of every kernel
//! (tests/fixtures/recorded/<kernel>/churn.rec): the flows it prints are
//! checked against the tcpdump capture made while the recording ran
//! (churn.totals.txt), not against anything the daemon computed.

use std::collections::HashMap;
use std::process::Command;

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

#[test]
fn replayed_churn_flows_match_the_capture() {
    for kernel in KERNELS {
        let rec = format!(
            "{}/tests/fixtures/recorded/{kernel}/churn.rec",
            env!("CARGO_MANIFEST_DIR")
        );
        let out = Command::new(env!("CARGO_BIN_EXE_sockscope"))
            .args(["replay", "--ecs", &rec])
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
                || (doc["source"]["port"] != SERVER_PORT
                    && doc["destination"]["port"] != SERVER_PORT)
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
        }
        // Two flows (client and server socket) per captured connection.
        assert_eq!(
            flows,
            capture.len(),
            "{kernel}: flows vs captured directions"
        );
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
