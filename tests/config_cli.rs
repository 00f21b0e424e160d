//! Configuration loading (precedence, unknown keys, validation) and the
//! command line's exit codes.

use std::io::Write;
use std::process::Command;

use sockscope::config::{self, ConfigError};
use sockscope::exit::ExitCode;

fn yaml(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::Builder::new()
        .suffix(".yml")
        .tempfile()
        .expect("tempfile");
    f.write_all(text.as_bytes()).expect("write");
    f
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn precedence_file_env_override() {
    let f = yaml("server:\n  history_size: 10\nsocket:\n  flow_inactive_timeout: 20s\n");
    let cfg = config::load_from(Some(f.path()), env(&[]), &[]).expect("file");
    assert_eq!(cfg.server.history_size, 10);
    assert_eq!(cfg.socket.flow_inactive_timeout.as_secs(), 20);
    assert_eq!(
        cfg.server.subscriber_queue_size,
        config::DEFAULT_SUBSCRIBER_QUEUE_SIZE
    );
    let e = env(&[
        ("SOCKSCOPE_SERVER__HISTORY_SIZE", "20"),
        ("SOCKSCOPE_SOCKET__FLOW_INACTIVE_TIMEOUT", "10s"),
        ("OTHER_SERVER__HISTORY_SIZE", "99"),
    ]);
    let cfg = config::load_from(Some(f.path()), e.clone(), &[]).expect("env");
    assert_eq!(cfg.server.history_size, 20);
    assert_eq!(cfg.socket.flow_inactive_timeout.as_secs(), 10);
    let cfg = config::load_from(
        Some(f.path()),
        e,
        &[
            "server.history_size=30".into(),
            "socket.flow_inactive_timeout=7".into(),
        ],
    )
    .expect("override");
    assert_eq!(cfg.server.history_size, 30);
    assert_eq!(cfg.socket.flow_inactive_timeout.as_secs(), 7);
}

fn invalid_key(r: Result<config::Config, ConfigError>) -> (String, String) {
    match r {
        Err(ConfigError::Invalid { key, reason }) => (key, reason),
        other => panic!("expected an invalid-key error, got {other:?}"),
    }
}

#[test]
fn unknown_keys_and_bad_values_name_the_key() {
    let f = yaml("socket:\n  flow_inactive_timeot: 20s\n");
    let (key, reason) = invalid_key(config::load_from(Some(f.path()), env(&[]), &[]));
    assert_eq!(key, "socket.flow_inactive_timeot");
    assert!(reason.contains("flow_inactive_timeot"), "{reason}");
    let (key, reason) = invalid_key(config::load_from(
        None,
        env(&[("SOCKSCOPE_SOCKET__FLOW_INACTIVE_TIMEOUT", "soon")]),
        &[],
    ));
    assert_eq!(key, "socket.flow_inactive_timeout");
    assert!(reason.contains("invalid duration"), "{reason}");
    let (key, _) = invalid_key(config::load_from(
        None,
        env(&[]),
        &["server.history_size=lots".into()],
    ));
    assert_eq!(key, "server.history_size");
    let (key, reason) = invalid_key(config::load_from(
        None,
        env(&[]),
        &["socket.ring_size_exponent=17".into()],
    ));
    assert_eq!(key, "socket.ring_size_exponent");
    assert!(reason.contains("16"), "{reason}");
    for (o, want) in [
        (
            "server.subscriber_queue_size=0",
            "server.subscriber_queue_size",
        ),
        (
            "socket.dns.af_packet.snaplen=10",
            "socket.dns.af_packet.snaplen",
        ),
        (
            "socket.flow_termination_timeout=0s",
            "socket.flow_termination_timeout",
        ),
        ("server.listen=0.0.0.0:50051", "server.listen"),
        ("log.format=xml", "log.format"),
    ] {
        let (key, _) = invalid_key(config::load_from(None, env(&[]), &[o.to_string()]));
        assert_eq!(key, want, "{o}");
    }
    config::load_from(
        None,
        env(&[]),
        &[
            "server.listen=0.0.0.0:50051".into(),
            "server.insecure_listen=true".into(),
        ],
    )
    .expect("insecure_listen allows plaintext");
    assert!(matches!(
        config::load_from(None, env(&[]), &["novalue".into()]),
        Err(ConfigError::Override(_))
    ));
}

#[test]
fn example_config_is_valid() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/sockscope.yml");
    let cfg = config::load_from(Some(&path), env(&[]), &[]).expect("deploy/sockscope.yml");
    assert_eq!(cfg.server.listen, config::DEFAULT_LISTEN);
}

