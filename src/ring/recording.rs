//! Recording of raw samples to a file and replay of such files.
//!
//! A recording keeps what the decoder needs to reproduce a run without the
//! kernel: the name and tracefs `format` text of every event (by index),
//! the perf clock, and the stream of [`RingItem`]s in the order the live
//! reader emitted them. Replay feeds the same callback as
//! [`super::Rings::read`].
//!
//! # Format (version 1, all integers little-endian)
//! ```text
//! magic    8 bytes  "SSCOPREC"
//! version  u32      1
//! clock    u32 len + UTF-8 (PerfClock::as_str)
//! events   u32 count, then per event:
//!          u32 len + UTF-8 name ("group/name"), u32 len + UTF-8 format text
//! frames   until end of file:
//!          u32 len (bytes after this field), u8 kind, payload
//!          kind 1, sample: u32 event, u64 time, u32 cpu, u32 pid, u32 tid,
//!                          data (the rest of the frame)
//!          kind 2, lost:   u32 cpu, u64 count
//! ```
//! A file cut in the middle of a frame replays every whole frame before the
//! cut and then reports [`RecordError::Truncated`].

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use super::RingItem;
use crate::model::RawSample;

/// File magic.
pub const MAGIC: [u8; 8] = *b"SSCOPREC";
/// Format version written and read.
pub const VERSION: u32 = 1;
/// Frame kind of a sample.
const KIND_SAMPLE: u8 = 1;
/// Frame kind of a loss.
const KIND_LOST: u8 = 2;
/// Fixed payload of a sample frame (kind byte included).
const SAMPLE_FRAME_FIXED: usize = 1 + 4 + 8 + 4 + 4 + 4;
/// Payload of a lost frame (kind byte included).
const LOST_FRAME: usize = 1 + 4 + 8;
/// Largest sample data accepted (a perf record's size is a u16).
pub const MAX_SAMPLE_DATA: usize = u16::MAX as usize;
/// Largest number of events in a header.
pub const MAX_EVENTS: usize = 4096;
/// Largest event name.
pub const MAX_NAME_LEN: usize = 1024;
/// Largest format text.
pub const MAX_FORMAT_LEN: usize = 1 << 20;

/// Errors of recording and replay.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Opening or creating the file failed.
    #[error("{path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// Reading or writing failed.
    #[error("recording i/o at byte {offset}: {source}")]
    Io {
        /// Byte offset in the file.
        offset: u64,
        /// The error.
        source: io::Error,
    },
    /// Not a sockscope recording.
    #[error("not a sockscope recording (bad magic)")]
    BadMagic,
    /// A version this build cannot read.
    #[error("recording version {0} is not supported (expected {VERSION})")]
    Version(u32),
    /// The file ends inside the header or a frame.
    #[error("recording truncated at byte {offset} after {items} items")]
    Truncated {
        /// Where the last whole frame ended.
        offset: u64,
        /// Items replayed before the cut.
        items: u64,
    },
    /// A field has an impossible value.
    #[error("corrupt recording at byte {offset}: {what}")]
    Corrupt {
        /// Where the bad frame or field starts.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// A value does not fit the format.
    #[error("cannot record: {0}")]
    TooLarge(String),
}

/// One event of a recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEvent {
    /// `group/name` in tracefs.
    pub name: String,
    /// Text of its tracefs `format` file.
    pub format: String,
}

impl RecordedEvent {
    /// Reads the `format` file of tracefs event `name` (`group/name`)
    /// under the tracefs mount `tracefs`.
    pub fn from_tracefs(tracefs: &Path, name: &str) -> Result<RecordedEvent, RecordError> {
        let path = tracefs.join("events").join(name).join("format");
        let format =
            std::fs::read_to_string(&path).map_err(|source| RecordError::Open { path, source })?;
        Ok(RecordedEvent {
            name: name.to_string(),
            format,
        })
    }
}

/// Header of a recording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHeader {
    /// Name of the perf clock (`PerfClock::as_str`).
    pub clock: String,
    /// Events by index.
    pub events: Vec<RecordedEvent>,
}

