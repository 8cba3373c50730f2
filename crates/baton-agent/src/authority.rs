//! Accepts the `:authority` that standard gRPC clients send over a Unix
//! socket.
//!
//! gRPC-core clients (Python `grpcio` and so py-spiffe, C++, Ruby, PHP)
//! send the socket path, percent-encoded, as the HTTP/2 `:authority` of a
//! call on a `unix:/abs/path` channel (`run%2Fbaton%2Fagent.sock`), and
//! grpc-java sends the raw path. Neither is a valid URI authority, and the
//! server's HTTP/2 stack (`h2`) parses `:authority` into an
//! `http::uri::Authority` while decoding the request head, before any
//! service, router or tower layer sees the request: a value it cannot parse
//! makes it reset the stream with `PROTOCOL_ERROR`, which the client
//! reports as an internal error. `h2` has no setting to relax this.
//!
//! Over a Unix socket the authority carries no meaning (the peer is the
//! node itself), so [`AuthorityNormalizing`] sits between the socket and
//! the HTTP/2 server and rewrites, in the client-to-server byte stream, any
//! `:authority` that `http` would refuse into `localhost` (what grpc-go
//! sends over a Unix socket). Doing so means decoding every header block
//! the client sends (HPACK, RFC 7541, with its dynamic table) and encoding
//! it again with literal fields only, so the server's decoder never needs
//! the client's dynamic table. Every other frame passes through untouched,
//! and the server-to-client direction is not touched at all.
//!
//! A client that breaks the framing or the compression rules (which the
//! HTTP/2 server would treat as a connection error too) gets its
//! connection closed.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// What replaces an `:authority` the HTTP/2 server would refuse.
pub const UDS_AUTHORITY: &[u8] = b"localhost";

