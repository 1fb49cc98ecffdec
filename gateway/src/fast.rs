//! The HTTP/1.1 fast path (ADR-0023): the common agent request — an
//! HTTP/1.1 request with no body or a `Content-Length` body, on a route that
//! requires identity, whose certificate the revocation check allows — is
//! proxied here, as bytes, instead of through pingora's per-request session.
//!
//! Everything else goes to pingora's full path, which decides it exactly as
//! before: the fast path only ever *declines* before it has read or written
//! anything, and pingora then parses the same head again. It declines a
//! head that the strict parser ([`parse_request`]) does not take whole
//! (obs-fold, a space before a colon, bare CR, more than [`MAX_HEADERS`]
//! headers, a target that is not plain origin-form), any request for a
//! tunnel or with other framing (`Transfer-Encoding`, `Upgrade`, `Expect`,
//! `TE`, `Trailer`, `HTTP2-Settings`, a `Connection` option other than
//! `keep-alive`/`close`, CONNECT, HTTP/1.0), a missing or repeated `Host`, a
//! repeated or malformed `Content-Length`, a body over the route's limit, a
//! route without identity or without a healthy upstream, and every request
//! the revocation check does not allow (pingora answers those with the
//! problem+json and audit report as before).
//!
//! What it does for a request it takes, in one pass over the head:
//! the request line is copied, every client header the [`StripPolicy`]
//! removes (identity and forwarding headers in every spelling, underscored
//! names) and the hop-by-hop `Connection`, `Keep-Alive` and
//! `Proxy-Connection` are dropped, the rest is copied with its case, and the
//! gateway's forwarding headers, the connection's identity headers and the
//! route's signed assertion are appended — the same header set pingora's
//! path sends (`tests/tests/suite/fastpath.rs` compares the two on the same
//! inputs). The head and the body bytes already read go to the upstream in
//! one write, over a pooled keep-alive connection ([`UpstreamPool`]); the
//! response head is parsed (informational heads relayed ahead of it), its
//! `Connection`/`Keep-Alive` replaced by the
//! gateway's own `connection`, a `date` added when missing, and the body is
//! relayed by its framing (`Content-Length`, chunked — checked by
//! [`ChunkedScan`] —, or until close). A malformed response, a timeout or a
//! refused connection before anything was sent to the client answers
//! problem+json (502 `bad_gateway`, 504 `gateway_timeout`) and closes, as
//! pingora's path does; after the response started, the connection is cut.

use std::io::{self, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use oneprotect_identity::headers::{FORWARDED, IDENTITY_ASSERTION, X_FORWARDED_FOR, X_REAL_IP};
use oneprotect_identity::problem::{self, ProblemKind};
use pingora::connectors::TransportConnector;
use pingora::lb::Backend;
use pingora::protocols::Stream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod http2;
pub use http2::Ended as Http2Ended;

use crate::assertion::AssertionService;
use crate::conn::{ConnIdentity, Forwarding};
use crate::headers::StripPolicy;
use crate::metrics::Metrics;
use crate::reports::Reporter;
use crate::revocation::{Decision, Revocation};
use crate::routes::{Route, Router};

/// The most request (and response) headers the fast path takes; a head
/// with more goes to pingora (which takes up to 256).
pub const MAX_HEADERS: usize = 48;

/// The largest upstream response head read, bytes; larger is a 502.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// How many informational (1xx) responses may precede the final one.
const MAX_INFORMATIONAL: usize = 8;

/// What the fast path did with a request.
#[derive(Debug)]
pub enum Served {
    /// Not taken: nothing was read or written; pingora serves the head.
    Declined(BytesMut),
    /// Answered.
    Done {
        /// The connection may carry the next request.
        keep_alive: bool,
    },
    /// Failed before anything reached the client: answer this problem and
    /// close.
    Failed(ProblemKind),
    /// Cut mid-way (a peer went away, a timeout after the response began):
    /// close without an answer.
    Aborted,
}

/// Why a head is not for the fast path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decline {
    /// The strict parser did not take it whole.
    Parse,
    /// Not HTTP/1.1, CONNECT, or a target that is not plain origin-form.
    RequestLine,
    /// A header the fast path leaves to pingora, or `Host`/`Content-Length`
    /// missing, repeated or malformed.
    Header,
}

/// A request head the fast path takes: its parts, borrowed from the head.
#[derive(Debug)]
pub struct Request<'b> {
    /// The method.
    pub method: &'b str,
    /// The origin-form target, query included.
    pub target: &'b str,
    /// The head's length; what follows is body (or a pipelined request).
    pub head_len: usize,
    /// The body's length (0 without `Content-Length`).
    pub content_length: u64,
    /// The client asked to close (`Connection: close`).
    pub close: bool,
    headers: [httparse::Header<'b>; MAX_HEADERS],
    count: usize,
}

impl<'b> Request<'b> {
    /// The target's path (before `?`), which routes the request.
    pub fn path(&self) -> &'b str {
        self.target.split('?').next().unwrap_or(self.target)
    }

    /// The headers, in the order sent.
    pub fn headers(&self) -> &[httparse::Header<'b>] {
        &self.headers[..self.count]
    }
}

/// Whether a name is one of `names`, in any case.
fn is_any(name: &str, names: &[&str]) -> bool {
    names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Request headers the fast path leaves to pingora: other framing,
/// tunnels, interim responses, trailers.
const DECLINED: [&str; 6] = [
    "transfer-encoding",
    "upgrade",
    "expect",
    "te",
    "trailer",
    "http2-settings",
];

/// Hop-by-hop request headers the fast path drops (their meaning is for the
/// gateway, not the upstream).
const HOP_BY_HOP: [&str; 3] = ["connection", "keep-alive", "proxy-connection"];

/// Parses a request head strictly and says whether the fast path takes it.
pub fn parse_request(buf: &[u8]) -> Result<Request<'_>, Decline> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let (method, target, version, head_len, count) = {
        let mut req = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(head_len)) = req.parse(buf) else {
            return Err(Decline::Parse);
        };
        (
            req.method.ok_or(Decline::Parse)?,
            req.path.ok_or(Decline::Parse)?,
            req.version.ok_or(Decline::Parse)?,
            head_len,
            req.headers.len(),
        )
    };
    if version != 1 || method == "CONNECT" || !plain_origin_form(target) {
        return Err(Decline::RequestLine);
    }
    let mut hosts = 0;
    let mut content_length = None;
    let mut close = false;
    for h in &headers[..count] {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("content-length") {
            if content_length.is_some() {
                return Err(Decline::Header);
            }
            content_length = Some(parse_length(h.value).ok_or(Decline::Header)?);
        } else if name.eq_ignore_ascii_case("connection") {
            for opt in h.value.split(|b| *b == b',') {
                match opt.trim_ascii() {
                    o if o.eq_ignore_ascii_case(b"close") => close = true,
                    o if o.eq_ignore_ascii_case(b"keep-alive") => {}
                    _ => return Err(Decline::Header),
                }
            }
        } else if is_any(name, &DECLINED) {
            return Err(Decline::Header);
        }
    }
    if hosts != 1 {
        return Err(Decline::Header);
    }
    Ok(Request {
        method,
        target,
        head_len,
        content_length: content_length.unwrap_or(0),
        close,
        headers,
        count,
    })
}