fn put_str(out: &mut Vec<u8>, s: &str, max: usize, what: &str) -> Result<(), RecordError> {
    if s.len() > max {
        return Err(RecordError::TooLarge(format!(
            "{what} of {} bytes (max {max})",
            s.len()
        )));
    }
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

/// Writes a recording.
pub struct Recorder<W: Write> {
    out: W,
    buf: Vec<u8>,
    offset: u64,
    items: u64,
}

impl<W: Write> std::fmt::Debug for Recorder<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("offset", &self.offset)
            .field("items", &self.items)
            .finish()
    }
}

impl Recorder<BufWriter<File>> {
    /// Creates (truncates) `path` and writes the header.
    pub fn create(path: &Path, header: &RecordHeader) -> Result<Self, RecordError> {
        let f = File::create(path).map_err(|source| RecordError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Recorder::new(BufWriter::new(f), header)
    }
}

impl<W: Write> Recorder<W> {
    /// Writes the header to `out`.
    pub fn new(out: W, header: &RecordHeader) -> Result<Self, RecordError> {
        if header.events.len() > MAX_EVENTS {
            return Err(RecordError::TooLarge(format!(
                "{} events (max {MAX_EVENTS})",
                header.events.len()
            )));
        }
        let mut rec = Recorder {
            out,
            buf: Vec::new(),
            offset: 0,
            items: 0,
        };
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        put_str(&mut b, &header.clock, MAX_NAME_LEN, "clock name")?;
        b.extend_from_slice(&(header.events.len() as u32).to_le_bytes());
        for e in &header.events {
            put_str(&mut b, &e.name, MAX_NAME_LEN, "event name")?;
            put_str(&mut b, &e.format, MAX_FORMAT_LEN, "format text")?;
        }
        rec.write_bytes(&b)?;
        Ok(rec)
    }

    fn write_bytes(&mut self, b: &[u8]) -> Result<(), RecordError> {
        self.out.write_all(b).map_err(|source| RecordError::Io {
            offset: self.offset,
            source,
        })?;
        self.offset += b.len() as u64;
        Ok(())
    }

    /// Appends one item.
    pub fn write(&mut self, item: &RingItem<'_>) -> Result<(), RecordError> {
        let mut b = std::mem::take(&mut self.buf);
        b.clear();
        match item {
            RingItem::Sample(s) => {
                if s.data.len() > MAX_SAMPLE_DATA {
                    self.buf = b;
                    return Err(RecordError::TooLarge(format!(
                        "sample data of {} bytes",
                        s.data.len()
                    )));
                }
                b.extend_from_slice(&((SAMPLE_FRAME_FIXED + s.data.len()) as u32).to_le_bytes());
                b.push(KIND_SAMPLE);
                b.extend_from_slice(&s.event.to_le_bytes());
                b.extend_from_slice(&s.time.to_le_bytes());
                b.extend_from_slice(&s.cpu.to_le_bytes());
                b.extend_from_slice(&s.pid.to_le_bytes());
                b.extend_from_slice(&s.tid.to_le_bytes());
                b.extend_from_slice(s.data);
            }
            RingItem::Lost { cpu, count } => {
                b.extend_from_slice(&(LOST_FRAME as u32).to_le_bytes());
                b.push(KIND_LOST);
                b.extend_from_slice(&cpu.to_le_bytes());
                b.extend_from_slice(&count.to_le_bytes());
            }
        }
        let r = self.write_bytes(&b);
        self.buf = b;
        if r.is_ok() {
            self.items += 1;
        }
        r
    }

    /// Items written.
    pub fn items(&self) -> u64 {
        self.items
    }