/// The client connection preface (RFC 9113 §3.4).
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// The smallest SETTINGS_MAX_FRAME_SIZE a peer may have; re-encoded header
/// blocks are split into frames no larger, so any server accepts them.
const OUT_FRAME_MAX: usize = 16_384;
/// Largest compressed header block (all its frames) accepted: the largest
/// decoded list ([`MAX_HEADER_LIST`]), which a block of literals cannot
/// undercut by much, so nothing the server would take is refused while a
/// connection holds at most this of a block being gathered.
const MAX_BLOCK: usize = MAX_HEADER_LIST;
/// Largest HEADERS or CONTINUATION frame: the server never raises
/// SETTINGS_MAX_FRAME_SIZE above the protocol's 16 KiB, so a client may not
/// send a larger one; refused from its length, before its payload is
/// gathered.
const IN_FRAME_MAX: usize = 16_384;
/// Largest decoded header list (RFC 7541 sizes: name + value + 32 each):
/// 4 times what the server's HTTP/2 layer accepts (16 KiB), so nothing it
/// would take is refused here, while a block of indexed references (one
/// byte each, 4 KiB of dynamic table behind each) decodes to at most this.
const MAX_HEADER_LIST: usize = 64 << 10;
/// Rewritten bytes made from one read before they are handed to the
/// server: the rest of the input waits, so a client's small frames of
/// references cannot be expanded into more than this at once.
const OUT_PENDING_MAX: usize = 256 << 10;
/// The HPACK dynamic table size the server's decoder allows: the protocol
/// default, which the agent's server does not change.
const HPACK_TABLE_LIMIT: usize = 4_096;
/// How much is read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Why a client's byte stream could not be rewritten. The connection is
/// closed with this as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    #[error("HTTP/2 framing error from the client: {0}")]
    Framing(&'static str),
    #[error("HPACK decoding error from the client: {0}")]
    Hpack(&'static str),
}

/// A server-side connection whose `:authority` values are normalised; see
/// the module documentation. Writes pass straight through.
#[derive(Debug)]
pub struct AuthorityNormalizing<S> {
    inner: S,
    rewriter: Rewriter,
    /// Bytes read from `inner` not yet consumed by the rewriter.
    input: Vec<u8>,
    /// Rewritten bytes not yet handed to the reader; `out_pos` are gone.
    output: Vec<u8>,
    out_pos: usize,
    eof: bool,
    /// The connection's place under its user's connection cap, given back
    /// when the connection is dropped.
    _slot: Option<crate::conn_limit::ConnectionSlot>,
}

impl<S> AuthorityNormalizing<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            rewriter: Rewriter::new(),
            input: Vec::new(),
            output: Vec::new(),
            out_pos: 0,
            eof: false,
            _slot: None,
        }
    }

    /// The connection, holding `slot` for as long as it is open.
    pub fn holding(mut self, slot: crate::conn_limit::ConnectionSlot) -> Self {
        self._slot = Some(slot);
        self
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityNormalizing<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.out_pos < this.output.len() {
                let pending = this.output.get(this.out_pos..).unwrap_or_default();
                let n = pending.len().min(buf.remaining());
                buf.put_slice(pending.get(..n).unwrap_or_default());
                this.out_pos += n;
                if this.out_pos == this.output.len() {
                    this.output.clear();
                    this.out_pos = 0;
                    // An expanded burst does not keep its memory for the
                    // life of the connection.
                    this.output.shrink_to(OUT_PENDING_MAX);
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // A frame cut short by the end of the stream is dropped; the
                // server sees the end of the stream either way.
                return Poll::Ready(Ok(()));
            }
            let consumed = this
                .rewriter
                .process(&this.input, &mut this.output)
                .map_err(|e| {
                    tracing::debug!(error = %e, "closing a Workload API connection");
                    io::Error::new(io::ErrorKind::InvalidData, e)
                })?;
            this.input.drain(..consumed);
            if !this.output.is_empty() {
                continue;
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
            } else {
                this.input.extend_from_slice(read.filled());
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityNormalizing<S> {
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

/// The peer credential and address stay those of the socket, so workload
/// attestation is unchanged.
impl<S: Connected> Connected for AuthorityNormalizing<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Where the rewriter is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Inside the connection preface; this many bytes are left.
    Preface(usize),
    /// At the start of a frame.
    FrameHeader,
    /// Inside the payload of a frame passed through; this many bytes left.
    Payload(usize),
}

/// A header block whose HEADERS frame came but not yet its END_HEADERS.
#[derive(Debug)]
struct PendingBlock {
    stream_id: [u8; 4],
    /// END_STREAM and PRIORITY of the HEADERS frame.
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The client-to-server half of the rewrite, without any I/O.
#[derive(Debug)]
pub struct Rewriter {
    phase: Phase,
    pending: Option<PendingBlock>,
    hpack: HpackDecoder,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    pub fn new() -> Self {
        Self {
            phase: Phase::Preface(PREFACE_LEN),
            pending: None,
            hpack: HpackDecoder::new(HPACK_TABLE_LIMIT),
        }
    }

    /// Consumes what it can of `input`, appending what the server should
    /// read to `out`, and returns how many bytes of `input` it consumed.
    /// Bytes of an incomplete frame header or header block stay unconsumed
    /// until more arrive.
    pub fn process(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, RewriteError> {
        let mut pos = 0;
        loop {
            let rest = input.get(pos..).unwrap_or_default();
            match self.phase {
                Phase::Preface(left) | Phase::Payload(left) => {
                    if left == 0 {
                        self.phase = Phase::FrameHeader;
                        continue;
                    }
                    if rest.is_empty() {
                        return Ok(pos);
                    }
                    let n = left.min(rest.len());
                    out.extend_from_slice(rest.get(..n).unwrap_or_default());
                    pos += n;
                    self.phase = match self.phase {
                        Phase::Preface(_) => Phase::Preface(left - n),
                        _ => Phase::Payload(left - n),
                    };
                }
                Phase::FrameHeader => {
                    let Some(header) = rest.get(..FRAME_HEADER_LEN) else {
                        return Ok(pos);
                    };
                    let len = usize::from(header[0]) << 16
                        | usize::from(header[1]) << 8
                        | usize::from(header[2]);
                    let (kind, flags) = (header[3], header[4]);
                    let stream_id = [header[5], header[6], header[7], header[8]];
                    if self.pending.is_some() && kind != TYPE_CONTINUATION {
                        return Err(RewriteError::Framing(
                            "a header block was interrupted by another frame",
                        ));
                    }
                    if kind != TYPE_HEADERS && kind != TYPE_CONTINUATION {
                        out.extend_from_slice(header);
                        pos += FRAME_HEADER_LEN;
                        self.phase = Phase::Payload(len);
                        continue;
                    }
                    if len > IN_FRAME_MAX {
                        return Err(RewriteError::Framing("header frame too large"));
                    }
                    let Some(payload) = rest.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN + len) else {
                        return Ok(pos);
                    };
                    pos += FRAME_HEADER_LEN + len;
                    if kind == TYPE_HEADERS {
                        self.start_block(flags, stream_id, payload)?;
                    } else {
                        self.continue_block(stream_id, payload)?;
                    }
                    if flags & FLAG_END_HEADERS != 0 {
                        self.finish_block(out)?;
                        if out.len() >= OUT_PENDING_MAX {
                            return Ok(pos);
                        }
                    }
                }
            }
        }
    }

    fn start_block(
        &mut self,
        flags: u8,
        stream_id: [u8; 4],
        payload: &[u8],
    ) -> Result<(), RewriteError> {
        let mut at = 0;
        let mut pad = 0;
        if flags & FLAG_PADDED != 0 {
            pad = usize::from(*payload.first().ok_or(RewriteError::Framing(
                "HEADERS frame without its pad length",
            ))?);
            at = 1;
        }
        let mut priority = None;
        if flags & FLAG_PRIORITY != 0 {
            let fields = payload
                .get(at..at + 5)
                .ok_or(RewriteError::Framing("HEADERS frame without its priority"))?;
            let mut p = [0u8; 5];
            p.copy_from_slice(fields);
            priority = Some(p);
            at += 5;
        }
        let end = payload
            .len()
            .checked_sub(pad)
            .filter(|end| *end >= at)
            .ok_or(RewriteError::Framing("HEADERS frame padding too long"))?;
        let fragment = payload.get(at..end).unwrap_or_default().to_vec();
        self.pending = Some(PendingBlock {
            stream_id,
            flags: flags & (FLAG_END_STREAM | FLAG_PRIORITY),
            priority,
            fragment,
        });
        Ok(())
    }

    fn continue_block(&mut self, stream_id: [u8; 4], payload: &[u8]) -> Result<(), RewriteError> {
        let block = self.pending.as_mut().ok_or(RewriteError::Framing(
            "CONTINUATION frame without a header block",
        ))?;
        if block.stream_id != stream_id {
            return Err(RewriteError::Framing(
                "CONTINUATION frame on another stream than its header block",
            ));
        }
        if block.fragment.len() + payload.len() > MAX_BLOCK {
            return Err(RewriteError::Framing("header block too large"));
        }
        block.fragment.extend_from_slice(payload);
        Ok(())
    }

    /// Decodes the complete block, normalises `:authority` and writes the
    /// block again as HEADERS (+ CONTINUATION) frames of literal fields.
    fn finish_block(&mut self, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        let block = self
            .pending
            .take()
            .ok_or(RewriteError::Framing("END_HEADERS without a header block"))?;
        let mut fields = self.hpack.decode(&block.fragment)?;
        for field in &mut fields {
            if field.name == b":authority" && !authority_is_valid(&field.value) {
                field.value = UDS_AUTHORITY.to_vec();
            }
        }
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
        for field in &fields {
            encode_literal(field, &mut encoded);
        }

        let mut first = Vec::with_capacity(OUT_FRAME_MAX);
        if let Some(priority) = block.priority {
            first.extend_from_slice(&priority);
        }
        let room = OUT_FRAME_MAX - first.len();
        let split = encoded.len().min(room);
        first.extend_from_slice(encoded.get(..split).unwrap_or_default());
        let mut rest = encoded
            .get(split..)
            .unwrap_or_default()
            .chunks(OUT_FRAME_MAX);
        let mut next = rest.next();
        let end_headers = if next.is_none() { FLAG_END_HEADERS } else { 0 };
        write_frame(
            out,
            TYPE_HEADERS,
            block.flags | end_headers,
            block.stream_id,
            &first,
        );
        while let Some(chunk) = next {
            next = rest.next();
            let end_headers = if next.is_none() { FLAG_END_HEADERS } else { 0 };
            write_frame(out, TYPE_CONTINUATION, end_headers, block.stream_id, chunk);
        }
        Ok(())
    }
}

/// Whether the HTTP/2 server would accept this `:authority`: the same
/// parser it uses.
fn authority_is_valid(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

fn write_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream_id: [u8; 4], payload: &[u8]) {
    let len = payload.len();
    // Callers never pass more than OUT_FRAME_MAX bytes, so this fits 24 bits.
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream_id);
    out.extend_from_slice(payload);
}

/// One decoded header field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderField {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
    /// Sent as "never indexed" (RFC 7541 §6.2.3); kept so on re-encoding.
    pub never_indexed: bool,
}

/// Writes `field` as a literal without indexing (or never indexed) with a
/// literal name and no Huffman coding.
fn encode_literal(field: &HeaderField, out: &mut Vec<u8>) {
    out.push(if field.never_indexed { 0x10 } else { 0x00 });
    encode_string(&field.name, out);
    encode_string(&field.value, out);
}

fn encode_string(s: &[u8], out: &mut Vec<u8>) {
    encode_integer(s.len(), 7, 0x00, out);
    out.extend_from_slice(s);
}

/// RFC 7541 §5.1 with an `n`-bit prefix whose upper bits are `first`.
fn encode_integer(mut value: usize, n: u8, first: u8, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// An HPACK decoder (RFC 7541) returning raw names and values, so that the
/// HTTP/2 server still makes every decision about their validity itself.
#[derive(Debug)]
pub struct HpackDecoder {
    /// Newest entry first.
    table: std::collections::VecDeque<(Vec<u8>, Vec<u8>)>,
    size: usize,
    max_size: usize,
    /// The most a dynamic table size update may ask for.
    limit: usize,
}

/// RFC 7541 §4.1: an entry's size counts 32 bytes of overhead.
fn entry_size(name: &[u8], value: &[u8]) -> usize {
    name.len() + value.len() + 32
}

impl HpackDecoder {
    pub fn new(limit: usize) -> Self {
        Self {
            table: std::collections::VecDeque::new(),
            size: 0,
            max_size: limit,
            limit,
        }
    }

    /// Decodes one complete header block.
    pub fn decode(&mut self, block: &[u8]) -> Result<Vec<HeaderField>, RewriteError> {
        let mut fields = Vec::new();
        let mut list_size = 0usize;
        let mut cursor = Cursor { buf: block, pos: 0 };
        while let Some(first) = cursor.peek() {
            let field = if first & 0x80 != 0 {
                let index = cursor.integer(7)?;
                let (name, value) = self.lookup(index)?;
                HeaderField {
                    name: name.to_vec(),
                    value: value.to_vec(),
                    never_indexed: false,
                }
            } else if first & 0x40 != 0 {
                let (name, value) = self.literal(&mut cursor, 6)?;
                self.insert(name.clone(), value.clone());
                HeaderField {
                    name,
                    value,
                    never_indexed: false,
                }
            } else if first & 0x20 != 0 {
                if !fields.is_empty() {
                    return Err(RewriteError::Hpack(
                        "dynamic table size update after a header field",
                    ));
                }
                let size = cursor.integer(5)?;
                if size > self.limit {
                    return Err(RewriteError::Hpack(
                        "dynamic table size update above the allowed size",
                    ));
                }
                self.max_size = size;
                self.evict(0);
                continue;
            } else {
                let never_indexed = first & 0x10 != 0;
                let (name, value) = self.literal(&mut cursor, 4)?;
                HeaderField {
                    name,
                    value,
                    never_indexed,
                }
            };
            list_size += entry_size(&field.name, &field.value);
            if list_size > MAX_HEADER_LIST {
                return Err(RewriteError::Hpack("header list too large"));
            }
            fields.push(field);
        }
        Ok(fields)
    }

    fn literal(
        &self,
        cursor: &mut Cursor<'_>,
        prefix: u8,
    ) -> Result<(Vec<u8>, Vec<u8>), RewriteError> {
        let index = cursor.integer(prefix)?;
        let name = if index == 0 {
            cursor.string()?
        } else {
            self.lookup(index)?.0.to_vec()
        };
        let value = cursor.string()?;
        Ok((name, value))
    }

    fn lookup(&self, index: usize) -> Result<(&[u8], &[u8]), RewriteError> {
        if index == 0 {
            return Err(RewriteError::Hpack("header index 0"));
        }
        if let Some((name, value)) = STATIC_TABLE.get(index - 1) {
            return Ok((name.as_bytes(), value.as_bytes()));
        }
        self.table
            .get(index - 1 - STATIC_TABLE.len())
            .map(|(n, v)| (n.as_slice(), v.as_slice()))
            .ok_or(RewriteError::Hpack("header index out of range"))
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = entry_size(&name, &value);
        if size > self.max_size {
            // RFC 7541 §4.4: an entry larger than the table empties it.
            self.table.clear();
            self.size = 0;
            return;
        }
        self.evict(size);
        self.size += size;
        self.table.push_front((name, value));
    }

    /// Evicts the oldest entries until `room` more bytes fit.
    fn evict(&mut self, room: usize) {
        while self.size + room > self.max_size {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= entry_size(&n, &v),
                None => {
                    self.size = 0;
                    break;
                }
            }
        }
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    fn next(&mut self) -> Result<u8, RewriteError> {
        let b = self
            .peek()
            .ok_or(RewriteError::Hpack("header block ends inside a field"))?;
        self.pos += 1;
        Ok(b)
    }

    /// RFC 7541 §5.1; values beyond 2^28 are refused.
    fn integer(&mut self, prefix: u8) -> Result<usize, RewriteError> {
        let max = (1usize << prefix) - 1;
        let mut value = usize::from(self.next()?) & max;
        if value < max {
            return Ok(value);
        }
        let mut shift = 0u32;
        loop {
            let b = self.next()?;
            value += usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                return Ok(value);
            }
            if shift > 21 {
                return Err(RewriteError::Hpack("integer too large"));
            }
        }
    }

    /// RFC 7541 §5.2.
    fn string(&mut self) -> Result<Vec<u8>, RewriteError> {
        let huffman = self.peek().is_some_and(|b| b & 0x80 != 0);
        let len = self.integer(7)?;
        let raw = self
            .buf
            .get(self.pos..self.pos.saturating_add(len))
            .ok_or(RewriteError::Hpack("string longer than its header block"))?;
        self.pos += len;
        if huffman {
            huffman_decode(raw)
        } else {
            Ok(raw.to_vec())
        }
    }
}

/// RFC 7541 Appendix A.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The code length of every symbol (0..=255, then EOS) of the HPACK
/// Huffman code, RFC 7541 Appendix B. The code is canonical, so the codes
/// themselves follow from the lengths.
const HUFFMAN_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, //
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, //
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, //
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, //
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, //
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, //
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, //
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, //
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, //
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, //
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, //
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, //
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, //
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, //
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, //
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, //
    30,
];
const HUFFMAN_EOS: u16 = 256;
const HUFFMAN_MAX_LEN: usize = 30;

/// Canonical-code decoding tables: for each length, how many codes have
/// it, the first (smallest) code of that length, and where its symbols
/// start in `symbols` (sorted by length, then symbol).
struct Canonical {
    count: [u32; HUFFMAN_MAX_LEN + 1],
    first: [u32; HUFFMAN_MAX_LEN + 1],
    offset: [usize; HUFFMAN_MAX_LEN + 1],
    symbols: [u16; 257],
}

const CANONICAL: Canonical = build_canonical();

const fn build_canonical() -> Canonical {
    let mut count = [0u32; HUFFMAN_MAX_LEN + 1];
    let mut i = 0;
    while i < HUFFMAN_LENGTHS.len() {
        count[HUFFMAN_LENGTHS[i] as usize] += 1;
        i += 1;
    }
    let mut offset = [0usize; HUFFMAN_MAX_LEN + 1];
    let mut first = [0u32; HUFFMAN_MAX_LEN + 1];
    let mut acc = 0usize;
    let mut code = 0u32;
    let mut len = 1;
    while len <= HUFFMAN_MAX_LEN {
        offset[len] = acc;
        acc += count[len] as usize;
        first[len] = code;
        code = (code + count[len]) << 1;
        len += 1;
    }
    let mut symbols = [0u16; 257];
    let mut next = offset;
    i = 0;
    while i < HUFFMAN_LENGTHS.len() {
        let len = HUFFMAN_LENGTHS[i] as usize;
        symbols[next[len]] = i as u16;
        next[len] += 1;
        i += 1;
    }
    Canonical {
        count,
        first,
        offset,
        symbols,
    }
}

/// RFC 7541 §5.2 and Appendix B: refuses EOS inside the string and padding
/// that is longer than 7 bits or not all ones.
fn huffman_decode(src: &[u8]) -> Result<Vec<u8>, RewriteError> {
    let mut out = Vec::with_capacity(src.len() * 8 / 5);
    let mut code = 0u32;
    let mut len = 0usize;
    for byte in src {
        for bit in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> bit) & 1);
            len += 1;
            if len > HUFFMAN_MAX_LEN {
                return Err(RewriteError::Hpack("invalid Huffman code"));
            }
            let (count, first) = (CANONICAL.count[len], CANONICAL.first[len]);
            if count > 0 && code >= first && code - first < count {
                let at = CANONICAL.offset[len] + (code - first) as usize;
                match CANONICAL.symbols.get(at) {
                    Some(&HUFFMAN_EOS) | None => {
                        return Err(RewriteError::Hpack("EOS inside a Huffman string"));
                    }
                    Some(&symbol) => out.push(symbol as u8),
                }
                code = 0;
                len = 0;
            }
        }
    }
    if len > 7 || code != (1u32 << len) - 1 {
        return Err(RewriteError::Hpack("invalid Huffman padding"));
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The canonical code of each symbol, for encoding in tests.
    fn huffman_codes() -> Vec<(u32, usize)> {
        let mut codes = vec![(0u32, 0usize); 257];
        for len in 1..=HUFFMAN_MAX_LEN {
            let start = CANONICAL.offset[len];
            for k in 0..CANONICAL.count[len] as usize {
                let sym = usize::from(CANONICAL.symbols[start + k]);
                codes[sym] = (CANONICAL.first[len] + k as u32, len);
            }
        }
        codes
    }

    pub(crate) fn huffman_encode(src: &[u8]) -> Vec<u8> {
        let codes = huffman_codes();
        let (mut acc, mut bits, mut out) = (0u64, 0usize, Vec::new());
        for &b in src {
            let (code, len) = codes[usize::from(b)];
            acc = (acc << len) | u64::from(code);
            bits += len;
            while bits >= 8 {
                out.push((acc >> (bits - 8)) as u8);
                bits -= 8;
            }
        }
        if bits > 0 {
            let pad = 8 - bits;
            out.push(((acc << pad) as u8) | ((1u8 << pad) - 1));
        }
        out
    }

    /// A Huffman-coded string literal (RFC 7541 §5.2).
    pub(crate) fn huffman_string(s: &[u8]) -> Vec<u8> {
        let coded = huffman_encode(s);
        let mut out = Vec::new();
        encode_integer(coded.len(), 7, 0x80, &mut out);
        out.extend_from_slice(&coded);
        out
    }

    #[test]
    fn huffman_code_matches_the_rfc() {
        let codes = huffman_codes();
        // Spot checks against RFC 7541 Appendix B.
        assert_eq!(codes[usize::from(b'0')], (0x0, 5));
        assert_eq!(codes[usize::from(b'a')], (0x3, 5));
        assert_eq!(codes[usize::from(b' ')], (0x14, 6));
        assert_eq!(codes[usize::from(b'%')], (0x15, 6));
        assert_eq!(codes[0], (0x1ff8, 13));
        assert_eq!(codes[255], (0x3ffffee, 26));
        assert_eq!(codes[256], (0x3fffffff, 30));
        // RFC 7541 C.4.1: "www.example.com".
        assert_eq!(
            huffman_encode(b"www.example.com"),
            [
                0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff
            ]
        );
        for sample in [&b"tmp%2Fx%2Fagent.sock"[..], b"", b"\x00\xff\x7f abc"] {
            assert_eq!(huffman_decode(&huffman_encode(sample)).unwrap(), sample);
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(huffman_decode(&huffman_encode(&all)).unwrap(), all);
        // Padding of 8 ones, or not all ones, is refused.
        assert!(huffman_decode(&[0xff]).is_err());
        assert!(huffman_decode(&[0x06]).is_err(), "padding not all ones");
    }

    #[test]
    fn decodes_the_rfc_request_examples_with_huffman() {
        // RFC 7541 C.4.1 to C.4.3: three requests sharing a dynamic table.
        let mut d = HpackDecoder::new(4096);
        let first = hex::decode("828684418cf1e3c2e5f23a6ba0ab90f4ff").unwrap();
        let fields = d.decode(&first).unwrap();
        let pairs: Vec<(&[u8], &[u8])> = fields
            .iter()
            .map(|f| (f.name.as_slice(), f.value.as_slice()))
            .collect();
        assert_eq!(
            pairs,
            [
                (&b":method"[..], &b"GET"[..]),
                (b":scheme", b"http"),
                (b":path", b"/"),
                (b":authority", b"www.example.com"),
            ]
        );
        let second = hex::decode("828684be5886a8eb10649cbf").unwrap();
        let fields = d.decode(&second).unwrap();
        assert_eq!(fields[3].value, b"www.example.com");
        assert_eq!(fields[4].name, b"cache-control");
        assert_eq!(fields[4].value, b"no-cache");
        let third = hex::decode("828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf").unwrap();
        let fields = d.decode(&third).unwrap();
        assert_eq!(fields[2].value, b"/index.html");
        assert_eq!(fields[3].value, b"www.example.com");
        assert_eq!(fields[4].name, b"custom-key");
        assert_eq!(fields[4].value, b"custom-value");
        assert_eq!(d.size, 164);
    }

    #[test]
    fn hpack_refuses_malformed_blocks() {
        let mut d = HpackDecoder::new(4096);
        assert!(d.decode(&[0x80]).is_err(), "index 0");
        assert!(d.decode(&[0xbe]).is_err(), "empty dynamic table");
        assert!(d.decode(&[0x41, 0x05, b'a']).is_err(), "short string");
        assert!(
            d.decode(&[0x3f, 0xff, 0xff, 0xff, 0xff, 0x7f]).is_err(),
            "huge integer"
        );
        assert!(d.decode(&[0x3f, 0xe2, 0x1f]).is_err(), "size above limit");
        assert!(
            d.decode(&[0x82, 0x20]).is_err(),
            "size update after a field"
        );
        assert_eq!(d.decode(&[0x20, 0x82]).unwrap().len(), 1);
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, kind, flags, stream.to_be_bytes(), payload);
        out
    }

    /// The request head a gRPC-core client sends on a `unix:/abs/path`
    /// channel: the authority is the percent-encoded path, Huffman coded
    /// and added to the dynamic table.
    pub(crate) fn grpc_core_head(authority: &[u8], path: &[u8]) -> Vec<u8> {
        let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
        block.push(0x44); // :path, incremental indexing
        block.extend(huffman_string(path));
        block.push(0x41); // :authority, incremental indexing
        block.extend(huffman_string(authority));
        block.push(0x40); // content-type, literal name
        block.extend(huffman_string(b"content-type"));
        block.extend(huffman_string(b"application/grpc"));
        block.push(0x40);
        block.extend(huffman_string(b"te"));
        block.extend(huffman_string(b"trailers"));
        block
    }

    fn decode_output(out: &[u8]) -> Vec<(u8, u8, Vec<HeaderField>)> {
        let mut d = HpackDecoder::new(4096);
        let mut frames = Vec::new();
        let mut rest = out.get(PREFACE_LEN..).unwrap();
        while !rest.is_empty() {
            let len =
                (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
            let (kind, flags) = (rest[3], rest[4]);
            let payload = &rest[9..9 + len];
            let fields = if kind == TYPE_HEADERS {
                let skip = if flags & FLAG_PRIORITY != 0 { 5 } else { 0 };
                d.decode(&payload[skip..]).unwrap()
            } else {
                Vec::new()
            };
            frames.push((kind, flags, fields));
            rest = &rest[9 + len..];
        }
        assert!(d.table.is_empty(), "re-encoded blocks must not index");
        frames
    }

    #[test]
    fn percent_encoded_authority_becomes_localhost_byte_by_byte() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let mut input = preface.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        let head = grpc_core_head(b"tmp%2Fx%2Fagent.sock", b"/SpiffeWorkloadAPI/FetchX509SVID");
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &head));
        input.extend(frame(0x0, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 0])); // DATA
        // A second request reuses the dynamic table entries (index 62 is
        // the newest: te; :authority is 64, :path 65).
        let second = [0x83, 0x86, 0xc1, 0xc0, 0xbf, 0xbe];
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS | FLAG_END_STREAM,
            3,
            &second,
        ));

        // Fed one byte at a time, the output is the same as all at once.
        let mut all_at_once = Vec::new();
        let consumed = Rewriter::new().process(&input, &mut all_at_once).unwrap();
        assert_eq!(consumed, input.len());
        let mut rewriter = Rewriter::new();
        let (mut pending, mut trickled) = (Vec::new(), Vec::new());
        for b in &input {
            pending.push(*b);
            let n = rewriter.process(&pending, &mut trickled).unwrap();
            pending.drain(..n);
        }
        assert!(pending.is_empty());
        assert_eq!(trickled, all_at_once);
        assert_eq!(all_at_once.get(..PREFACE_LEN).unwrap(), preface);

        let frames = decode_output(&all_at_once);
        let kinds: Vec<u8> = frames.iter().map(|f| f.0).collect();
        assert_eq!(kinds, [0x4, TYPE_HEADERS, 0x0, TYPE_HEADERS]);
        for (_, _, fields) in [&frames[1], &frames[3]] {
            let authority = fields.iter().find(|f| f.name == b":authority").unwrap();
            assert_eq!(authority.value, b"localhost");
            let path = fields.iter().find(|f| f.name == b":path").unwrap();
            assert_eq!(path.value, b"/SpiffeWorkloadAPI/FetchX509SVID");
        }
        assert_eq!(frames[3].1, FLAG_END_HEADERS | FLAG_END_STREAM);
    }

    #[test]
    fn valid_authority_padding_priority_and_continuation_are_kept() {
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let head = grpc_core_head(b"localhost:50051", b"/a/b");
        let (one, two) = head.split_at(7);
        // PADDED + PRIORITY HEADERS, then a CONTINUATION.
        let mut payload = vec![3u8];
        payload.extend([0, 0, 0, 0, 15]);
        payload.extend(one);
        payload.extend([0, 0, 0]);
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY,
            1,
            &payload,
        ));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, two));
        let mut out = Vec::new();
        Rewriter::new().process(&input, &mut out).unwrap();
        let frames = decode_output(&out);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].1, FLAG_PRIORITY | FLAG_END_HEADERS);
        let authority = frames[0]
            .2
            .iter()
            .find(|f| f.name == b":authority")
            .unwrap();
        assert_eq!(authority.value, b"localhost:50051");
        // The priority fields come first, unchanged.
        assert_eq!(&out[PREFACE_LEN + 9..PREFACE_LEN + 14], &[0, 0, 0, 0, 15]);
    }

    #[test]
    fn large_blocks_are_split_and_broken_framing_refused() {
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let mut block = grpc_core_head(b"/raw/path.sock", b"/a/b");
        block.push(0x00);
        encode_string(b"x-big", &mut block);
        encode_string(&vec![b'v'; 40_000], &mut block);
        // Sent as a client must: frames of at most 16 KiB.
        let chunks: Vec<&[u8]> = block.chunks(IN_FRAME_MAX).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let kind = if i == 0 {
                TYPE_HEADERS
            } else {
                TYPE_CONTINUATION
            };
            let end = if i + 1 == chunks.len() {
                FLAG_END_HEADERS
            } else {
                0
            };
            input.extend(frame(kind, end, 1, chunk));
        }
        let mut out = Vec::new();
        Rewriter::new().process(&input, &mut out).unwrap();
        let mut rest = &out[PREFACE_LEN..];
        let mut block_out = Vec::new();
        let mut kinds = Vec::new();
        while !rest.is_empty() {
            let len =
                (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
            assert!(len <= OUT_FRAME_MAX);
            kinds.push((rest[3], rest[4]));
            block_out.extend_from_slice(&rest[9..9 + len]);
            rest = &rest[9 + len..];
        }
        assert_eq!(
            kinds,
            [
                (TYPE_HEADERS, 0),
                (TYPE_CONTINUATION, 0),
                (TYPE_CONTINUATION, FLAG_END_HEADERS)
            ]
        );
        let fields = HpackDecoder::new(4096).decode(&block_out).unwrap();
        assert!(
            fields
                .iter()
                .any(|f| f.name == b":authority" && f.value == b"localhost")
        );

        // A DATA frame between HEADERS and its CONTINUATION is refused.
        let mut bad = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bad.extend(frame(TYPE_HEADERS, 0, 1, &[0x82]));
        bad.extend(frame(0x0, 0, 1, &[]));
        assert!(Rewriter::new().process(&bad, &mut Vec::new()).is_err());
        // Padding longer than the frame is refused.
        let mut bad = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bad.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_END_HEADERS,
            1,
            &[9, 0x82],
        ));
        assert!(Rewriter::new().process(&bad, &mut Vec::new()).is_err());
    }

    /// Frames of one-byte references to a 4 KiB dynamic-table entry: each
    /// block over the header-list limit is refused (the connection closes),
    /// and blocks under it are handed out at most `OUT_PENDING_MAX` at a
    /// time, however many arrive in one read.
    /// A header frame longer than the 16 KiB the server allows is refused
    /// from its frame header, before its payload is gathered, and a block
    /// gathered from CONTINUATION frames past [`MAX_BLOCK`] is refused: a
    /// connection cannot make the rewriter hold megabytes of an unfinished
    /// block. The control: a 16 KiB frame, then a block just under the
    /// bound, are gathered.
    #[test]
    fn a_header_block_is_gathered_only_within_its_bounds() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // A HEADERS frame announcing 1 MiB, with none of its payload yet.
        let mut attack = preface.clone();
        attack.extend_from_slice(&frame(TYPE_HEADERS, 0, 1, &[])[..FRAME_HEADER_LEN]);
        attack[PREFACE_LEN..PREFACE_LEN + 3].copy_from_slice(&[0x10, 0x00, 0x00]);
        let mut out = Vec::new();
        assert_eq!(
            Rewriter::new().process(&attack, &mut out),
            Err(RewriteError::Framing("header frame too large"))
        );
        // Control: a frame of exactly 16 KiB without END_HEADERS, then
        // CONTINUATION frames up to the block bound, are taken whole.
        let mut r = Rewriter::new();
        let mut input = preface.clone();
        input.extend(frame(TYPE_HEADERS, 0, 1, &[0x00; IN_FRAME_MAX]));
        let mut gathered = IN_FRAME_MAX;
        while gathered + IN_FRAME_MAX <= MAX_BLOCK {
            input.extend(frame(TYPE_CONTINUATION, 0, 1, &[0x00; IN_FRAME_MAX]));
            gathered += IN_FRAME_MAX;
        }
        let mut out = Vec::new();
        assert_eq!(r.process(&input, &mut out), Ok(input.len()));
        // One more CONTINUATION past the bound: refused.
        let more = frame(TYPE_CONTINUATION, 0, 1, &[0x00; IN_FRAME_MAX]);
        assert_eq!(
            r.process(&more, &mut out),
            Err(RewriteError::Framing("header block too large"))
        );
    }

    #[test]
    fn indexed_references_are_not_expanded_without_bound() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // Incremental indexing (0x40) of `a: <4,063 bytes>`: 4,096 bytes
        // of table, the whole default table.
        let mut insert = vec![0x40];
        encode_string(b"a", &mut insert);
        encode_string(&vec![b'v'; 4_063], &mut insert);
        let mut input = preface.clone();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &insert));
        // 250 references (1 MB decoded) in one frame: refused.
        let mut attack = input.clone();
        attack.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &[0xBE; 250]));
        let mut out = Vec::new();
        assert_eq!(
            Rewriter::new().process(&attack, &mut out),
            Err(RewriteError::Hpack("header list too large"))
        );
        // 15 references (61 KB decoded) per frame, 60 frames in one read:
        // processed in steps of at most OUT_PENDING_MAX (and a block).
        let mut many = input.clone();
        for i in 0..60u32 {
            many.extend(frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS,
                5 + 2 * i,
                &[0xBE; 15],
            ));
        }
        let mut r = Rewriter::new();
        let mut pos = 0;
        let mut steps = 0;
        let mut total = 0;
        while pos < many.len() {
            let mut out = Vec::new();
            let n = r.process(&many[pos..], &mut out).unwrap();
            assert!(n > 0);
            assert!(
                out.len() < OUT_PENDING_MAX + MAX_HEADER_LIST + 1024,
                "{}",
                out.len()
            );
            total += out.len();
            pos += n;
            steps += 1;
        }
        assert!(steps > 3, "{steps} steps");
        assert!(total > 60 * 55_000, "every block still rewritten: {total}");
        // Control: small literal blocks in one read are handed out in one
        // step, about their own size.
        let mut small = preface;
        for i in 0..60u32 {
            let mut b = vec![0x00];
            encode_string(b"x-k", &mut b);
            encode_string(b"v", &mut b);
            small.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1 + 2 * i, &b));
        }
        let mut out = Vec::new();
        assert_eq!(
            Rewriter::new().process(&small, &mut out).unwrap(),
            small.len()
        );
        assert!(out.len() < 2 * small.len());
    }

    /// JWTs are not part of this test.
    #[derive(Debug)]
    struct NoJwt;

    impl crate::workload::JwtAuthority for NoJwt {
        async fn fetch_jwt(
            &self,
            _entry: &baton_core::Entry,
            _audience: &[String],
            _now: u64,
        ) -> Result<baton_core::Secret, tonic::Status> {
            Err(tonic::Status::unimplemented("no JWTs here"))
        }

        fn validate_jwt(
            &self,
            _token: &str,
            _audience: &str,
            _bundle: &crate::cache::BundleView,
            _now: u64,
        ) -> Result<crate::workload::JwtClaims, String> {
            Err("no JWTs here".into())
        }
    }

    /// What the server answered on stream 1.
    #[derive(Debug, PartialEq, Eq)]
    enum Answer {
        Reset(u32),
        GrpcStatus(String),
    }

    /// Sends the request head of a gRPC-core client (percent-encoded
    /// socket path as `:authority`, no security header) to a real tonic
    /// server with the Workload API, and reads what it answers.
    async fn ask_tonic(normalise: bool) -> Answer {
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio_stream::StreamExt;
        use tokio_stream::wrappers::UnixListenerStream;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (_tx, rx) = tokio::sync::watch::channel(Arc::new(crate::cache::Snapshot::default()));
        let service = crate::workload::WorkloadService::new(
            rx,
            Arc::new(crate::attest::Attestor::new()),
            Arc::new(NoJwt),
        );
        let router = tonic::transport::Server::builder().add_service(
            baton_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(
                service,
            ),
        );
        let incoming = UnixListenerStream::new(listener);
        let server = if normalise {
            tokio::spawn(
                router.serve_with_incoming(incoming.map(|c| c.map(AuthorityNormalizing::new))),
            )
        } else {
            tokio::spawn(router.serve_with_incoming(incoming))
        };

        let mut sock = tokio::net::UnixStream::connect(&path).await.unwrap();
        let mut request = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        request.extend(frame(0x4, 0, 0, &[]));
        let head = grpc_core_head(
            path.to_str()
                .unwrap()
                .trim_start_matches('/')
                .replace('/', "%2F")
                .as_bytes(),
            b"/SpiffeWorkloadAPI/FetchX509SVID",
        );
        request.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &head));
        request.extend(frame(0x0, FLAG_END_STREAM, 1, &[0, 0, 0, 0, 0]));
        sock.write_all(&request).await.unwrap();

        let mut decoder = HpackDecoder::new(4096);
        let answer = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                let mut header = [0u8; 9];
                sock.read_exact(&mut header).await.unwrap();
                let len = (usize::from(header[0]) << 16)
                    | (usize::from(header[1]) << 8)
                    | usize::from(header[2]);
                let mut payload = vec![0u8; len];
                sock.read_exact(&mut payload).await.unwrap();
                let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
                match header[3] {
                    0x4 if header[4] & 0x1 == 0 => {
                        sock.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap();
                    }
                    0x3 if stream == 1 => {
                        let code =
                            u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
                        return Answer::Reset(code);
                    }
                    TYPE_HEADERS if stream == 1 => {
                        let fields = decoder.decode(&payload).unwrap();
                        if let Some(status) = fields.iter().find(|f| f.name == b"grpc-status") {
                            return Answer::GrpcStatus(
                                String::from_utf8(status.value.clone()).unwrap(),
                            );
                        }
                    }
                    _ => {}
                }
            }
        })
        .await
        .expect("no answer from the server within the deadline");
        server.abort();
        answer
    }

    #[tokio::test]
    async fn tonic_answers_a_percent_encoded_authority_only_when_normalised() {
        // Control: the bare HTTP/2 stack resets the stream (PROTOCOL_ERROR).
        assert_eq!(ask_tonic(false).await, Answer::Reset(0x1));
        // Normalised, the call reaches the service, which refuses it for
        // the missing security header: INVALID_ARGUMENT (3).
        assert_eq!(ask_tonic(true).await, Answer::GrpcStatus("3".into()));
    }
}
