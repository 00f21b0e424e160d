//! JSON lines output: ECS flow documents ([`ecs::flow_document`]) appended
//! to a file (with size-based rotation) or written to standard output.
//!
//! The writer is a [`sink::Sink`], an ordinary subscriber of the fan-out
//! [`Hub`]: it never slows the pipeline, and records it cannot keep up with
//! are dropped and counted against it like against any gRPC subscriber (its
//! peer in the status is `jsonl:<path>`). Filters use the gRPC API's
//! `sockscope.v1.FlowFilter`, given in the configuration as objects with the
//! proto field names and compiled by [`FilterSet::compile`].

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use prost_reflect::{DeserializeOptions, DynamicMessage};
use tokio_stream::{Stream, StreamExt};

use crate::config::JsonlConfig;
use crate::export::ecs::{self, HostInfo};
use crate::export::encoded::Payload;
use crate::export::filter::{FilterError, FilterSet};
use crate::export::hub::{Hub, Subscription};
use crate::export::proto;
use crate::export::sink::{self, SinkFuture, SinkReport, SinkSubscription};

/// Protobuf name of the filter message.
const FLOW_FILTER: &str = "sockscope.v1.FlowFilter";
/// `export.jsonl.path` value that selects standard output.
pub const STDOUT_PATH: &str = "-";
/// Buffer of the output writer.
const WRITE_BUFFER: usize = 64 * 1024;

/// Errors of the JSON lines output.
#[derive(Debug, thiserror::Error)]
pub enum JsonlError {
    /// A configured filter is not a valid `FlowFilter` object.
    #[error("{field}: {reason}")]
    FilterSyntax {
        /// `filters[i]` or `deny[i]`.
        field: String,
        /// Why it does not convert.
        reason: String,
    },
    /// A configured filter has an invalid value (CIDR, port, ...).
    #[error("{0}")]
    Filter(#[from] FilterError),
    /// Opening, writing or rotating the output failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// The failed step.
        what: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// I/O error.
        source: io::Error,
    },
    /// The fan-out refused the subscription.
    #[error("subscribing to flows: {0}")]
    Subscribe(String),
}

/// Converts one configured filter object into a `FlowFilter`. Field names
/// are the proto names (`destination_port`) or their JSON names
/// (`destinationPort`); enums are their value names (`TRANSPORT_TCP`);
/// unknown fields are errors.
pub fn filter_from_value(
    field: &str,
    value: &serde_json::Value,
) -> Result<proto::FlowFilter, JsonlError> {
    let syntax = |reason: String| JsonlError::FilterSyntax {
        field: field.to_string(),
        reason,
    };
    let desc = crate::export::proto::descriptor_pool()
        .get_message_by_name(FLOW_FILTER)
        .ok_or_else(|| syntax(format!("{FLOW_FILTER} missing from the descriptor set")))?;
    let msg = DynamicMessage::deserialize_with_options(
        desc,
        value.clone(),
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| syntax(e.to_string()))?;
    msg.transcode_to::<proto::FlowFilter>()
        .map_err(|e| syntax(e.to_string()))
}

/// Compiles the configured allow and deny filter objects.
pub fn compile_filters(
    allow: &[serde_json::Value],
    deny: &[serde_json::Value],
) -> Result<FilterSet, JsonlError> {
    let convert = |name: &str, list: &[serde_json::Value]| {
        list.iter()
            .enumerate()
            .map(|(i, v)| filter_from_value(&format!("{name}[{i}]"), v))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(FilterSet::compile(
        &convert("filters", allow)?,
        &convert("deny", deny)?,
    )?)
}

/// An append-only file that rotates by size: when a write would take it
/// beyond `max_size` bytes, `path.{n-1}` becomes `path.{n}` (the oldest
/// beyond `max_files - 1` is removed), `path` becomes `path.1`, and a new
/// `path` is started. A single line longer than `max_size` still goes into
/// a file of its own.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    max_size: u64,
    max_files: usize,
    out: io::BufWriter<File>,
    size: u64,
}