    /// Flushes and returns the writer.
    pub fn finish(mut self) -> Result<W, RecordError> {
        self.out.flush().map_err(|source| RecordError::Io {
            offset: self.offset,
            source,
        })?;
        Ok(self.out)
    }
}

/// Outcome of filling a buffer from the file.
enum Fill {
    Full,
    /// Clean end of file before any byte.
    Eof,
    /// End of file after `n` bytes.
    Short,
}

/// Reads a recording.
pub struct Replay<R: Read> {
    input: R,
    header: RecordHeader,
    offset: u64,
    buf: Vec<u8>,
}

impl<R: Read> std::fmt::Debug for Replay<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay")
            .field("header", &self.header)
            .field("offset", &self.offset)
            .finish()
    }
}

impl Replay<BufReader<File>> {
    /// Opens `path` and reads its header.
    pub fn open(path: &Path) -> Result<Self, RecordError> {
        let f = File::open(path).map_err(|source| RecordError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Replay::new(BufReader::new(f))
    }
}

impl<R: Read> Replay<R> {
    /// Reads the header from `input`.
    pub fn new(input: R) -> Result<Self, RecordError> {
        let mut r = Replay {
            input,
            header: RecordHeader {
                clock: String::new(),
                events: Vec::new(),
            },
            offset: 0,
            buf: Vec::new(),
        };
        let mut magic = [0u8; 8];
        r.header_exact(&mut magic)?;
        if magic != MAGIC {
            return Err(RecordError::BadMagic);
        }
        let version = r.header_u32()?;
        if version != VERSION {
            return Err(RecordError::Version(version));
        }
        r.header.clock = r.header_str(MAX_NAME_LEN, "clock name")?;
        let n = r.header_u32()? as usize;
        if n > MAX_EVENTS {
            return Err(RecordError::Corrupt {
                offset: r.offset - 4,
                what: format!("{n} events (max {MAX_EVENTS})"),
            });
        }
        for _ in 0..n {
            let name = r.header_str(MAX_NAME_LEN, "event name")?;
            let format = r.header_str(MAX_FORMAT_LEN, "format text")?;
            r.header.events.push(RecordedEvent { name, format });
        }
        Ok(r)
    }

    /// The header.
    pub fn header(&self) -> &RecordHeader {
        &self.header
    }

    fn fill(&mut self, dst: &mut [u8]) -> Result<Fill, RecordError> {
        let mut got = 0;
        while got < dst.len() {
            match self.input.read(&mut dst[got..]) {
                Ok(0) => {
                    return Ok(if got == 0 { Fill::Eof } else { Fill::Short });
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(RecordError::Io {
                        offset: self.offset + got as u64,
                        source,
                    })
                }
            }
        }
        Ok(Fill::Full)
    }

    fn header_exact(&mut self, dst: &mut [u8]) -> Result<(), RecordError> {
        match self.fill(dst)? {
            Fill::Full => {
                self.offset += dst.len() as u64;
                Ok(())
            }
            Fill::Eof | Fill::Short => Err(RecordError::Truncated {
                offset: self.offset,
                items: 0,
            }),
        }
    }