/// An origin-form target of visible ASCII without a fragment whose every
/// byte the `http` crate's URI parser (pingora's) accepts where it stands:
/// the fast path takes no target pingora's path would refuse.
fn plain_origin_form(target: &str) -> bool {
    let table = uri_bytes();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    path.starts_with('/')
        && path.bytes().all(|b| table[0][b as usize])
        && query.is_none_or(|q| q.bytes().all(|b| table[1][b as usize]))
}

/// Which bytes the `http` crate takes in a path (`[0]`) and in a query
/// (`[1]`), asked of it once, byte by byte: visible ASCII only, never `#`
/// (a fragment: pingora's parser would drop it, the fast path would not).
/// Found by the fuzz target: `` ` `` in a path, which `http` refuses.
fn uri_bytes() -> &'static [[bool; 256]; 2] {
    static TABLE: std::sync::OnceLock<[[bool; 256]; 2]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [[false; 256]; 2];
        for b in 0x21u8..=0x7e {
            if b == b'#' || b == b'?' {
                continue;
            }
            let c = b as char;
            t[0][b as usize] = format!("/a{c}b")
                .parse::<http::uri::PathAndQuery>()
                .is_ok_and(|pq| pq.path() == format!("/a{c}b") && pq.query().is_none());
            t[1][b as usize] = format!("/a?x{c}y")
                .parse::<http::uri::PathAndQuery>()
                .is_ok_and(|pq| pq.query() == Some(&format!("x{c}y")));
        }
        // A second `?` belongs to the query.
        t[1][b'?' as usize] = "/a?x?y"
            .parse::<http::uri::PathAndQuery>()
            .is_ok_and(|pq| pq.query() == Some("x?y"));
        t
    })
}