impl RotatingFile {
    /// Opens (appending to) `path`. `max_size` 0 never rotates;
    /// `max_files` counts the active file (1: truncate on rotation).
    pub fn open(path: &Path, max_size: u64, max_files: usize) -> Result<Self, JsonlError> {
        let (out, size) = Self::open_file(path)?;
        Ok(RotatingFile {
            path: path.to_path_buf(),
            max_size,
            max_files: max_files.max(1),
            out,
            size,
        })
    }

    fn open_file(path: &Path) -> Result<(io::BufWriter<File>, u64), JsonlError> {
        let io_err = |what, source| JsonlError::Io {
            what,
            path: path.to_path_buf(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| io_err("creating directory of", e))?;
        }
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| io_err("opening", e))?;
        let size = f.metadata().map_err(|e| io_err("inspecting", e))?.len();
        Ok((io::BufWriter::with_capacity(WRITE_BUFFER, f), size))
    }

    /// Path of the `n`th rotated file.
    pub fn rotated_path(path: &Path, n: usize) -> PathBuf {
        let mut s = path.as_os_str().to_os_string();
        s.push(format!(".{n}"));
        PathBuf::from(s)
    }

    fn rotate(&mut self) -> Result<(), JsonlError> {
        let io_err = |what, path: &Path, source| JsonlError::Io {
            what,
            path: path.to_path_buf(),
            source,
        };
        self.out
            .flush()
            .map_err(|e| io_err("flushing", &self.path, e))?;
        let keep = self.max_files - 1;
        if keep == 0 {
            std::fs::remove_file(&self.path).map_err(|e| io_err("removing", &self.path, e))?;
        } else {
            let oldest = Self::rotated_path(&self.path, keep);
            match std::fs::remove_file(&oldest) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("removing", &oldest, e)),
            }
            for n in (1..keep).rev() {
                let from = Self::rotated_path(&self.path, n);
                let to = Self::rotated_path(&self.path, n + 1);
                match std::fs::rename(&from, &to) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("rotating", &from, e)),
                }
            }
            let first = Self::rotated_path(&self.path, 1);
            std::fs::rename(&self.path, &first).map_err(|e| io_err("rotating", &self.path, e))?;
        }
        let (out, size) = Self::open_file(&self.path)?;
        self.out = out;
        self.size = size;
        Ok(())
    }

    /// Writes one line (a newline is appended), rotating first if needed.
    pub fn write_line(&mut self, line: &[u8]) -> Result<(), JsonlError> {
        let len = line.len() as u64 + 1;
        if self.max_size > 0 && self.size > 0 && self.size.saturating_add(len) > self.max_size {
            self.rotate()?;
        }
        let path = &self.path;
        let io_err = |source| JsonlError::Io {
            what: "writing",
            path: path.clone(),
            source,
        };
        self.out.write_all(line).map_err(io_err)?;
        self.out.write_all(b"\n").map_err(io_err)?;
        self.size = self.size.saturating_add(len);
        Ok(())
    }

    /// Flushes buffered lines to the file.
    pub fn flush(&mut self) -> Result<(), JsonlError> {
        self.out.flush().map_err(|source| JsonlError::Io {
            what: "flushing",
            path: self.path.clone(),
            source,
        })
    }
}

/// Where lines go.
#[derive(Debug)]
pub enum Sink {
    /// Standard output.
    Stdout(io::BufWriter<io::Stdout>),
    /// A rotating file.
    File(RotatingFile),
}

impl Sink {
    /// The sink for `export.jsonl`: `-` is standard output.
    pub fn open(cfg: &JsonlConfig) -> Result<Sink, JsonlError> {
        if cfg.path.trim() == STDOUT_PATH {
            return Ok(Sink::Stdout(io::BufWriter::with_capacity(
                WRITE_BUFFER,
                io::stdout(),
            )));
        }
        Ok(Sink::File(RotatingFile::open(
            Path::new(cfg.path.trim()),
            cfg.max_size,
            cfg.max_files,
        )?))
    }

    fn stdout_err(source: io::Error) -> JsonlError {
        JsonlError::Io {
            what: "writing",
            path: PathBuf::from("<stdout>"),
            source,
        }
    }

    /// Writes one line.
    pub fn write_line(&mut self, line: &[u8]) -> Result<(), JsonlError> {
        match self {
            Sink::Stdout(w) => w
                .write_all(line)
                .and_then(|()| w.write_all(b"\n"))
                .map_err(Self::stdout_err),
            Sink::File(f) => f.write_line(line),
        }
    }