    fn header_u32(&mut self) -> Result<u32, RecordError> {
        let mut b = [0u8; 4];
        self.header_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn header_str(&mut self, max: usize, what: &str) -> Result<String, RecordError> {
        let at = self.offset;
        let len = self.header_u32()? as usize;
        if len > max {
            return Err(RecordError::Corrupt {
                offset: at,
                what: format!("{what} of {len} bytes (max {max})"),
            });
        }
        let mut b = vec![0u8; len];
        self.header_exact(&mut b)?;
        String::from_utf8(b).map_err(|_| RecordError::Corrupt {
            offset: at,
            what: format!("{what} is not UTF-8"),
        })
    }

    /// Feeds every item to `emit` until the end of the file. Returns the
    /// number of items; on a truncated or corrupt frame, the items before it
    /// have been emitted and the error says where it stopped.
    pub fn for_each(&mut self, mut emit: impl FnMut(RingItem<'_>)) -> Result<u64, RecordError> {
        let mut items = 0u64;
        let n_events = self.header.events.len();
        loop {
            let frame_at = self.offset;
            let mut lb = [0u8; 4];
            match self.fill(&mut lb)? {
                Fill::Eof => return Ok(items),
                Fill::Short => {
                    return Err(RecordError::Truncated {
                        offset: frame_at,
                        items,
                    })
                }
                Fill::Full => {}
            }
            let len = u32::from_le_bytes(lb) as usize;
            if len == 0 || len > SAMPLE_FRAME_FIXED + MAX_SAMPLE_DATA {
                return Err(RecordError::Corrupt {
                    offset: frame_at,
                    what: format!("frame length {len}"),
                });
            }
            let mut buf = std::mem::take(&mut self.buf);
            buf.resize(len, 0);
            let filled = self.fill(&mut buf);
            let result = match filled {
                Err(e) => Err(e),
                Ok(Fill::Eof | Fill::Short) => Err(RecordError::Truncated {
                    offset: frame_at,
                    items,
                }),
                Ok(Fill::Full) => {
                    self.offset += 4 + len as u64;
                    decode_frame(&buf, n_events, frame_at).map(|item| {
                        if let Some(item) = item {
                            emit(item);
                        }
                    })
                }
            };
            self.buf = buf;
            result?;
            items += 1;
        }
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn decode_frame(
    b: &[u8],
    n_events: usize,
    offset: u64,
) -> Result<Option<RingItem<'_>>, RecordError> {
    let corrupt = |what: String| RecordError::Corrupt { offset, what };
    match b[0] {
        KIND_SAMPLE if b.len() >= SAMPLE_FRAME_FIXED => {
            let event = le_u32(b, 1);
            if event as usize >= n_events {
                return Err(corrupt(format!(
                    "event index {event} with {n_events} events"
                )));
            }
            Ok(Some(RingItem::Sample(RawSample {
                event,
                time: le_u64(b, 5),
                cpu: le_u32(b, 13),
                pid: le_u32(b, 17),
                tid: le_u32(b, 21),
                data: &b[SAMPLE_FRAME_FIXED..],
            })))
        }
        KIND_LOST if b.len() == LOST_FRAME => Ok(Some(RingItem::Lost {
            cpu: le_u32(b, 1),
            count: le_u64(b, 5),
        })),
        kind => Err(corrupt(format!(
            "frame kind {kind} with length {}",
            b.len()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> RecordHeader {
        RecordHeader {
            clock: "boottime".to_string(),
            events: vec![
                RecordedEvent {
                    name: "sockscope/tcp_connect".to_string(),
                    format: "name: tcp_connect\nID: 1234\nformat:\n\tfield:int a;\toffset:8;\tsize:4;\tsigned:1;\n".to_string(),
                },
                RecordedEvent {
                    name: "syscalls/sys_enter_getppid".to_string(),
                    format: "name: sys_enter_getppid\n".to_string(),
                },
            ],
        }
    }

    #[derive(Debug, PartialEq)]
    enum Owned {
        Sample(u32, u64, u32, u32, u32, Vec<u8>),
        Lost(u32, u64),
    }

    fn own(i: RingItem<'_>) -> Owned {
        match i {
            RingItem::Sample(s) => {
                Owned::Sample(s.event, s.time, s.cpu, s.pid, s.tid, s.data.to_vec())
            }
            RingItem::Lost { cpu, count } => Owned::Lost(cpu, count),
        }
    }

    fn items() -> Vec<Owned> {
        (0..20u32)
            .map(|i| {
                if i % 7 == 3 {
                    Owned::Lost(i % 2, u64::from(i) * 1000)
                } else {
                    Owned::Sample(
                        i % 2,
                        1_000 + u64::from(i),
                        i % 4,
                        100 + i,
                        200 + i,
                        vec![i as u8; i as usize],
                    )
                }
            })
            .collect()
    }

    fn write_all(items: &[Owned]) -> Vec<u8> {
        let mut rec = Recorder::new(Vec::new(), &header()).expect("header");
        for it in items {
            let item = match it {
                Owned::Sample(event, time, cpu, pid, tid, data) => RingItem::Sample(RawSample {
                    event: *event,
                    time: *time,
                    cpu: *cpu,
                    pid: *pid,
                    tid: *tid,
                    data,
                }),
                Owned::Lost(cpu, count) => RingItem::Lost {
                    cpu: *cpu,
                    count: *count,
                },
            };
            rec.write(&item).expect("write");
        }
        assert_eq!(rec.items(), items.len() as u64);
        rec.finish().expect("flush")
    }

    #[test]
    fn event_formats_come_from_tracefs_layout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ev = dir.path().join("events/sockscope/x");
        std::fs::create_dir_all(&ev).expect("mkdir");
        std::fs::write(ev.join("format"), "name: x\nID: 9\n").expect("write");
        let e = RecordedEvent::from_tracefs(dir.path(), "sockscope/x").expect("read");
        assert_eq!(e.name, "sockscope/x");
        assert_eq!(e.format, "name: x\nID: 9\n");
        assert!(matches!(
            RecordedEvent::from_tracefs(dir.path(), "sockscope/missing"),
            Err(RecordError::Open { .. })
        ));
    }

    #[test]
    fn roundtrip_through_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rec.bin");
        let want = items();
        std::fs::write(&path, write_all(&want)).expect("write file");
        let mut r = Replay::open(&path).expect("open");
        assert_eq!(r.header(), &header());
        let mut got = Vec::new();
        let n = r.for_each(|i| got.push(own(i))).expect("replay");
        assert_eq!(n, want.len() as u64);
        assert_eq!(got, want);
    }

    #[test]
    fn truncation_yields_the_intact_prefix() {
        let want = items();
        let bytes = write_all(&want);
        let header_len = write_all(&[]).len();
        // Cut at every byte inside the frames: whatever was whole is
        // replayed, then Truncated.
        for cut in header_len + 1..bytes.len() {
            let mut r = Replay::new(&bytes[..cut]).expect("header intact");
            let mut got = Vec::new();
            match r.for_each(|i| got.push(own(i))) {
                Err(RecordError::Truncated { items, offset }) => {
                    assert_eq!(items as usize, got.len());
                    assert!(offset as usize <= cut);
                }
                Ok(n) => {
                    // Cut fell exactly on a frame boundary.
                    assert_eq!(n as usize, got.len());
                }
                Err(e) => panic!("cut {cut}: unexpected {e}"),
            }
            assert_eq!(&want[..got.len()], &got[..], "cut {cut}");
        }
        // Cuts inside the header are errors too.
        for cut in 0..header_len {
            assert!(Replay::new(&bytes[..cut]).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn corrupt_frames_and_headers_are_reported() {
        let bytes = write_all(&items());
        let header_len = write_all(&[]).len();
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(matches!(Replay::new(&bad[..]), Err(RecordError::BadMagic)));
        let mut bad = bytes.clone();
        bad[8] = 9;
        assert!(matches!(
            Replay::new(&bad[..]),
            Err(RecordError::Version(9))
        ));
        // Huge frame length in the first frame.
        let mut bad = bytes.clone();
        bad[header_len..header_len + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut r = Replay::new(&bad[..]).expect("header");
        assert!(matches!(
            r.for_each(|_| {}),
            Err(RecordError::Corrupt { .. })
        ));
        // Unknown kind in the first frame.
        let mut bad = bytes.clone();
        bad[header_len + 4] = 77;
        let mut r = Replay::new(&bad[..]).expect("header");
        let mut n = 0;
        assert!(matches!(
            r.for_each(|_| n += 1),
            Err(RecordError::Corrupt { .. })
        ));
        assert_eq!(n, 0);
        // Event index out of range.
        let mut bad = bytes;
        bad[header_len + 5..header_len + 9].copy_from_slice(&5u32.to_le_bytes());
        let mut r = Replay::new(&bad[..]).expect("header");
        assert!(matches!(
            r.for_each(|_| {}),
            Err(RecordError::Corrupt { .. })
        ));
    }
}
