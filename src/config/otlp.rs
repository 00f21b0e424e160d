//! `export.otlp.*`: the OTLP logs sink, with its checks.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{duration, invalid, ConfigError, Secret, MAX_QUEUE_SIZE};

/// Default `export.otlp.queue_size` (records waiting in the hub for the
/// sink).
pub const DEFAULT_OTLP_QUEUE_SIZE: usize = 8192;
/// Default `export.otlp.max_batch_size` (log records per export request).
pub const DEFAULT_OTLP_MAX_BATCH_SIZE: usize = 512;
/// Largest accepted `export.otlp.max_batch_size`.
pub const MAX_OTLP_BATCH_SIZE: usize = 16_384;
/// Default `export.otlp.batch_timeout`: the longest a record waits for its
/// batch to fill.
pub const DEFAULT_OTLP_BATCH_TIMEOUT: Duration = Duration::from_secs(1);
/// Default `export.otlp.timeout` (one export request).
pub const DEFAULT_OTLP_TIMEOUT: Duration = Duration::from_secs(10);
/// Default `export.otlp.connect_timeout`.
pub const DEFAULT_OTLP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `export.otlp.max_retry_time`: how long one batch is retried.
pub const DEFAULT_OTLP_MAX_RETRY_TIME: Duration = Duration::from_secs(60);

/// Compression of export requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OtlpCompression {
    /// None (default).
    #[default]
    None,
    /// gzip.
    Gzip,
}

/// `export.otlp.*`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// The receiver's OTLP/gRPC endpoint, `http://host:4317` or
    /// `https://host:4317`; empty disables the sink.
    pub endpoint: String,
    /// gRPC metadata sent with every request (e.g. `authorization`); the
    /// values are secrets, never logged or shown.
    pub headers: BTreeMap<String, Secret>,
    /// Resource attributes added to the node's (`k8s.cluster.name`, …).
    pub resource_attributes: BTreeMap<String, String>,
    /// Export interim records of long flows too.
    pub include_updates: bool,
    /// Allow filters (`sockscope.v1.FlowFilter` objects, as for
    /// `export.jsonl.filters`).
    pub filters: Vec<serde_json::Value>,
    /// Deny filters.
    pub deny: Vec<serde_json::Value>,
    /// Records waiting in the hub for the sink; beyond it they are dropped
    /// and counted.
    pub queue_size: usize,
    /// Log records per export request.
    pub max_batch_size: usize,
    /// The longest a record waits for its batch to fill.
    #[serde(deserialize_with = "duration")]
    pub batch_timeout: Duration,
    /// Deadline of one export request.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// Deadline of establishing a connection.
    #[serde(deserialize_with = "duration")]
    pub connect_timeout: Duration,
    /// How long a batch the receiver could not take (unavailable, timed
    /// out, throttled) is retried, with backoff, before it is dropped and
    /// counted; 0 never retries.
    #[serde(deserialize_with = "duration")]
    pub max_retry_time: Duration,
    /// `none` (default) or `gzip`.
    pub compression: OtlpCompression,
    /// TLS, for `https://` endpoints.
    pub tls: OtlpTlsConfig,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        OtlpConfig {
            endpoint: String::new(),
            headers: BTreeMap::new(),
            resource_attributes: BTreeMap::new(),
            include_updates: false,
            filters: Vec::new(),
            deny: Vec::new(),
            queue_size: DEFAULT_OTLP_QUEUE_SIZE,
            max_batch_size: DEFAULT_OTLP_MAX_BATCH_SIZE,
            batch_timeout: DEFAULT_OTLP_BATCH_TIMEOUT,
            timeout: DEFAULT_OTLP_TIMEOUT,
            connect_timeout: DEFAULT_OTLP_CONNECT_TIMEOUT,
            max_retry_time: DEFAULT_OTLP_MAX_RETRY_TIME,
            compression: OtlpCompression::None,
            tls: OtlpTlsConfig::default(),
        }
    }
}