/// A `Content-Length` value: 1 to 18 digits, nothing else.
fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Writes the upstream request head for `req`: request line, the client's
/// headers less those `strip` removes and the hop-by-hop ones, then the
/// gateway's forwarding headers, the identity headers and the assertion.
pub fn write_upstream_head(
    out: &mut Vec<u8>,
    req: &Request<'_>,
    strip: StripPolicy,
    forwarding: &Forwarding,
    identity: &[(&'static str, http::HeaderValue)],
    assertion: &http::HeaderValue,
) {
    out.extend_from_slice(req.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(req.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in req.headers() {
        if strip.removes(h.name) || is_any(h.name, &HOP_BY_HOP) {
            continue;
        }
        put_header(out, h.name, h.value);
    }
    write_gateway_headers(out, forwarding, Some((identity, assertion)));
}

/// Ends an upstream head with the gateway's own headers: the forwarding
/// ones, then (when given) the connection's identity headers and the
/// route's assertion, and the empty line. Both fast paths (HTTP/1.1 and
/// HTTP/2) end their heads here.
pub(crate) fn write_gateway_headers(
    out: &mut Vec<u8>,
    forwarding: &Forwarding,
    identity: Option<(&[(&'static str, http::HeaderValue)], &http::HeaderValue)>,
) {
    put_header(out, X_FORWARDED_FOR, forwarding.address().as_bytes());
    put_header(out, X_REAL_IP, forwarding.address().as_bytes());
    put_header(out, FORWARDED, forwarding.forwarded().as_bytes());
    if let Some((headers, assertion)) = identity {
        for (name, value) in headers {
            put_header(out, name, value.as_bytes());
        }
        put_header(out, IDENTITY_ASSERTION, assertion.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

fn put_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// How a response body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 204, 304).
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding` ending in `chunked`.
    Chunked,
    /// Until the upstream closes.
    UntilClose,
}

/// A final upstream response head, rewritten for the client.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The head's length in the upstream's bytes.
    pub head_len: usize,
    /// How its body is framed.
    pub framing: Framing,
    /// The upstream connection may carry another request afterwards.
    pub reusable: bool,
}

/// Why an upstream response head is refused (502).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadResponse {
    /// Not a valid HTTP/1.x response head.
    Malformed,
    /// A 101 to a request that asked for no upgrade.
    UnexpectedUpgrade,
    /// `Content-Length` repeated or malformed, or with `Transfer-Encoding`.
    Framing,
}

/// An upstream response head, parsed once: [`ResponseHead::facts`] decides
/// its framing and [`ResponseHead::write_for_client`] rewrites it from the
/// same parse.
pub struct ResponseHead<'b> {
    code: u16,
    version: u8,
    reason: &'b str,
    headers: [httparse::Header<'b>; MAX_HEADERS],
    count: usize,
    /// The head's length in the upstream's bytes.
    pub len: usize,
}

/// Parses a response head at the start of `buf`: `Ok(None)` needs more
/// bytes.
pub fn parse_head(buf: &[u8]) -> Result<Option<ResponseHead<'_>>, BadResponse> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let (code, version, reason, len, count) = {
        let mut resp = httparse::Response::new(&mut headers);
        let len = match resp.parse(buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err(BadResponse::Malformed),
        };
        (
            resp.code.ok_or(BadResponse::Malformed)?,
            resp.version.ok_or(BadResponse::Malformed)?,
            resp.reason.unwrap_or_default(),
            len,
            resp.headers.len(),
        )
    };
    Ok(Some(ResponseHead {
        code,
        version,
        reason,
        headers,
        count,
        len,
    }))
}

impl ResponseHead<'_> {
    pub(crate) fn headers(&self) -> &[httparse::Header<'_>] {
        &self.headers[..self.count]
    }

    /// Whether this is an informational (1xx) head, which the caller
    /// relays before reading on to the final one.
    pub fn informational(&self) -> bool {
        (100..200).contains(&self.code)
    }

    /// Its status and framing (RFC 9112 §6.3), and whether the upstream
    /// connection may be reused after it; informational heads are
    /// [`Framing::Empty`].
    pub fn facts(&self, head_request: bool) -> Result<Response, BadResponse> {
        let status = self.code;
        if status == 101 {
            return Err(BadResponse::UnexpectedUpgrade);
        }
        if self.informational() {
            return Ok(Response {
                status,
                head_len: self.len,
                framing: Framing::Empty,
                reusable: true,
            });
        }
        let mut length = None;
        let mut chunked = None;
        let mut close = self.version == 0;
        for h in self.headers() {
            if h.name.eq_ignore_ascii_case("content-length") {
                if length.is_some() {
                    return Err(BadResponse::Framing);
                }
                length = Some(parse_length(h.value).ok_or(BadResponse::Framing)?);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                // The last coding of the last header decides (RFC 9112 §6.3).
                let last = h.value.rsplit(|b| *b == b',').next().unwrap_or_default();
                chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if h.name.eq_ignore_ascii_case("connection") {
                for opt in h.value.split(|b| *b == b',') {
                    let opt = opt.trim_ascii();
                    if opt.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if self.version == 0 && opt.eq_ignore_ascii_case(b"keep-alive") {
                        close = false;
                    }
                }
            }
        }
        let framing = if head_request || status == 204 || status == 304 {
            Framing::Empty
        } else {
            match (chunked, length) {
                (Some(_), Some(_)) => return Err(BadResponse::Framing),
                (Some(true), None) => Framing::Chunked,
                (Some(false), None) | (None, None) => Framing::UntilClose,
                (None, Some(n)) => Framing::Length(n),
            }
        };
        Ok(Response {
            status,
            head_len: self.len,
            framing,
            reusable: !close && framing != Framing::UntilClose,
        })
    }

    /// Writes the client's head: status line as HTTP/1.1 with the
    /// upstream's reason, its headers less `Connection`, `Keep-Alive` and
    /// `Proxy-Connection`, a `Date` when it sent none, and the gateway's
    /// `Connection`. `rechunk`: the upstream's body runs until it closes,
    /// and goes to the client chunked (`Transfer-Encoding: chunked` is
    /// added), so the client's connection stays open, as pingora's path
    /// does. An informational (1xx) head gets neither `Date` nor
    /// `Connection`.
    pub fn write_for_client(&self, out: &mut Vec<u8>, keep_alive: bool, rechunk: bool) {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(itoa3(self.code).as_slice());
        out.push(b' ');
        out.extend_from_slice(self.reason.as_bytes());
        out.extend_from_slice(b"\r\n");
        let mut dated = false;
        for h in self.headers() {
            if is_any(h.name, &HOP_BY_HOP) {
                continue;
            }
            dated |= h.name.eq_ignore_ascii_case("date");
            put_header(out, h.name, h.value);
        }
        if self.informational() {
            out.extend_from_slice(b"\r\n");
            return;
        }
        if !dated {
            // Capitalised as pingora writes the headers it adds.
            put_header(
                out,
                "Date",
                pingora::protocols::http::date::get_cached_date().as_bytes(),
            );
        }
        if rechunk {
            put_header(out, "Transfer-Encoding", b"chunked");
        }
        out.extend_from_slice(if keep_alive {
            b"Connection: keep-alive\r\n\r\n"
        } else {
            b"Connection: close\r\n\r\n"
        });
    }
}

fn itoa3(n: u16) -> [u8; 3] {
    let n = n.min(999);
    [
        b'0' + (n / 100) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ]
}

/// Finds the end of a chunked body (RFC 9112 §7.1) in the bytes relayed,
/// strictly: hex sizes of at most 15 digits, `CRLF` line ends, extensions
/// and trailer lines of visible characters, spaces and tabs.
#[derive(Debug, Default, Clone)]
pub struct ChunkedScan {
    state: Chunk,
    size: u64,
    digits: u8,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    #[default]
    Size,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

/// A chunked body the scan refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadChunk;

impl ChunkedScan {
    /// Moves to `next` if `b` is the `want`ed line-end byte.
    fn expect(&mut self, b: u8, want: u8, next: Chunk) -> Result<(), BadChunk> {
        if b != want {
            return Err(BadChunk);
        }
        self.state = next;
        Ok(())
    }

    /// Scans `buf`, the next bytes of the body: `Ok(Some(n))` when the body
    /// ends after `n` of them, `Ok(None)` when it goes on.
    pub fn feed(&mut self, buf: &[u8]) -> Result<Option<usize>, BadChunk> {
        self.feed_with(buf, |_| {})
    }

    /// [`ChunkedScan::feed`], also naming each run of chunk data in `buf`
    /// (its byte range) to `data`, in order: what a decoder keeps.
    pub fn feed_with(
        &mut self,
        buf: &[u8],
        mut data: impl FnMut(std::ops::Range<usize>),
    ) -> Result<Option<usize>, BadChunk> {
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            match self.state {
                Chunk::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits == 15 {
                            return Err(BadChunk);
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                        self.size = self.size * 16 + d;
                        self.digits += 1;
                    }
                    b';' if self.digits > 0 => self.state = Chunk::Ext,
                    b'\r' if self.digits > 0 => self.state = Chunk::SizeLf,
                    _ => return Err(BadChunk),
                },
                Chunk::Ext => match b {
                    b'\r' => self.state = Chunk::SizeLf,
                    b'\t' | 0x20..=0x7e => {}
                    _ => return Err(BadChunk),
                },
                Chunk::SizeLf => {
                    if b != b'\n' {
                        return Err(BadChunk);
                    }
                    self.digits = 0;
                    self.state = if self.size == 0 {
                        Chunk::TrailerStart
                    } else {
                        Chunk::Data
                    };
                }
                Chunk::Data => {
                    let take = (buf.len() - i).min(self.size as usize);
                    data(i..i + take);
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = Chunk::DataCr;
                    }
                    continue;
                }
                Chunk::DataCr => self.expect(b, b'\r', Chunk::DataLf)?,
                Chunk::DataLf => self.expect(b, b'\n', Chunk::Size)?,
                Chunk::TrailerStart => match b {
                    b'\r' => self.state = Chunk::EndLf,
                    b'\t' | 0x20..=0x7e => self.state = Chunk::Trailer,
                    _ => return Err(BadChunk),
                },
                Chunk::Trailer => match b {
                    b'\r' => self.state = Chunk::TrailerLf,
                    b'\t' | 0x20..=0x7e | 0x80..=0xff => {}
                    _ => return Err(BadChunk),
                },
                Chunk::TrailerLf => self.expect(b, b'\n', Chunk::TrailerStart)?,
                Chunk::EndLf => {
                    self.expect(b, b'\n', Chunk::Done)?;
                    return Ok(Some(i + 1));
                }
                Chunk::Done => return Ok(Some(i)),
            }
            i += 1;
        }
        Ok((self.state == Chunk::Done).then_some(buf.len()))
    }
}

/// A pool key: the route (its upstream TLS settings) and the backend.
type PoolKey = (u32, pingora::protocols::l4::socket::SocketAddr);

/// Per key, its idle connections, each with when it was released.
type Idle = Vec<(PoolKey, Vec<(Stream, Instant)>)>;

/// Idle keep-alive upstream connections of the fast path, per route and
/// backend, most recently used first out. A connection is checked before
/// reuse (closed or with unexpected bytes: dropped) and not kept past
/// [`UpstreamPool::IDLE`].
#[derive(Default)]
pub struct UpstreamPool {
    /// Per key (a handful: routes × backends), scanned without hashing.
    idle: Mutex<Idle>,
}

impl UpstreamPool {
    /// How long an idle upstream connection is kept.
    pub const IDLE: Duration = Duration::from_secs(55);
    /// How many idle connections are kept per route and backend.
    pub const PER_BACKEND: usize = 256;

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self, key: &PoolKey) -> Option<Stream> {
        loop {
            let (mut s, since) = {
                let mut idle = self.lock();
                let (_, list) = idle.iter_mut().find(|(k, _)| k == key)?;
                list.pop()?
            };
            if since.elapsed() < Self::IDLE && still_idle(&mut s) {
                return Some(s);
            }
        }
    }

    fn put(&self, key: PoolKey, s: Stream) {
        let mut idle = self.lock();
        let at = match idle.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                idle.push((key, Vec::new()));
                idle.len() - 1
            }
        };
        let list = &mut idle[at].1;
        if list
            .first()
            .is_some_and(|(_, since)| since.elapsed() >= Self::IDLE)
        {
            list.remove(0);
        }
        if list.len() < Self::PER_BACKEND {
            list.push((s, Instant::now()));
        }
    }
}

/// An idle connection that has nothing to read (and is not closed).
fn still_idle(s: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    crate::serve::poll_once(s.read(&mut byte)).is_none()
}

/// An I/O step's failure.
enum Io {
    Timeout,
    Failed,
}

/// Runs an I/O step bounded by `limit`.
async fn timed<T>(
    limit: Duration,
    f: impl std::future::Future<Output = io::Result<T>>,
) -> Result<T, Io> {
    match pingora_timeout::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(_)) => Err(Io::Failed),
        Err(_) => Err(Io::Timeout),
    }
}

fn upstream_problem(e: Io) -> ProblemKind {
    match e {
        Io::Timeout => problem::GATEWAY_TIMEOUT,
        Io::Failed => problem::BAD_GATEWAY,
    }
}

/// How a request's exchange with an upstream connection went.
enum Attempt {
    /// A response head arrived: the connection, what was read past the
    /// head, the head's facts, and the bytes for the client so far (the
    /// informational heads and the final head, rewritten).
    Answered(Stream, BytesMut, Response, Vec<u8>),
    /// A reused connection failed before any response byte; the request
    /// may go again on a new one.
    Stale,
    Failed(ProblemKind),
    Aborted,
}

impl Attempt {
    /// Sending the request failed: a failed write may be a reused
    /// connection the upstream had closed.
    fn unsent(e: Io) -> Self {
        match e {
            Io::Failed => Attempt::Stale,
            Io::Timeout => Attempt::Failed(problem::GATEWAY_TIMEOUT),
        }
    }
}

/// A request the fast path took, ready to send: the parsed head is gone.
struct Taken {
    route: std::sync::Arc<Route>,
    backend: Backend,
    /// The upstream head (body bytes are appended to it).
    out: Vec<u8>,
    head_len: usize,
    length: u64,
    client_close: bool,
    head_request: bool,
    /// RFC 9110 §9.2.2: only these may go again after a failure that may
    /// have reached the upstream.
    idempotent: bool,
}

/// The fast path's parts.
pub struct FastPath {
    router: std::sync::Arc<Router>,
    revocation: std::sync::Arc<Revocation>,
    assertions: std::sync::Arc<AssertionService>,
    metrics: Metrics,
    /// Reports refused uses of superseded certificates (HTTP/2 side).
    reporter: Reporter,
    strip: StripPolicy,
    connector: TransportConnector,
    pool: UpstreamPool,
    /// Serve HTTP/1.1 requests (`listener.http1_fast_path`).
    pub http1: bool,
    /// Serve HTTP/2 connections (`listener.http2_fast_path`).
    pub http2: bool,
    served: prometheus::IntCounter,
    declined: prometheus::IntCounter,
    /// Per route (by index): its upstream latency and its 200 counter,
    /// resolved once (a labelled lookup hashes the labels every time).
    per_route: Vec<(prometheus::Histogram, prometheus::IntCounter)>,
}

impl FastPath {
    /// The fast path over the proxy's own parts; `connector` makes new
    /// upstream connections (pingora's, with the server's options). It
    /// serves both protocols until [`FastPath::protocols`] says otherwise.
    pub fn new(
        router: std::sync::Arc<Router>,
        revocation: std::sync::Arc<Revocation>,
        assertions: std::sync::Arc<AssertionService>,
        metrics: Metrics,
        reporter: Reporter,
        strip: StripPolicy,
        connector: TransportConnector,
    ) -> Self {
        // Indexed by the route's position in the configuration (the
        // router keeps them longest prefix first).
        let mut routes: Vec<_> = router.routes().to_vec();
        routes.sort_by_key(|r| r.index);
        let per_route = routes
            .iter()
            .map(|r| {
                (
                    metrics
                        .upstream_latency
                        .with_label_values(&[r.prefix.as_str()]),
                    metrics
                        .requests
                        .with_label_values(&[r.prefix.as_str(), "200"]),
                )
            })
            .collect();
        Self {
            per_route,
            served: metrics.fast_path.with_label_values(&["served"]),
            declined: metrics.fast_path.with_label_values(&["declined"]),
            router,
            revocation,
            assertions,
            metrics,
            reporter,
            strip,
            connector,
            pool: UpstreamPool::default(),
            http1: true,
            http2: true,
        }
    }

    /// Which protocols it serves (the rest go to pingora's path).
    pub fn protocols(mut self, http1: bool, http2: bool) -> Self {
        self.http1 = http1;
        self.http2 = http2;
        self
    }

    /// Serves the request whose head (and what followed it) is `head`, on
    /// `client`, a connection with the verified identity `conn` from
    /// `forwarding`'s address. `closing`: the service is stopping, so the
    /// connection closes after the answer.
    pub async fn serve(
        &self,
        client: &mut Stream,
        head: BytesMut,
        conn: &ConnIdentity,
        forwarding: &Forwarding,
        closing: bool,
    ) -> Served {
        // The parsed head (and its header table) is dropped before the
        // first await: it never enlarges the request's future.
        let Some(Taken {
            route,
            backend,
            mut out,
            head_len,
            length,
            client_close,
            head_request,
            idempotent,
        }) = self.prepare(&head, conn, forwarding)
        else {
            self.declined.inc();
            return Served::Declined(head);
        };
        match self.revocation.check(conn).await {
            Decision::Allow => self.served.inc(),
            _ => {
                self.declined.inc();
                return Served::Declined(head);
            }
        }
        let body_here = (head.len() - head_len).min(length as usize);
        out.extend_from_slice(&head[head_len..head_len + body_here]);
        let pipelined = head.len() > head_len + body_here;
        let rest = length - body_here as u64;
        drop(head);

        let keep_alive = !client_close && !pipelined && !closing;
        let key: PoolKey = (route.index, backend.addr.clone());
        let outgoing = Outgoing {
            out: &out,
            rest,
            route: &route,
            head_request,
            keep_alive,
        };
        let sent = Instant::now();
        let mut retried = false;
        let (mut upstream, buf, resp, to_client) = loop {
            let (stream, reused) = match self.pool.take(&key) {
                Some(s) => (s, true),
                // Boxed: a new connection's state (TLS included) is rare
                // and large; inline it would be copied into every request.
                None => match Box::pin(self.connect(&route, &backend)).await {
                    Ok(s) => (s, false),
                    Err(kind) => return Served::Failed(kind),
                },
            };
            match outgoing.exchange(client, stream).await {
                Attempt::Answered(s, b, r, i) => break (s, b, r, i),
                // Only an idempotent request wholly in hand goes again.
                Attempt::Stale if reused && idempotent && rest == 0 && !retried => {
                    retried = true;
                }
                Attempt::Stale => return Served::Failed(problem::BAD_GATEWAY),
                Attempt::Failed(kind) => return Served::Failed(kind),
                Attempt::Aborted => return Served::Aborted,
            }
        };
        self.observe_upstream(&route, sent);
        let relayed = relay_body(client, &mut upstream, buf, to_client, resp.framing, &route).await;
        self.count(&route, resp.status);
        match relayed {
            Ok(clean) => {
                if clean && resp.reusable {
                    self.pool.put(key, upstream);
                }
                Served::Done { keep_alive }
            }
            Err(()) => Served::Aborted,
        }
    }

    /// Observes a request's upstream latency (from `sent` to its answer's
    /// head) for its route.
    fn observe_upstream(&self, route: &Route, sent: Instant) {
        let secs = sent.elapsed().as_secs_f64();
        // Route indices are 0..n in configuration order (server::build).
        match self.per_route.get(route.index as usize) {
            Some((latency, _)) => latency.observe(secs),
            None => self
                .metrics
                .upstream_latency
                .with_label_values(&[route.prefix.as_str()])
                .observe(secs),
        }
    }

    /// Counts a request's answer by route and status.
    fn count(&self, route: &Route, status: u16) {
        match self.per_route.get(route.index as usize) {
            Some((_, ok)) if status == 200 => ok.inc(),
            _ => self.count_status(&route.prefix, status),
        }
    }

    /// Counts an answer by route label and status (the labelled lookup).
    fn count_status(&self, route: &str, status: u16) {
        let status = http::StatusCode::from_u16(status).ok();
        let status = status.as_ref().map_or("0", |s| s.as_str());
        self.metrics
            .requests
            .with_label_values(&[route, status])
            .inc();
    }

    /// The route, backend and upstream head for a head the fast path takes.
    fn prepare(&self, head: &[u8], conn: &ConnIdentity, forwarding: &Forwarding) -> Option<Taken> {
        let req = parse_request(head).ok()?;
        let route = self.router.route(req.path())?;
        if !route.require_identity || req.content_length > route.max_body_bytes {
            return None;
        }
        let backend = route.pool.select(b"", 256)?;
        let mut out =
            Vec::with_capacity(req.head_len + 1024 + req.content_length.min(8192) as usize);
        let assertion = conn.assertion(&self.assertions, route, crate::proxy::unix_now());
        write_upstream_head(
            &mut out,
            &req,
            self.strip,
            forwarding,
            conn.headers(),
            &assertion,
        );
        Some(Taken {
            route: route.clone(),
            backend,
            out,
            head_len: req.head_len,
            length: req.content_length,
            client_close: req.close,
            head_request: req.method == "HEAD",
            idempotent: matches!(
                req.method,
                "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
            ),
        })
    }

    async fn connect(&self, route: &Route, backend: &Backend) -> Result<Stream, ProblemKind> {
        let peer = route.peer(backend.clone());
        self.connector.new_stream(&peer).await.map_err(|e| {
            tracing::warn!(error = %e, route = %route.prefix, "upstream connection failed");
            match e.etype() {
                pingora::ErrorType::ConnectTimedout => problem::GATEWAY_TIMEOUT,
                _ => problem::BAD_GATEWAY,
            }
        })
    }
}

/// A request ready to go to an upstream, and how its answer is rewritten.
#[derive(Clone, Copy)]
struct Outgoing<'a> {
    /// The upstream head and the body bytes already read.
    out: &'a [u8],
    /// Body bytes still to come from the client.
    rest: u64,
    route: &'a Route,
    head_request: bool,
    /// The gateway's `Connection` to the client.
    keep_alive: bool,
}

impl Outgoing<'_> {
    /// Sends the request (`out`, then `rest` more body bytes from the
    /// client), reads the final response head and rewrites it (and any
    /// informational ones) for the client, with `keep_alive` as the
    /// gateway's `Connection`.
    async fn exchange(&self, client: &mut Stream, mut upstream: Stream) -> Attempt {
        let Outgoing {
            out,
            rest,
            route,
            head_request,
            keep_alive,
        } = *self;
        let limit = route.timeout;
        if let Err(e) = timed(limit, upstream.write_all(out)).await {
            return Attempt::unsent(e);
        }
        if rest > 0 {
            match copy_exact(client, &mut upstream, rest, limit).await {
                Ok(()) => {}
                Err(Side::Client) => return Attempt::Aborted,
                Err(Side::Upstream(e)) => return Attempt::Failed(upstream_problem(e)),
            }
        }
        if let Err(e) = timed(limit, upstream.flush()).await {
            return Attempt::unsent(e);
        }
        let mut to_client = Vec::new();
        let read = read_final_head(&mut upstream, route, head_request, |h, facts, buffered| {
            let rechunk = facts.framing == Framing::UntilClose;
            // Room for the rewritten head and the body bytes read with it,
            // which the relay appends: one allocation.
            to_client.reserve(buffered + 128);
            h.write_for_client(&mut to_client, keep_alive, rechunk);
        })
        .await;
        match read {
            Ok((buf, r)) => Attempt::Answered(upstream, buf, r, to_client),
            Err(NoHead::Stale) => Attempt::Stale,
            Err(NoHead::Failed(kind)) => Attempt::Failed(kind),
        }
    }
}

/// Why no final response head arrived.
pub(crate) enum NoHead {
    /// A reused connection failed before any response byte.
    Stale,
    Failed(ProblemKind),
}

/// Reads `upstream`'s response heads up to the final one, handing each
/// (informational ones first, as a proxy relays them: RFC 9110 §15.2) to
/// `on_head` with its facts and how many bytes are buffered. Returns the
/// bytes read past the final head and its facts.
pub(crate) async fn read_final_head(
    upstream: &mut Stream,
    route: &Route,
    head_request: bool,
    mut on_head: impl FnMut(&ResponseHead<'_>, &Response, usize),
) -> Result<(BytesMut, Response), NoHead> {
    let limit = route.timeout;
    let mut buf = BytesMut::with_capacity(8192);
    let mut informational = 0;
    loop {
        let buffered = buf.len();
        let parsed = parse_head(&buf).and_then(|head| {
            head.map(|h| {
                let facts = h.facts(head_request)?;
                on_head(&h, &facts, buffered);
                Ok(facts)
            })
            .transpose()
        });
        match parsed {
            Ok(Some(r)) if (100..200).contains(&r.status) => {
                informational += 1;
                if informational > MAX_INFORMATIONAL {
                    return Err(NoHead::Failed(problem::BAD_GATEWAY));
                }
                buf.advance(r.head_len);
                continue;
            }
            Ok(Some(r)) => {
                buf.advance(r.head_len);
                return Ok((buf, r));
            }
            Ok(None) => {}
            Err(why) => {
                tracing::warn!(?why, route = %route.prefix, "upstream response refused");
                return Err(NoHead::Failed(problem::BAD_GATEWAY));
            }
        }
        if buf.len() > MAX_RESPONSE_HEAD {
            return Err(NoHead::Failed(problem::BAD_GATEWAY));
        }
        match timed(limit, upstream.read_buf(&mut buf)).await {
            Ok(0) | Err(Io::Failed) if buf.is_empty() && informational == 0 => {
                return Err(NoHead::Stale)
            }
            Ok(0) | Err(Io::Failed) => return Err(NoHead::Failed(problem::BAD_GATEWAY)),
            Err(Io::Timeout) => return Err(NoHead::Failed(problem::GATEWAY_TIMEOUT)),
            Ok(_) => {}
        }
    }
}

/// Which side of a copy failed.
enum Side {
    Client,
    Upstream(Io),
}

/// Copies exactly `n` request body bytes from the client to the upstream.
async fn copy_exact(
    client: &mut Stream,
    upstream: &mut Stream,
    mut n: u64,
    limit: Duration,
) -> Result<(), Side> {
    let mut buf = BytesMut::with_capacity(n.min(16 * 1024) as usize);
    while n > 0 {
        buf.clear();
        let want = n.min(16 * 1024) as usize;
        buf.reserve(want);
        let got = match timed(limit, (&mut *client).take(want as u64).read_buf(&mut buf)).await {
            Ok(0) | Err(_) => return Err(Side::Client),
            Ok(got) => got,
        };
        timed(limit, upstream.write_all(&buf[..got]))
            .await
            .map_err(Side::Upstream)?;
        n -= got as u64;
    }
    Ok(())
}

/// Where a response body ends in the bytes relayed after its head, by its
/// framing: the one reading of both relays (HTTP/1.1 and HTTP/2).
pub(crate) struct BodyCursor {
    framing: Framing,
    /// Bytes still to come of a `Content-Length` body.
    left: u64,
    chunks: ChunkedScan,
}

impl BodyCursor {
    pub(crate) fn new(framing: Framing) -> Self {
        let left = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        Self {
            framing,
            left,
            chunks: ChunkedScan::default(),
        }
    }

    /// Of `buf`, the next bytes read: how many belong to the body and
    /// whether it ended with them. `data` is told, in order, the runs of
    /// body content among them (all of them, less a chunked body's framing).
    pub(crate) fn next(
        &mut self,
        buf: &[u8],
        mut data: impl FnMut(std::ops::Range<usize>),
    ) -> Result<(usize, bool), BadChunk> {
        match self.framing {
            Framing::Empty => Ok((0, true)),
            Framing::Length(_) => {
                let take = (buf.len() as u64).min(self.left) as usize;
                self.left -= take as u64;
                if take > 0 {
                    data(0..take);
                }
                Ok((take, self.left == 0))
            }
            Framing::Chunked => Ok(match self.chunks.feed_with(buf, data)? {
                Some(end) => (end, true),
                None => (buf.len(), false),
            }),
            Framing::UntilClose => {
                if !buf.is_empty() {
                    data(0..buf.len());
                }
                Ok((buf.len(), false))
            }
        }
    }
}

/// Relays the response body after its head (`to_client` holds the head
/// rewritten for the client; `buf` what was read past the upstream's
/// head). A body until close goes to the client chunked. `Ok(true)`: relayed whole and the upstream sent nothing more (its
/// connection may be reused); `Ok(false)`: relayed whole, upstream not
/// reusable; `Err`: cut.
async fn relay_body(
    client: &mut Stream,
    upstream: &mut Stream,
    mut buf: BytesMut,
    mut to_client: Vec<u8>,
    framing: Framing,
    route: &Route,
) -> Result<bool, ()> {
    let limit = route.timeout;
    let mut body = BodyCursor::new(framing);
    loop {
        // What of `buf` belongs to the body, and whether the body ended.
        let Ok((take, done)) = body.next(&buf, |_| {}) else {
            tracing::warn!(route = %route.prefix, "upstream chunked body refused");
            return Err(());
        };
        if framing == Framing::UntilClose {
            if take > 0 {
                // Writing to a Vec cannot fail.
                let _ = write!(to_client, "{take:x}\r\n");
                to_client.extend_from_slice(&buf[..take]);
                to_client.extend_from_slice(b"\r\n");
            }
        } else {
            to_client.extend_from_slice(&buf[..take]);
        }
        let extra = buf.len() > take;
        if !to_client.is_empty() {
            timed(limit, client.write_all(&to_client))
                .await
                .map_err(|_| ())?;
            to_client.clear();
        }
        if done {
            timed(limit, client.flush()).await.map_err(|_| ())?;
            return Ok(!extra);
        }
        buf.clear();
        match timed(limit, upstream.read_buf(&mut buf)).await {
            Ok(0) if framing == Framing::UntilClose => {
                timed(limit, client.write_all(b"0\r\n\r\n"))
                    .await
                    .map_err(|_| ())?;
                timed(limit, client.flush()).await.map_err(|_| ())?;
                return Ok(false);
            }
            Ok(0) | Err(_) => return Err(()),
            Ok(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(raw: &str) -> Request<'_> {
        parse_request(raw.as_bytes()).unwrap_or_else(|d| panic!("{d:?}: {raw:?}"))
    }

    #[test]
    fn every_target_taken_is_one_the_http_crate_reads_the_same_way() {
        for b in 0u8..=255 {
            for target in [format!("/p{}q", b as char), format!("/p?q{}r", b as char)] {
                let raw = format!("GET {target} HTTP/1.1\r\nHost: a\r\n\r\n");
                if let Ok(req) = parse_request(raw.as_bytes()) {
                    let uri: http::Uri = req.target.parse().expect("taken: a URI");
                    assert_eq!(uri.path(), req.path(), "{target:?}");
                    assert_eq!(uri.path_and_query().map(|p| p.as_str()), Some(req.target));
                }
            }
        }
        assert!(plain_origin_form("/a/b-c_d.e~f!$&'()*+,;=:@%20?x=1&y=/?"));
    }

    #[test]
    fn the_common_request_is_taken_with_its_facts() {
        let raw = "POST /api/x?y=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: Keep-Alive\r\n\r\nabcGET";
        let r = taken(raw);
        assert_eq!(
            (r.method, r.target, r.path()),
            ("POST", "/api/x?y=1", "/api/x")
        );
        assert_eq!(r.content_length, 3);
        assert_eq!(&raw[r.head_len..], "abcGET");
        assert!(!r.close);
        assert!(taken("GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n").close);
        assert_eq!(taken("GET / HTTP/1.1\r\nHost: a\r\n\r\n").content_length, 0);
    }

    #[test]
    fn everything_else_is_left_to_pingora() {
        let declined = [
            // framing, tunnels, interim responses, trailers
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", Decline::Header),
            ("POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\nContent-Length: 3\r\n\r\n", Decline::Header),
            ("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", Decline::Header),
            ("GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n\r\n", Decline::Header),
            ("GET / HTTP/1.1\r\nHost: a\r\nConnection: x-forwarded-for\r\n\r\n", Decline::Header),
            ("GET / HTTP/1.1\r\nHost: a\r\nConnection: close, host\r\n\r\n", Decline::Header),
            ("POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n", Decline::Header),
            ("GET / HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n", Decline::Header),
            ("GET / HTTP/1.1\r\nHost: a\r\nHTTP2-Settings: AAA\r\n\r\n", Decline::Header),
            // Host and Content-Length: missing, repeated, malformed
            ("GET / HTTP/1.1\r\n\r\n", Decline::Header),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", Decline::Header),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", Decline::Header),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\n", Decline::Header),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n", Decline::Header),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n", Decline::Header),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", Decline::Header),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\n\r\n", Decline::Header),
            // request line
            ("GET / HTTP/1.0\r\nHost: a\r\n\r\n", Decline::RequestLine),
            ("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", Decline::RequestLine),
            ("GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", Decline::RequestLine),
            ("OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", Decline::RequestLine),
            ("GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n", Decline::RequestLine),
            // Found by the fuzz target: `http` (pingora's URI type) refuses it.
            ("GET /ap`i/=1 HTTP/1.1\r\nHost: a\r\n\r\n", Decline::RequestLine),
            // what the strict parser does not take whole
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", Decline::Parse),
            ("GET / HTTP/1.1\r\nHost : a\r\n\r\n", Decline::Parse),
            ("GET / HTTP/1.1\r\nHost: a\r\nX\r\n\r\n", Decline::Parse),
            ("GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n", Decline::Parse),
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n", Decline::Parse),
            ("GET  / HTTP/1.1\r\nHost: a\r\n\r\n", Decline::Parse),
            ("GET / HTTP/1.1\r\nHost: a\r\n", Decline::Parse),
        ];
        for (raw, why) in declined {
            assert_eq!(parse_request(raw.as_bytes()).err(), Some(why), "{raw:?}");
        }
        let mut many = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        for i in 0..MAX_HEADERS {
            many.push_str(&format!("X-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(parse_request(many.as_bytes()).err(), Some(Decline::Parse));
    }

    fn rewrite(raw: &str, strip: StripPolicy) -> String {
        let req = taken(raw);
        let fwd = Forwarding::new("192.0.2.9".parse().unwrap());
        let ids = [(
            oneprotect_identity::headers::TENANT_ID,
            http::HeaderValue::from_static("t-1"),
        )];
        let mut out = Vec::new();
        let assertion = http::HeaderValue::from_static("a.b.c");
        write_upstream_head(&mut out, &req, strip, &fwd, &ids, &assertion);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_upstream_head_drops_spoofs_and_hop_by_hop_and_appends_the_identity() {
        let raw = "GET /api/x?q HTTP/1.1\r\nHost: a\r\nX-OneProtect-Tenant-Id: spoof\r\nx_oneprotect_agent_id: spoof\r\nX-Forwarded-For: 1.2.3.4\r\nForwarded: for=1.2.3.4\r\nX-Real-IP: 1.2.3.4\r\nClient-Cert: :x:\r\nX-Forwarded-Client-Cert: By=x\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nX-Custom: One\r\nx_custom: under\r\nAccept: */*\r\nx-custom: two\r\n\r\n";
        assert_eq!(
            rewrite(raw, StripPolicy::default()),
            "GET /api/x?q HTTP/1.1\r\nHost: a\r\nX-Custom: One\r\nAccept: */*\r\nx-custom: two\r\n\
             x-forwarded-for: 192.0.2.9\r\nx-real-ip: 192.0.2.9\r\nforwarded: for=192.0.2.9\r\n\
             x-oneprotect-tenant-id: t-1\r\nx-oneprotect-identity-assertion: a.b.c\r\n\r\n"
        );
        let allow = StripPolicy {
            drop_underscored: false,
        };
        let out = rewrite(raw, allow);
        assert!(out.contains("\r\nx_custom: under\r\n"), "{out}");
        assert!(!out.contains("spoof"), "{out}");
        // What the gateway wrote parses back whole.
        let mut h = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut h);
        assert!(matches!(
            req.parse(out.as_bytes()),
            Ok(httparse::Status::Complete(n)) if n == out.len()
        ));
    }

    fn resp(raw: &str, head: bool) -> Result<Option<Response>, BadResponse> {
        parse_head(raw.as_bytes())?
            .map(|h| h.facts(head))
            .transpose()
    }

    fn write_client_head(out: &mut Vec<u8>, raw: &[u8], keep_alive: bool, rechunk: bool) {
        let head = parse_head(raw).unwrap().unwrap();
        assert_eq!(head.len, raw.len());
        head.write_for_client(out, keep_alive, rechunk);
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let f = |raw: &str, head: bool| resp(raw, head).unwrap().unwrap().framing;
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false),
            Framing::Length(5)
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true),
            Framing::Empty
        );
        assert_eq!(f("HTTP/1.1 204 No Content\r\n\r\n", false), Framing::Empty);
        assert_eq!(
            f(
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                false
            ),
            Framing::Empty
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n",
                false
            ),
            Framing::Chunked
        );
        assert_eq!(
            f(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                false
            ),
            Framing::UntilClose
        );
        assert_eq!(f("HTTP/1.1 200 OK\r\n\r\n", false), Framing::UntilClose);
        assert_eq!(f("HTTP/1.1 100 Continue\r\n\r\n", false), Framing::Empty);
        // Reuse: not after close, HTTP/1.0 without keep-alive, or until close.
        let reusable = |raw: &str| resp(raw, false).unwrap().unwrap().reusable;
        assert!(reusable("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(!reusable(
            "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ));
        assert!(!reusable("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"));
        assert!(reusable(
            "HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n"
        ));
        assert!(!reusable("HTTP/1.1 200 OK\r\n\r\n"));
        // Refused.
        for (raw, why) in [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
                BadResponse::Framing,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                BadResponse::Framing,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                BadResponse::Framing,
            ),
            (
                "HTTP/1.1 101 Switching Protocols\r\n\r\n",
                BadResponse::UnexpectedUpgrade,
            ),
            ("HTTP/1.1 2000 OK\r\n\r\n", BadResponse::Malformed),
            ("SMTP ready\r\n\r\n", BadResponse::Malformed),
        ] {
            assert_eq!(resp(raw, false).err(), Some(why), "{raw:?}");
        }
        assert!(resp("HTTP/1.1 200 OK\r\nContent-Le", false)
            .unwrap()
            .is_none());
    }

    #[test]
    fn the_client_head_replaces_connection_and_adds_a_missing_date() {
        let mut out = Vec::new();
        let raw = b"HTTP/1.1 201 Made It\r\nConnection: close\r\nKeep-Alive: timeout=1\r\nX-A: 1\r\nDate: Mon, 07 Dec 2026 12:00:00 GMT\r\n\r\n";
        write_client_head(&mut out, raw, true, false);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 201 Made It\r\nX-A: 1\r\nDate: Mon, 07 Dec 2026 12:00:00 GMT\r\nConnection: keep-alive\r\n\r\n"
        );
        let mut out = Vec::new();
        write_client_head(&mut out, b"HTTP/1.0 404 \r\n\r\n", false, true);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 \r\nDate: "), "{text}");
        assert!(
            text.ends_with("GMT\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"),
            "{text}"
        );
    }

    /// Feeds `body` in pieces cut at every place; returns where it ended.
    fn chunked_end(body: &[u8]) -> Result<Option<usize>, BadChunk> {
        let whole = ChunkedScan::default().feed(body);
        for cut in 0..=body.len() {
            let mut scan = ChunkedScan::default();
            let got = match scan.feed(&body[..cut]) {
                Ok(Some(end)) => Ok(Some(end)),
                Ok(None) => scan.feed(&body[cut..]).map(|e| e.map(|e| e + cut)),
                Err(e) => Err(e),
            };
            assert_eq!(
                got,
                whole,
                "cut at {cut} of {:?}",
                String::from_utf8_lossy(body)
            );
        }
        whole
    }

    #[test]
    fn chunked_bodies_end_where_rfc_9112_says_in_any_pieces() {
        let b = b"5\r\nhello\r\n0\r\n\r\nNEXT";
        assert_eq!(chunked_end(b), Ok(Some(b.len() - 4)));
        let b = b"A;ext=\"v\"\r\n0123456789\r\n0;x\r\nTrailer: v\r\nOther: w\r\n\r\n";
        assert_eq!(chunked_end(b), Ok(Some(b.len())));
        assert_eq!(chunked_end(b"5\r\nhel"), Ok(None));
        assert_eq!(chunked_end(b"0\r\n\r"), Ok(None));
        for bad in [
            &b"5\nhello\r\n0\r\n\r\n"[..],
            b"5\r\nhelloX\r\n",
            b"\r\n",
            b"-5\r\n",
            b"5 \r\nhello\r\n",
            b"1000000000000000\r\n",
            b"0\r\nTrailer\n\r\n",
            b"0\r\n\n",
            b"1;\x01\r\n",
        ] {
            assert_eq!(
                chunked_end(bad),
                Err(BadChunk),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // A body that ended stays ended.
        let mut scan = ChunkedScan::default();
        assert_eq!(scan.feed(b"0\r\n\r\n"), Ok(Some(5)));
        assert_eq!(scan.feed(b"more"), Ok(Some(0)));
    }
}
