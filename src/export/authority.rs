//! Rewrites the `:authority` of requests arriving on the Unix socket.
//!
//! Some clients (grpcurl 1.8.x with `-unix`, older gRPC cores) send the
//! socket path as `:authority`. hyper's HTTP/2 layer rejects such a value
//! (a `/` is not allowed in an authority) with a stream reset before any
//! service or tower layer sees the request, so the fix has to happen on the
//! byte stream: this reader passes HTTP/2 frames through unchanged except
//! HEADERS (+ CONTINUATION) blocks, in which a literal `:authority` value is
//! replaced by a valid one (a prefix of `localhost`).
//!
//! HPACK consistency: the representation kind is kept, so a value the
//! client inserts into its dynamic table is inserted at the same position on
//! the server side; the replacement is never longer than the original
//! (bounded from below for Huffman-coded values), so the server's table
//! never evicts earlier than the client's and indices stay in agreement.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of an HTTP/2 frame header.
const FRAME_HEADER_LEN: usize = 9;
/// Frame type HEADERS.
const TYPE_HEADERS: u8 = 0x1;
/// Frame type CONTINUATION.
const TYPE_CONTINUATION: u8 = 0x9;
/// Flag END_HEADERS.
const FLAG_END_HEADERS: u8 = 0x4;
/// Flag PADDED.
const FLAG_PADDED: u8 = 0x8;
/// Flag PRIORITY.
const FLAG_PRIORITY: u8 = 0x20;
/// Length of the PRIORITY fields in a HEADERS frame.
const PRIORITY_LEN: usize = 5;
/// Largest frame payload emitted (the protocol minimum of
/// SETTINGS_MAX_FRAME_SIZE, accepted by every peer).
const MAX_EMIT_FRAME: usize = 16_384;
/// Largest header block accumulated across CONTINUATION frames; beyond it
/// the frames pass through unchanged.
const MAX_HEADER_BLOCK: usize = 1 << 20;
/// Read chunk size.
const READ_CHUNK: usize = 16_384;
/// The replacement authority (or a prefix of it).
const REPLACEMENT: &[u8] = b"localhost";
/// Longest Huffman code in bits (RFC 7541 Appendix B).
const MAX_HUFFMAN_CODE_BITS: usize = 30;

/// Decodes an HPACK integer with an N-bit prefix at `pos`.
fn read_int(b: &[u8], pos: usize, prefix_bits: u32) -> Option<(u64, usize)> {
    let mask = (1u16 << prefix_bits) as u8 - 1;
    let first = *b.get(pos)? & mask;
    if first < mask {
        return Some((u64::from(first), pos + 1));
    }
    let mut value = u64::from(mask);
    let mut shift = 0u32;
    let mut i = pos + 1;
    loop {
        let byte = *b.get(i)?;
        i += 1;
        value = value.checked_add(u64::from(byte & 0x7f).checked_shl(shift)?)?;
        if byte & 0x80 == 0 {
            return Some((value, i));
        }
        shift += 7;
        if shift > 56 {
            return None;
        }
    }
}

/// A string literal at `pos`: (huffman, data start, data end).
fn read_str(b: &[u8], pos: usize) -> Option<(bool, usize, usize)> {
    let huffman = *b.get(pos)? & 0x80 != 0;
    let (len, start) = read_int(b, pos, 7)?;
    let end = start.checked_add(usize::try_from(len).ok()?)?;
    (end <= b.len()).then_some((huffman, start, end))
}

/// Rewrites literal `:authority` values in one header block; `None` when
/// the block cannot be parsed (it is then passed through unchanged).
pub fn rewrite_header_block(b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let first = b[i];
        if first & 0x80 != 0 {
            let (_, j) = read_int(b, i, 7)?;
            out.extend_from_slice(&b[i..j]);
            i = j;
        } else if first & 0xe0 == 0x20 {
            let (_, j) = read_int(b, i, 5)?;
            out.extend_from_slice(&b[i..j]);
            i = j;
        } else {
            let prefix = if first & 0xc0 == 0x40 { 6 } else { 4 };
            let (index, j) = read_int(b, i, prefix)?;
            let (is_authority, value_pos) = if index == 0 {
                let (huff, s, e) = read_str(b, j)?;
                (!huff && &b[s..e] == b":authority", e)
            } else {
                (index == 1, j)
            };
            let (huff, vs, ve) = read_str(b, value_pos)?;
            let encoded_len = ve - vs;
            if is_authority && encoded_len > 0 {
                // Lower bound of the decoded length.
                let decoded_min = if huff {
                    (encoded_len * 8).div_ceil(MAX_HUFFMAN_CODE_BITS)
                } else {
                    encoded_len
                };
                let n = decoded_min.clamp(1, REPLACEMENT.len());
                out.extend_from_slice(&b[i..value_pos]);
                out.push(n as u8);
                out.extend_from_slice(&REPLACEMENT[..n]);
            } else {
                out.extend_from_slice(&b[i..ve]);
            }
            i = ve;
        }
    }
    Some(out)
}