/// `export.otlp.tls.*`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpTlsConfig {
    /// CA certificates (PEM) the receiver's certificate is checked
    /// against, in addition to the system's.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM), with `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Name the receiver's certificate must carry, when not the endpoint's
    /// host.
    pub server_name: String,
}

impl OtlpTlsConfig {
    fn is_set(&self) -> bool {
        self.ca_file.is_some()
            || self.cert_file.is_some()
            || self.key_file.is_some()
            || !self.server_name.is_empty()
    }
}

impl OtlpConfig {
    /// Whether the sink is configured.
    pub fn enabled(&self) -> bool {
        !self.endpoint.trim().is_empty()
    }

    /// Whether the endpoint is `https://`.
    pub fn is_tls(&self) -> bool {
        self.endpoint.trim().starts_with("https://")
    }

    /// The gRPC metadata names of `headers`, lower-cased as gRPC sends
    /// them.
    pub fn header_names(&self) -> impl Iterator<Item = (String, &Secret)> {
        self.headers
            .iter()
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v))
    }

    /// Checks what the types cannot express (filters' fields are checked
    /// when the sink starts, as for `export.jsonl`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        let url = self.endpoint.trim();
        let uri: http::Uri = url
            .parse()
            .map_err(|e| invalid("export.otlp.endpoint", format!("{url:?}: {e}")))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => {
                return Err(invalid(
                    "export.otlp.endpoint",
                    format!("{url:?}: expected http://host:port or https://host:port"),
                ))
            }
        }
        let Some(authority) = uri.authority() else {
            return Err(invalid("export.otlp.endpoint", format!("{url:?}: no host")));
        };
        if authority.as_str().contains('@') {
            return Err(invalid(
                "export.otlp.endpoint",
                "credentials in the URL are refused (they would show in logs and status); \
                 put them in export.otlp.headers",
            ));
        }
        for (name, value) in self.header_names() {
            let bad_name = name.is_empty()
                || name.starts_with("grpc-")
                || name.ends_with("-bin")
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if bad_name {
                return Err(invalid(
                    &format!("export.otlp.headers.{name}"),
                    "expected a gRPC metadata name: lower-case letters, digits, '-', '_', \
                     '.', not starting with grpc- nor ending with -bin",
                ));
            }
            // The value is a secret: the reason names the rule, not it.
            if !value
                .expose()
                .bytes()
                .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
            {
                return Err(invalid(
                    &format!("export.otlp.headers.{name}"),
                    "the value must be printable ASCII",
                ));
            }
        }
        for k in self.resource_attributes.keys() {
            if k.trim().is_empty() {
                return Err(invalid(
                    "export.otlp.resource_attributes",
                    "an attribute name is empty",
                ));
            }
        }
        for (key, n, max) in [
            ("export.otlp.queue_size", self.queue_size, MAX_QUEUE_SIZE),
            (
                "export.otlp.max_batch_size",
                self.max_batch_size,
                MAX_OTLP_BATCH_SIZE,
            ),
        ] {
            if n == 0 || n > max {
                return Err(invalid(key, format!("{n} out of range 1-{max}")));
            }
        }
        for (key, d) in [
            ("export.otlp.batch_timeout", self.batch_timeout),
            ("export.otlp.timeout", self.timeout),
            ("export.otlp.connect_timeout", self.connect_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be greater than zero"));
            }
        }
        let t = &self.tls;
        if t.is_set() && !self.is_tls() {
            return Err(invalid(
                "export.otlp.tls",
                "TLS settings need an https:// endpoint",
            ));
        }
        if t.cert_file.is_some() != t.key_file.is_some() {
            return Err(invalid(
                "export.otlp.tls.key_file",
                "export.otlp.tls.cert_file and export.otlp.tls.key_file go together",
            ));
        }
        for (key, path) in [
            ("export.otlp.tls.ca_file", &t.ca_file),
            ("export.otlp.tls.cert_file", &t.cert_file),
            ("export.otlp.tls.key_file", &t.key_file),
        ] {
            if let Some(p) = path {
                if !p.is_file() {
                    return Err(invalid(key, format!("{}: no such file", p.display())));
                }
            }
        }
        for (name, list) in [("filters", &self.filters), ("deny", &self.deny)] {
            if let Some(i) = list.iter().position(|v| !v.is_object()) {
                return Err(invalid(
                    &format!("export.otlp.{name}[{i}]"),
                    "expected a FlowFilter object",
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enabled() -> OtlpConfig {
        OtlpConfig {
            endpoint: "http://127.0.0.1:4317".into(),
            ..OtlpConfig::default()
        }
    }

    fn key_of(r: Result<(), ConfigError>) -> String {
        match r {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid_and_disabled() {
        assert!(!OtlpConfig::default().enabled());
        OtlpConfig::default().validate().expect("disabled");
        enabled().validate().expect("plain endpoint");
    }

    #[test]
    fn bad_values_name_their_key() {
        let with_header = |k: &str, v: &str| OtlpConfig {
            headers: [(k.to_string(), Secret::from(v))].into(),
            ..enabled()
        };
        let cases: Vec<(OtlpConfig, &str)> = vec![
            (
                OtlpConfig {
                    endpoint: "grpc://127.0.0.1:4317".into(),
                    ..enabled()
                },
                "export.otlp.endpoint",
            ),
            (
                OtlpConfig {
                    endpoint: "http://u:p@127.0.0.1:4317".into(),
                    ..enabled()
                },
                "export.otlp.endpoint",
            ),
            (
                with_header("grpc-timeout", "1"),
                "export.otlp.headers.grpc-timeout",
            ),
            (with_header("x y", "1"), "export.otlp.headers.x y"),
            (
                with_header("authorization", "Bearer \u{1}"),
                "export.otlp.headers.authorization",
            ),
            (
                OtlpConfig {
                    max_batch_size: 0,
                    ..enabled()
                },
                "export.otlp.max_batch_size",
            ),
            (
                OtlpConfig {
                    batch_timeout: Duration::ZERO,
                    ..enabled()
                },
                "export.otlp.batch_timeout",
            ),
            (
                OtlpConfig {
                    tls: OtlpTlsConfig {
                        server_name: "x".into(),
                        ..OtlpTlsConfig::default()
                    },
                    ..enabled()
                },
                "export.otlp.tls",
            ),
            (
                OtlpConfig {
                    endpoint: "https://127.0.0.1:4317".into(),
                    tls: OtlpTlsConfig {
                        cert_file: Some("/nonexistent.pem".into()),
                        ..OtlpTlsConfig::default()
                    },
                    ..enabled()
                },
                "export.otlp.tls.key_file",
            ),
            (
                OtlpConfig {
                    endpoint: "https://127.0.0.1:4317".into(),
                    tls: OtlpTlsConfig {
                        ca_file: Some("/nonexistent.pem".into()),
                        ..OtlpTlsConfig::default()
                    },
                    ..enabled()
                },
                "export.otlp.tls.ca_file",
            ),
            (
                OtlpConfig {
                    filters: vec![serde_json::json!(1)],
                    ..enabled()
                },
                "export.otlp.filters[0]",
            ),
        ];
        for (cfg, key) in cases {
            assert_eq!(key_of(cfg.validate()), key, "{cfg:?}");
        }
    }

    #[test]
    fn header_values_are_secret_and_names_lower_cased() {
        let cfg = OtlpConfig {
            headers: [(
                "Authorization".to_string(),
                Secret::from("Bearer s3cr3t-v4lue"),
            )]
            .into(),
            ..enabled()
        };
        cfg.validate().expect("valid");
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("s3cr3t-v4lue"), "{shown}");
        let names: Vec<String> = cfg.header_names().map(|(k, _)| k).collect();
        assert_eq!(names, ["authorization"]);
    }
}