    /// Flushes buffered lines.
    pub fn flush(&mut self) -> Result<(), JsonlError> {
        match self {
            Sink::Stdout(w) => w.flush().map_err(Self::stdout_err),
            Sink::File(f) => f.flush(),
        }
    }
}

/// Counters of one JSON lines writer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JsonlStats {
    /// Documents written.
    pub written: u64,
    /// Loss notices received (their counts are in the hub's status).
    pub loss_notices: u64,
    /// Records those notices count.
    pub lost: u64,
}

/// Writes every flow item of `stream` to `sink` until the stream ends,
/// flushing whenever no further item is immediately ready. Runs on a
/// blocking thread: `handle` drives the stream.
pub fn write_stream<S>(
    handle: &tokio::runtime::Handle,
    mut stream: S,
    sink: &mut Sink,
    host: &HostInfo,
) -> Result<JsonlStats, JsonlError>
where
    S: Stream<Item = Result<crate::export::encoded::WireResponse, tonic::Status>> + Unpin,
{
    let mut stats = JsonlStats::default();
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        // Take what is ready without waiting; flush before blocking.
        let item = match Pin::new(&mut stream).poll_next(&mut cx) {
            Poll::Ready(item) => item,
            Poll::Pending => {
                sink.flush()?;
                handle.block_on(stream.next())
            }
        };
        let Some(item) = item else { break };
        let resp = match item {
            Ok(r) => r,
            Err(status) => {
                tracing::warn!("JSON lines output stopped by the fan-out: {status}");
                break;
            }
        };
        match resp.payload {
            Some(Payload::Flow(f)) => {
                let doc = ecs::flow_document(&f.record, host);
                let line = serde_json::to_vec(&doc).map_err(|e| JsonlError::Io {
                    what: "encoding",
                    path: PathBuf::from("<document>"),
                    source: e.into(),
                })?;
                sink.write_line(&line)?;
                stats.written += 1;
            }
            Some(Payload::Loss(l)) => {
                stats.loss_notices += 1;
                stats.lost += l.count;
            }
            None => {}
        }
    }
    sink.flush()?;
    Ok(stats)
}

/// The JSON lines output as a [`sink::Sink`]: writes on a blocking thread
/// of the runtime, driving its stream from there.
#[derive(Debug)]
pub struct JsonlSink {
    out: Sink,
    path: String,
    host: HostInfo,
}

impl JsonlSink {
    /// Opens the output of `cfg`; fails before anything runs.
    pub fn open(cfg: &JsonlConfig, host: HostInfo) -> Result<JsonlSink, JsonlError> {
        Ok(JsonlSink {
            out: Sink::open(cfg)?,
            path: cfg.path.trim().to_string(),
            host,
        })
    }
}

impl sink::Sink for JsonlSink {
    fn kind(&self) -> &'static str {
        "jsonl"
    }

    fn peer(&self) -> String {
        format!("jsonl:{}", self.path)
    }

    fn run(self: Box<Self>, flows: Subscription) -> SinkFuture {
        let JsonlSink { mut out, host, .. } = *self;
        let handle = tokio::runtime::Handle::current();
        let writer = tokio::task::spawn_blocking(move || {
            match write_stream(&handle, flows, &mut out, &host) {
                Ok(stats) => {
                    tracing::info!(written = stats.written, "JSON lines output finished");
                    SinkReport {
                        delivered: stats.written,
                        loss_notices: stats.loss_notices,
                        lost: stats.lost,
                        error: None,
                    }
                }
                Err(e) => {
                    tracing::error!("JSON lines output stopped: {e}");
                    SinkReport {
                        error: Some(e.to_string()),
                        ..SinkReport::default()
                    }
                }
            }
        });
        Box::pin(async move {
            writer.await.unwrap_or_else(|e| SinkReport {
                error: Some(format!("JSON lines writer failed: {e}")),
                ..SinkReport::default()
            })
        })
    }
}