fn sockscope(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sockscope"));
    c.args(args);
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("run sockscope")
}

#[test]
fn binary_exit_codes() {
    let bad = yaml("server:\n  histroy_size: 5\n");
    let out = sockscope(&["-c", bad.path().to_str().expect("path"), "check"], &[]);
    assert_eq!(out.status.code(), Some(ExitCode::Usage.code()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("server") && stderr.contains("histroy_size"),
        "{stderr}"
    );
    let out = sockscope(
        &["check"],
        &[("SOCKSCOPE_SOCKET__RING_SIZE_EXPONENT", "99")],
    );
    assert_eq!(out.status.code(), Some(ExitCode::Usage.code()));
    assert!(String::from_utf8_lossy(&out.stderr).contains("socket.ring_size_exponent"));
    let out = sockscope(&["-E", "socket.perf_queue_size=-1", "check"], &[]);
    assert_eq!(out.status.code(), Some(ExitCode::Usage.code()));
    assert!(String::from_utf8_lossy(&out.stderr).contains("socket.perf_queue_size"));
    let out = sockscope(&["watch", "--bogus-flag"], &[]);
    assert_eq!(out.status.code(), Some(ExitCode::Usage.code()));
    let out = sockscope(&["--help"], &[]);
    assert_eq!(out.status.code(), Some(ExitCode::Ok.code()));
    // Nothing listens on this port: unreachable server.
    let out = sockscope(
        &[
            "-E",
            "server.unix_socket=",
            "status",
            "--server",
            "127.0.0.1:9",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(ExitCode::Unavailable.code()));
}

#[test]
fn only_sectioned_environment_variables_are_configuration() {
    // Variables without the `__` nesting separator belong to other tools
    // (e.g. the test bed's SOCKSCOPE_KERNELS) and are ignored...
    let cfg = config::load_from(
        None,
        env(&[
            ("SOCKSCOPE_KERNELS", "bookworm"),
            ("SOCKSCOPE_VM_LOGS", "/tmp/x"),
        ]),
        &[],
    )
    .expect("unrelated SOCKSCOPE_ variables are not configuration");
    assert_eq!(
        cfg.socket.flow_inactive_timeout,
        config::DEFAULT_FLOW_INACTIVE_TIMEOUT
    );
    // ...while a sectioned one with an unknown key is still an error.
    let (key, _) = invalid_key(config::load_from(
        None,
        env(&[("SOCKSCOPE_SOCKET__NO_SUCH_KEY", "1")]),
        &[],
    ));
    assert_eq!(key, "socket.no_such_key");
}

/// The exit codes the README documents (API section and Troubleshooting
/// table) are exactly the ones the process can return.
#[test]
fn readme_documents_every_exit_code() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let troubleshooting = readme
        .split("## Troubleshooting")
        .nth(1)
        .and_then(|t| t.split("\n## ").next())
        .expect("Troubleshooting section");
    let mut documented: Vec<i32> = troubleshooting
        .lines()
        .filter_map(|l| l.strip_prefix("| "))
        .filter_map(|l| l.split(" | ").next())
        .flat_map(|cell| cell.split(", ").map(str::parse::<i32>).collect::<Vec<_>>())
        .filter_map(Result::ok)
        .filter(|n| (0..=255).contains(n))
        .collect();
    let api = readme
        .split("Exit codes: ")
        .nth(1)
        .and_then(|t| t.split(" one per cause").next())
        .expect("exit codes paragraph");
    documented.extend(
        api.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<i32>().ok())
            .filter(|n| *n < 10),
    );
    documented.sort_unstable();
    documented.dedup();
    let all: Vec<i32> = ExitCode::ALL.iter().map(|c| c.code()).collect();
    assert_eq!(documented, all);
}
