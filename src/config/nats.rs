//! `export.nats.*`: the NATS JetStream sink, with its checks.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{duration, invalid, ConfigError, MAX_QUEUE_SIZE};

/// Default `export.nats.subject_prefix`.
pub const DEFAULT_NATS_SUBJECT_PREFIX: &str = "sockscope.flows";
/// Default `export.nats.queue_size` (records waiting in the hub for the
/// sink).
pub const DEFAULT_NATS_QUEUE_SIZE: usize = 8192;
/// Default `export.nats.max_in_flight` (published, not yet acknowledged).
pub const DEFAULT_NATS_MAX_IN_FLIGHT: usize = 512;
/// Largest accepted `export.nats.max_in_flight`.
pub const MAX_NATS_IN_FLIGHT: usize = 65_536;
/// Default `export.nats.ack_timeout`.
pub const DEFAULT_NATS_ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `export.nats.connect_timeout`.
pub const DEFAULT_NATS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `export.nats.stream.name`.
pub const DEFAULT_NATS_STREAM: &str = "SOCKSCOPE_FLOWS";
/// Default `export.nats.status_interval`.
pub const DEFAULT_NATS_STATUS_INTERVAL: Duration = Duration::from_secs(30);
/// Largest accepted `export.nats.stream.replicas` (JetStream's own limit).
pub const MAX_NATS_REPLICAS: usize = 5;

/// A secret from the configuration: never shown by `Debug`.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether it is unset (empty).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_string())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "<redacted>"
        })
    }
}

/// Payload of the published records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum NatsFormat {
    /// Protobuf `sockscope.v1.Flow` (loss notices: `sockscope.v1.LossNotice`).
    #[default]
    Protobuf,
    /// The ECS document of the flow, as the JSON lines output writes it
    /// (loss notices: proto3 JSON of `sockscope.v1.LossNotice`).
    EcsJson,
}

/// `export.nats.*`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URLs, comma-separated (`nats://host:4222`, `tls://…`); empty
    /// disables the sink. Credentials go in `user`/`password`/`token`/
    /// `credentials_file`, never in the URL.
    pub url: String,
    /// First tokens of every subject: records go to
    /// `<prefix>.<node>.<transport>`, loss notices to `<prefix>.<node>.loss`.
    pub subject_prefix: String,
    /// `protobuf` (default) or `ecs_json`.
    pub format: NatsFormat,
    /// Publish interim records of long flows too.
    pub include_updates: bool,
    /// Allow filters (`sockscope.v1.FlowFilter` objects, as for
    /// `export.jsonl.filters`).
    pub filters: Vec<serde_json::Value>,
    /// Deny filters.
    pub deny: Vec<serde_json::Value>,
    /// Records waiting in the hub for the sink; beyond it they are dropped
    /// and counted.
    pub queue_size: usize,
    /// Records published and not yet acknowledged by the stream; while
    /// this many wait, the sink reads no more from its queue.
    pub max_in_flight: usize,
    /// How long one publication waits for its acknowledgement before it
    /// is sent again (with the same message id).
    #[serde(deserialize_with = "duration")]
    pub ack_timeout: Duration,
    /// How long the first connection attempt at start may take.
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// User name (with `password`).
    pub user: String,
    /// Password (with `user`).
    pub password: Secret,
    /// Authentication token.
    pub token: Secret,
    /// NATS credentials file (user JWT and NKey seed).
    pub credentials_file: Option<PathBuf>,
    /// TLS.
    pub tls: NatsTlsConfig,
    /// Stream created or checked at start.
    pub stream: NatsStreamConfig,
    /// How often `serve` publishes its status (its `GetStatus` answer) to
    /// `<prefix>.<node>.status`, for the relay's `nodes_seen`; also once
    /// at start and once at stop. 0 never publishes it.
    #[serde(deserialize_with = "duration")]
    pub status_interval: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: String::new(),
            subject_prefix: DEFAULT_NATS_SUBJECT_PREFIX.to_string(),
            format: NatsFormat::Protobuf,
            include_updates: false,
            filters: Vec::new(),
            deny: Vec::new(),
            queue_size: DEFAULT_NATS_QUEUE_SIZE,
            max_in_flight: DEFAULT_NATS_MAX_IN_FLIGHT,
            ack_timeout: DEFAULT_NATS_ACK_TIMEOUT,
            connect_timeout: DEFAULT_NATS_CONNECT_TIMEOUT,
            user: String::new(),
            password: Secret::default(),
            token: Secret::default(),
            credentials_file: None,
            tls: NatsTlsConfig::default(),
            stream: NatsStreamConfig::default(),
            status_interval: DEFAULT_NATS_STATUS_INTERVAL,
        }
    }
}