struct PendingHeaders {
    stream: u32,
    flags: u8,
    priority: Option<[u8; PRIORITY_LEN]>,
    block: Vec<u8>,
}

/// An I/O wrapper rewriting `:authority` in the client→server direction.
#[derive(Debug)]
pub struct AuthorityRewrite<T> {
    inner: T,
    preface_left: usize,
    inbuf: BytesMut,
    outbuf: BytesMut,
    pending: Option<PendingHeadersBox>,
    eof: bool,
}

/// Boxed pending header block (keeps the wrapper small).
struct PendingHeadersBox(Box<PendingHeaders>);

impl std::fmt::Debug for PendingHeadersBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PendingHeaders(stream {})", self.0.stream)
    }
}

fn put_frame_header(out: &mut BytesMut, len: usize, ty: u8, flags: u8, stream: u32) {
    out.put_uint(len as u64, 3);
    out.put_u8(ty);
    out.put_u8(flags);
    out.put_u32(stream);
}

impl<T> AuthorityRewrite<T> {
    /// Wraps a server-side connection.
    pub fn new(inner: T) -> Self {
        AuthorityRewrite {
            inner,
            preface_left: PREFACE.len(),
            inbuf: BytesMut::new(),
            outbuf: BytesMut::new(),
            pending: None,
            eof: false,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    fn emit_headers(&mut self, h: PendingHeaders) {
        let block = rewrite_header_block(&h.block).unwrap_or(h.block);
        let mut first = true;
        let mut rest: &[u8] = &block;
        loop {
            let room = if first && h.priority.is_some() {
                MAX_EMIT_FRAME - PRIORITY_LEN
            } else {
                MAX_EMIT_FRAME
            };
            let take = rest.len().min(room);
            let last = take == rest.len();
            let (ty, mut flags) = if first {
                (TYPE_HEADERS, h.flags & !(FLAG_PADDED | FLAG_END_HEADERS))
            } else {
                (TYPE_CONTINUATION, 0)
            };
            if last {
                flags |= FLAG_END_HEADERS;
            }
            let prio = if first { h.priority } else { None };
            let len = take + prio.map_or(0, |_| PRIORITY_LEN);
            put_frame_header(&mut self.outbuf, len, ty, flags, h.stream);
            if let Some(p) = prio {
                self.outbuf.put_slice(&p);
            }
            self.outbuf.put_slice(&rest[..take]);
            rest = &rest[take..];
            first = false;
            if last {
                return;
            }
        }
    }

    /// Moves complete frames from `inbuf` to `outbuf`, rewriting headers.
    fn process(&mut self) {
        if self.preface_left > 0 {
            let n = self.preface_left.min(self.inbuf.len());
            let chunk = self.inbuf.split_to(n);
            self.outbuf.put_slice(&chunk);
            self.preface_left -= n;
            if self.preface_left > 0 {
                return;
            }
        }
        while self.inbuf.len() >= FRAME_HEADER_LEN {
            let len = (usize::from(self.inbuf[0]) << 16)
                | (usize::from(self.inbuf[1]) << 8)
                | usize::from(self.inbuf[2]);
            if self.inbuf.len() < FRAME_HEADER_LEN + len {
                return;
            }
            let ty = self.inbuf[3];
            let flags = self.inbuf[4];
            let stream =
                u32::from_be_bytes([self.inbuf[5], self.inbuf[6], self.inbuf[7], self.inbuf[8]])
                    & 0x7fff_ffff;
            let frame = self.inbuf.split_to(FRAME_HEADER_LEN + len);
            let payload = &frame[FRAME_HEADER_LEN..];
            match (ty, self.pending.take()) {
                (TYPE_HEADERS, None) => match Self::headers_fragment(flags, payload) {
                    Some((priority, fragment)) => {
                        let h = PendingHeaders {
                            stream,
                            flags,
                            priority,
                            block: fragment.to_vec(),
                        };
                        if flags & FLAG_END_HEADERS != 0 {
                            self.emit_headers(h);
                        } else {
                            self.pending = Some(PendingHeadersBox(Box::new(h)));
                        }
                    }
                    None => self.outbuf.put_slice(&frame),
                },
                (TYPE_CONTINUATION, Some(PendingHeadersBox(mut h)))
                    if h.stream == stream && h.block.len() + payload.len() <= MAX_HEADER_BLOCK =>
                {
                    h.block.extend_from_slice(payload);
                    if flags & FLAG_END_HEADERS != 0 {
                        self.emit_headers(*h);
                    } else {
                        self.pending = Some(PendingHeadersBox(h));
                    }
                }
                (_, Some(PendingHeadersBox(h))) => {
                    // Protocol violation or oversized block: hand the peer's
                    // bytes to h2 as they are (re-framed) and let it decide.
                    self.flush_pending_raw(*h);
                    self.outbuf.put_slice(&frame);
                }
                (_, None) => self.outbuf.put_slice(&frame),
            }
        }
    }

    fn flush_pending_raw(&mut self, h: PendingHeaders) {
        let prio = h.priority.map_or(0, |_| PRIORITY_LEN);
        let flags = h.flags & !(FLAG_PADDED | FLAG_END_HEADERS);
        put_frame_header(
            &mut self.outbuf,
            h.block.len() + prio,
            TYPE_HEADERS,
            flags,
            h.stream,
        );
        if let Some(p) = h.priority {
            self.outbuf.put_slice(&p);
        }
        self.outbuf.put_slice(&h.block);
    }

    /// Splits a HEADERS payload into priority fields and block fragment.
    fn headers_fragment(flags: u8, payload: &[u8]) -> Option<(Option<[u8; PRIORITY_LEN]>, &[u8])> {
        let mut p = payload;
        let mut pad = 0usize;
        if flags & FLAG_PADDED != 0 {
            pad = usize::from(*p.first()?);
            p = &p[1..];
        }
        let priority = if flags & FLAG_PRIORITY != 0 {
            let fields: [u8; PRIORITY_LEN] = p.get(..PRIORITY_LEN)?.try_into().ok()?;
            p = &p[PRIORITY_LEN..];
            Some(fields)
        } else {
            None
        };
        let end = p.len().checked_sub(pad)?;
        Some((priority, &p[..end]))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AuthorityRewrite<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.outbuf.is_empty() {
                let n = this.outbuf.len().min(buf.remaining());
                buf.put_slice(&this.outbuf[..n]);
                this.outbuf.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let filled = rb.filled();
                    if filled.is_empty() {
                        this.eof = true;
                        if let Some(PendingHeadersBox(h)) = this.pending.take() {
                            this.flush_pending_raw(*h);
                        }
                        let rest = this.inbuf.split();
                        this.outbuf.put_slice(&rest);
                    } else {
                        this.inbuf.put_slice(filled);
                        this.process();
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AuthorityRewrite<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityRewrite<T>
{
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_authority_is_replaced_and_others_kept() {
        // :method GET (indexed 2), :authority literal-with-indexing name idx 1
        // value "/run/x.sock" (raw), custom literal header "a: b".
        let mut b = vec![0x82, 0x41, 11];
        b.extend_from_slice(b"/run/x.sock");
        b.extend_from_slice(&[0x00, 1, b'a', 1, b'b']);
        let out = rewrite_header_block(&b).expect("parses");
        let mut want = vec![0x82, 0x41, 9];
        want.extend_from_slice(b"localhost");
        want.extend_from_slice(&[0x00, 1, b'a', 1, b'b']);
        assert_eq!(out, want);
        // Literal name ":authority", short value: replaced by a shorter prefix.
        let mut b = vec![0x10, 10];
        b.extend_from_slice(b":authority");
        b.extend_from_slice(&[3, b'/', b'a', b'b']);
        let out = rewrite_header_block(&b).expect("parses");
        assert_eq!(&out[12..], &[3, b'l', b'o', b'c']);
        // Truncated input is refused rather than guessed.
        assert_eq!(rewrite_header_block(&[0x41, 20, b'x']), None);
    }
}