/// How `export.jsonl` subscribes: its filters and `include_updates`, the
/// hub's queue size; closed like a gRPC stream when it stays too slow.
pub fn subscription(cfg: &JsonlConfig) -> Result<SinkSubscription, JsonlError> {
    Ok(SinkSubscription {
        include_updates: cfg.include_updates,
        filters: compile_filters(&cfg.filters, &cfg.deny)?,
        queue_size: None,
        keep_when_slow: false,
        stats: None,
    })
}

/// Subscribes the JSON lines output to `hub` and writes on a blocking
/// thread of the current runtime until the hub stops. Opening the output or
/// compiling the filters fails here, before anything runs.
pub async fn spawn(
    hub: &Hub,
    cfg: &JsonlConfig,
    host: HostInfo,
) -> Result<tokio::task::JoinHandle<SinkReport>, JsonlError> {
    let sub = subscription(cfg)?;
    let out = JsonlSink::open(cfg, host)?;
    let running = sink::start(hub, Box::new(out), sub)
        .await
        .map_err(|s| JsonlError::Subscribe(s.message().to_string()))?;
    Ok(running.task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn filter_objects_convert_to_flow_filters() {
        let f = filter_from_value(
            "filters[0]",
            &json!({"destination_port": [80, 443], "transport": ["TRANSPORT_TCP"],
                    "processName": ["wget"]}),
        )
        .expect("valid filter");
        assert_eq!(f.destination_port, vec![80, 443]);
        assert_eq!(f.transport, vec![proto::Transport::Tcp as i32]);
        assert_eq!(f.process_name, vec!["wget".to_string()]);
    }

    #[test]
    fn unknown_filter_fields_and_bad_values_are_rejected() {
        let e = compile_filters(&[json!({"dport": [80]})], &[]).unwrap_err();
        assert!(e.to_string().starts_with("filters[0]:"), "{e}");
        let e = compile_filters(&[], &[json!({"source_ip": ["10.0.0/33"]})]).unwrap_err();
        assert!(e.to_string().contains("10.0.0/33"), "{e}");
        let e = compile_filters(&[json!({"port": [70000]})], &[]).unwrap_err();
        assert!(e.to_string().contains("70000"), "{e}");
    }

    fn read_lines(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn rotates_by_size_and_keeps_max_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("flows.jsonl");
        // Each line is 9 bytes + newline; 25 bytes fit two lines per file.
        let mut f = RotatingFile::open(&path, 25, 3).expect("open");
        for i in 0..7 {
            f.write_line(format!("line-{i:04}").as_bytes())
                .expect("write");
        }
        f.flush().expect("flush");
        assert_eq!(read_lines(&path), vec!["line-0006"]);
        assert_eq!(
            read_lines(&RotatingFile::rotated_path(&path, 1)),
            vec!["line-0004", "line-0005"]
        );
        assert_eq!(
            read_lines(&RotatingFile::rotated_path(&path, 2)),
            vec!["line-0002", "line-0003"]
        );
        assert!(!RotatingFile::rotated_path(&path, 3).exists());
        for p in [
            path.clone(),
            RotatingFile::rotated_path(&path, 1),
            RotatingFile::rotated_path(&path, 2),
        ] {
            let len = std::fs::metadata(&p).expect("stat").len();
            assert!(len <= 25, "{} is {len} bytes", p.display());
        }
    }

    #[test]
    fn reopening_appends_and_counts_existing_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/flows.jsonl");
        let mut f = RotatingFile::open(&path, 0, 2).expect("open");
        f.write_line(b"first").expect("write");
        drop(f);
        let mut f = RotatingFile::open(&path, 12, 2).expect("reopen");
        f.write_line(b"second").expect("write");
        f.flush().expect("flush");
        // "first\n" (6) + "second\n" (7) > 12: rotated before the second line.
        assert_eq!(read_lines(&path), vec!["second"]);
        assert_eq!(
            read_lines(&RotatingFile::rotated_path(&path, 1)),
            vec!["first"]
        );
    }

    #[test]
    fn single_file_rotation_truncates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("flows.jsonl");
        let mut f = RotatingFile::open(&path, 10, 1).expect("open");
        for l in ["aaaa", "bbbb", "cccc"] {
            f.write_line(l.as_bytes()).expect("write");
        }
        f.flush().expect("flush");
        assert_eq!(read_lines(&path), vec!["cccc"]);
        assert!(!RotatingFile::rotated_path(&path, 1).exists());
    }
}