/// `export.nats.tls.*`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NatsTlsConfig {
    /// Require TLS even for `nats://` URLs.
    pub required: bool,
    /// CA certificates (PEM) the server's certificate is checked against,
    /// in addition to the system's.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM), with `cert_file`.
    pub key_file: Option<PathBuf>,
}

/// `export.nats.stream.*`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsStreamConfig {
    /// Create the stream at start when it does not exist; when it exists,
    /// check that it takes the sink's subjects.
    pub create: bool,
    /// Stream name.
    pub name: String,
    /// Subjects of a created stream; empty: `<subject_prefix>.>`.
    pub subjects: Vec<String>,
    /// Replicas of a created stream.
    pub replicas: usize,
    /// Oldest message age kept by a created stream; 0: no limit.
    #[serde(deserialize_with = "duration")]
    pub max_age: Duration,
    /// Bytes kept by a created stream; 0: no limit.
    pub max_bytes: u64,
}

impl Default for NatsStreamConfig {
    fn default() -> Self {
        NatsStreamConfig {
            create: false,
            name: DEFAULT_NATS_STREAM.to_string(),
            subjects: Vec::new(),
            replicas: 1,
            max_age: Duration::ZERO,
            max_bytes: 0,
        }
    }
}

impl NatsConfig {
    /// Whether the sink is configured.
    pub fn enabled(&self) -> bool {
        !self.url.trim().is_empty()
    }

    /// The server URLs, trimmed.
    pub fn servers(&self) -> Vec<&str> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// Subjects of the stream: the configured ones, else
    /// `<subject_prefix>.>`.
    pub fn stream_subjects(&self) -> Vec<String> {
        if self.stream.subjects.is_empty() {
            vec![format!("{}.>", self.subject_prefix.trim())]
        } else {
            self.stream.subjects.clone()
        }
    }

    /// Checks what the types cannot express (filters' fields are checked
    /// when the sink starts, as for `export.jsonl`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        for url in self.servers() {
            let scheme_end = url.find("://").map_or(0, |i| i + 3);
            let authority = url[scheme_end..].split('/').next().unwrap_or("");
            if authority.contains('@') {
                return Err(invalid(
                    "export.nats.url",
                    "credentials in the URL are refused (they would show in logs and \
                     status); use export.nats.user and export.nats.password, \
                     export.nats.token or export.nats.credentials_file",
                ));
            }
            url.parse::<async_nats::ServerAddr>()
                .map_err(|e| invalid("export.nats.url", format!("{url:?}: {e}")))?;
        }
        check_subject("export.nats.subject_prefix", self.subject_prefix.trim())?;
        for (key, n, max) in [
            ("export.nats.queue_size", self.queue_size, MAX_QUEUE_SIZE),
            (
                "export.nats.max_in_flight",
                self.max_in_flight,
                MAX_NATS_IN_FLIGHT,
            ),
        ] {
            if n == 0 || n > max {
                return Err(invalid(key, format!("{n} out of range 1-{max}")));
            }
        }
        for (key, d) in [
            ("export.nats.ack_timeout", self.ack_timeout),
            ("export.nats.connect_timeout", self.connect_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be greater than zero"));
            }
        }
        if self.user.is_empty() != self.password.is_empty() {
            return Err(invalid(
                "export.nats.password",
                "export.nats.user and export.nats.password go together",
            ));
        }
        let methods = [
            !self.user.is_empty(),
            !self.token.is_empty(),
            self.credentials_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(invalid(
                "export.nats.token",
                "set one of export.nats.user/password, export.nats.token and \
                 export.nats.credentials_file",
            ));
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(invalid(
                "export.nats.tls.key_file",
                "export.nats.tls.cert_file and export.nats.tls.key_file go together",
            ));
        }
        for (key, path) in [
            ("export.nats.credentials_file", &self.credentials_file),
            ("export.nats.tls.ca_file", &self.tls.ca_file),
            ("export.nats.tls.cert_file", &self.tls.cert_file),
            ("export.nats.tls.key_file", &self.tls.key_file),
        ] {
            if let Some(p) = path {
                if !p.is_file() {
                    return Err(invalid(key, format!("{}: no such file", p.display())));
                }
            }
        }
        let s = &self.stream;
        if s.create {
            let name = s.name.trim();
            if name.is_empty()
                || name
                    .chars()
                    .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
            {
                return Err(invalid(
                    "export.nats.stream.name",
                    format!("{name:?}: a stream name has no spaces, '.', '*', '>', '/' or '\\'"),
                ));
            }
            if s.replicas == 0 || s.replicas > MAX_NATS_REPLICAS {
                return Err(invalid(
                    "export.nats.stream.replicas",
                    format!("{} out of range 1-{MAX_NATS_REPLICAS}", s.replicas),
                ));
            }
            // Stream subjects may use wildcards.
            if let Some(i) = s.subjects.iter().position(|subject| {
                subject
                    .split('.')
                    .any(|t| t.is_empty() || t.chars().any(char::is_whitespace))
            }) {
                return Err(invalid(
                    &format!("export.nats.stream.subjects[{i}]"),
                    format!("{:?}: expected dot-separated tokens", s.subjects[i]),
                ));
            }
        }
        for (name, list) in [("filters", &self.filters), ("deny", &self.deny)] {
            if let Some(i) = list.iter().position(|v| !v.is_object()) {
                return Err(invalid(
                    &format!("export.nats.{name}[{i}]"),
                    "expected a FlowFilter object",
                ));
            }
        }
        Ok(())
    }
}

/// A literal subject: dot-separated non-empty tokens, no wildcard, no
/// white space.
fn check_subject(key: &str, subject: &str) -> Result<(), ConfigError> {
    let bad = subject.is_empty()
        || subject
            .split('.')
            .any(|t| t.is_empty() || t.chars().any(|c| c.is_whitespace() || c == '*' || c == '>'));
    if bad {
        return Err(invalid(
            key,
            format!("{subject:?}: expected dot-separated tokens without wildcards or spaces"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> NatsConfig {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            ..NatsConfig::default()
        }
    }

    fn key_of(r: Result<(), ConfigError>) -> String {
        match r {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn secrets_do_not_show_in_debug() {
        let c = NatsConfig {
            user: "u".into(),
            password: Secret::from("hunter2-password"),
            token: Secret::from("t0ken-value"),
            ..enabled()
        };
        let shown = format!("{c:?}");
        assert!(!shown.contains("hunter2-password"), "{shown}");
        assert!(!shown.contains("t0ken-value"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases: Vec<(NatsConfig, &str)> = vec![
            (
                NatsConfig {
                    url: "nats://u:p@127.0.0.1:4222".into(),
                    ..enabled()
                },
                "export.nats.url",
            ),
            (
                NatsConfig {
                    subject_prefix: "a..b".into(),
                    ..enabled()
                },
                "export.nats.subject_prefix",
            ),
            (
                NatsConfig {
                    subject_prefix: "flows.>".into(),
                    ..enabled()
                },
                "export.nats.subject_prefix",
            ),
            (
                NatsConfig {
                    user: "u".into(),
                    ..enabled()
                },
                "export.nats.password",
            ),
            (
                NatsConfig {
                    user: "u".into(),
                    password: "p".into(),
                    token: "t".into(),
                    ..enabled()
                },
                "export.nats.token",
            ),
            (
                NatsConfig {
                    max_in_flight: 0,
                    ..enabled()
                },
                "export.nats.max_in_flight",
            ),
            (
                NatsConfig {
                    credentials_file: Some("/nonexistent/x.creds".into()),
                    ..enabled()
                },
                "export.nats.credentials_file",
            ),
            (
                NatsConfig {
                    stream: NatsStreamConfig {
                        create: true,
                        name: "a.b".into(),
                        ..NatsStreamConfig::default()
                    },
                    ..enabled()
                },
                "export.nats.stream.name",
            ),
        ];
        for (cfg, key) in cases {
            assert_eq!(key_of(cfg.validate()), key);
        }
        assert!(enabled().validate().is_ok());
        // Disabled: nothing is checked.
        assert!(NatsConfig {
            max_in_flight: 0,
            ..NatsConfig::default()
        }
        .validate()
        .is_ok());
    }

    #[test]
    fn stream_subjects_default_to_the_prefix() {
        assert_eq!(enabled().stream_subjects(), vec!["sockscope.flows.>"]);
    }
}
