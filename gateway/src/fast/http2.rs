//! The HTTP/2 side of the fast path (ADR-0028): an HTTP/2 connection with a
//! verified client certificate is served here whole, every stream, instead
//! of by pingora's HTTP/2 loop and its per-stream task and proxy session.
//!
//! pingora cannot take one HTTP/2 stream back once the gateway has framed
//! the connection, so unlike the HTTP/1.1 fast path this one never
//! declines: it answers every request itself, refusals included, with the
//! same problem+json answers, metrics and audit reports as pingora's path
//! (`crate::proxy`). One task drives the connection and its streams (no
//! task per stream): the `h2` crate frames it, with at most
//! [`MAX_STREAMS`] concurrent streams and the listener's header-size
//! limit as the decoded header-list limit; the client's preface must arrive
//! within the idle timeout, and a connection with no stream open for the
//! idle timeout is closed (so is one whose HEADERS never complete).
//!
//! Per stream: the route by path; `CONNECT` refused (`upgrade_not_allowed`;
//! the `h2` crate already refuses every connection-specific header and
//! extended CONNECT is not enabled); on a route that requires identity the
//! per-request revocation check, whose refusals answer as pingora's path
//! does; a `content-length` over the route's limit 413 (a body without one
//! is counted as it arrives, 413 past the limit); then the request goes to
//! the upstream as HTTP/1.1 over the fast path's keep-alive pool: the
//! request line from `:method` and `:path`, `Host` from `:authority` (or the
//! `host` header), the client's headers less those the [`StripPolicy`]
//! removes, `te` and `expect` (the gateway has read the body already),
//! `cookie` fields joined with `; ` (RFC 9113 §8.2.3), then the gateway's
//! forwarding headers, identity headers and signed assertion — the header
//! set of both other paths. A body without `content-length` goes chunked.
//! The response head is parsed as on the HTTP/1.1 fast path, informational
//! heads sent as such, hop-by-hop and connection-specific fields dropped, a
//! `date` added when missing; the body is relayed by its framing (chunked
//! decoded, checked by [`ChunkedScan`]) within the client's flow-control
//! window. A failure before the response answers 502/504 on the stream; a
//! failure after it resets the stream.

use std::future::poll_fn;
use std::io::Write as _;
use std::pin::pin;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::header::{self, HeaderName, HeaderValue};
use http::request::Parts;
use oneprotect_identity::problem::{Problem, CONTENT_TYPE};
use pingora::server::ShutdownWatch;

use super::*;

/// Concurrent streams per connection (pingora's default for its own loop).
pub(crate) const MAX_STREAMS: u32 = 100;

/// Bytes of response body the `h2` crate may buffer per stream beyond the
/// client's window before the relay waits for it.
const SEND_BUFFER: usize = 64 * 1024;

/// How an HTTP/2 connection the fast path served ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client closed it, or it ended after a shutdown's GOAWAY.
    Closed,
    /// No preface, or no stream open, for the idle timeout.
    Idle,
    /// A connection-level protocol error (the `h2` crate sent GOAWAY).
    Error,
}

/// A request's answer when it is not proxied: a problem, its detail and
/// `Retry-After`.
struct Refusal {
    kind: ProblemKind,
    detail: Option<&'static str>,
    retry_after: Option<u64>,
}

impl From<ProblemKind> for Refusal {
    fn from(kind: ProblemKind) -> Self {
        Refusal {
            kind,
            detail: None,
            retry_after: None,
        }
    }
}

/// Request headers not sent on to the upstream beyond those the strip
/// policy removes: `host` (written from `:authority`), `te` (HTTP/2 allows
/// only `trailers`, which the HTTP/1.1 request does not carry), `expect`
/// (the gateway reads the body itself), `cookie` (joined into one), and
/// the framing the gateway writes itself.
const NOT_FORWARDED: [&str; 6] = [
    "host",
    "te",
    "expect",
    "cookie",
    "content-length",
    "transfer-encoding",
];

/// Response fields that HTTP/2 forbids (RFC 9113 §8.2.2). A
/// `content-length` stays: [`ResponseHead::facts`] took it as the framing
/// (one, valid, never with `transfer-encoding`), or it answers a `HEAD`.
const NOT_RETURNED: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
];

/// The upstream request head for an HTTP/2 request: request line, `Host`,
/// the client's headers less those stripped, and the gateway's forwarding
/// headers, then (when `identity` is given) the identity headers and the
/// assertion. `length`: the body's `Content-Length`, `None` for a chunked
/// body, `Some(0)` for none. Refuses (400) a request without an authority
/// or whose target cannot go on an HTTP/1.1 request line.
pub(crate) fn write_upstream_head(
    out: &mut Vec<u8>,
    parts: &Parts,
    strip: StripPolicy,
    forwarding: &Forwarding,
    identity: Option<(&[(&'static str, HeaderValue)], &HeaderValue)>,
    length: Option<u64>,
) -> Result<(), &'static str> {
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    if !target.starts_with('/') || target.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        return Err("the request target cannot be sent on");
    }
    let host = match parts.uri.authority() {
        Some(a) => a.as_str().as_bytes(),
        None => {
            let mut hosts = parts.headers.get_all(header::HOST).iter();
            match (hosts.next(), hosts.next()) {
                (Some(h), None) => h.as_bytes(),
                _ => return Err("an HTTP/2 request needs one :authority or Host"),
            }
        }
    };
    if host.is_empty() {
        return Err("an HTTP/2 request needs one :authority or Host");
    }
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    put_header(out, "host", host);
    let mut cookies = parts.headers.get_all(header::COOKIE).iter();
    if let Some(first) = cookies.next() {
        out.extend_from_slice(b"cookie: ");
        out.extend_from_slice(first.as_bytes());
        for c in cookies {
            out.extend_from_slice(b"; ");
            out.extend_from_slice(c.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in &parts.headers {
        let name = name.as_str();
        if strip.removes(name) || NOT_FORWARDED.contains(&name) {
            continue;
        }
        put_header(out, name, value.as_bytes());
    }
    match length {
        Some(0) => {}
        Some(n) => {
            // Writing to a Vec cannot fail.
            let _ = write!(out, "content-length: {n}\r\n");
        }
        None => put_header(out, "transfer-encoding", b"chunked"),
    }
    write_gateway_headers(out, forwarding, identity);
    Ok(())
}

/// The client's response head for an upstream head: its status, its
/// fields less those HTTP/2 forbids, a `date` when it sent none (not on
/// informational heads).
pub(crate) fn response_for_client(
    head: &ResponseHead<'_>,
) -> Result<http::Response<()>, BadResponse> {
    let mut resp = http::Response::new(());
    *resp.status_mut() =
        http::StatusCode::from_u16(head.code).map_err(|_| BadResponse::Malformed)?;
    let headers = resp.headers_mut();
    let mut dated = false;
    for h in head.headers() {
        if is_any(h.name, &NOT_RETURNED) {
            continue;
        }
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| BadResponse::Malformed)?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| BadResponse::Malformed)?;
        dated |= name == header::DATE;
        headers.append(name, value);
    }
    if head.informational() {
        return Ok(resp);
    }
    if !dated {
        headers.insert(
            header::DATE,
            pingora::protocols::http::date::get_cached_date(),
        );
    }
    Ok(resp)
}

/// Sends `data` on `send` as the client's flow-control window allows,
/// ending the stream after it when `end`.
async fn send_all(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
    limit: Duration,
) -> Result<(), ()> {
    if data.is_empty() {
        return if end {
            send.send_data(data, true).map_err(|_| ())
        } else {
            Ok(())
        };
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len().min(SEND_BUFFER));
        let mut room = send.capacity();
        if room == 0 {
            room = match pingora_timeout::timeout(limit, poll_fn(|cx| send.poll_capacity(cx))).await
            {
                Ok(Some(Ok(n))) => n,
                _ => return Err(()),
            };
        }
        let chunk = data.split_to(room.min(data.len()));
        send.send_data(chunk, end && data.is_empty())
            .map_err(|_| ())?;
    }
    Ok(())
}

/// The body bytes of `buf` for the client, by the response's framing.
enum Part {
    /// Body bytes, and whether the body ended with them (`extra`: bytes
    /// followed it, so the upstream connection is not reused).
    Data {
        data: Bytes,
        done: bool,
        extra: bool,
    },
    Bad,
}

/// Takes the body bytes out of `buf` (emptied), decoded.
fn body_part(buf: &mut BytesMut, body: &mut BodyCursor) -> Part {
    // One run (a length body, a chunk read whole) is a slice of `buf`, not
    // a copy; `more` allocates only for several chunks in one read.
    let mut first: Option<std::ops::Range<usize>> = None;
    let mut more: Vec<std::ops::Range<usize>> = Vec::new();
    let Ok((take, done)) = body.next(buf, |r| match first {
        None => first = Some(r),
        Some(_) => more.push(r),
    }) else {
        return Part::Bad;
    };
    let whole = buf.split().freeze();
    let data = match (first, more.is_empty()) {
        (None, _) => Bytes::new(),
        (Some(r), true) => whole.slice(r),
        (Some(r), false) => {
            let mut joined =
                BytesMut::with_capacity(r.len() + more.iter().map(|m| m.len()).sum::<usize>());
            for r in std::iter::once(r).chain(more) {
                joined.extend_from_slice(&whole[r]);
            }
            joined.freeze()
        }
    };
    Part::Data {
        data,
        done,
        extra: take < whole.len(),
    }
}

/// Relays the response body (`buf`: what was read past the head) to the
/// client's stream. `Ok(true)`: whole, the upstream connection reusable;
/// `Ok(false)`: whole, not reusable; `Err`: cut.
async fn relay_body(
    send: &mut SendStream<Bytes>,
    upstream: &mut Stream,
    mut buf: BytesMut,
    framing: Framing,
    route: &Route,
) -> Result<bool, ()> {
    let limit = route.timeout;
    let mut body = BodyCursor::new(framing);
    loop {
        let (data, done, extra) = match body_part(&mut buf, &mut body) {
            Part::Data { data, done, extra } => (data, done, extra),
            Part::Bad => {
                tracing::warn!(route = %route.prefix, "upstream chunked body refused");
                return Err(());
            }
        };
        send_all(send, data, done, limit).await?;
        if done {
            return Ok(!extra);
        }
        buf.reserve(16 * 1024);
        match timed(limit, upstream.read_buf(&mut buf)).await {
            Ok(0) if framing == Framing::UntilClose => {
                send_all(send, Bytes::new(), true, limit).await?;
                return Ok(false);
            }
            Ok(0) | Err(_) => return Err(()),
            Ok(_) => {}
        }
    }
}

/// Writes one piece of a request body to the upstream (chunked when there
/// is no `Content-Length`).
fn frame_body(out: &mut Vec<u8>, data: &[u8], chunked: bool) {
    if chunked {
        if data.is_empty() {
            return;
        }
        let _ = write!(out, "{:x}\r\n", data.len());
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(data);
    }
}

/// The next piece of a client's request body, its flow-control window
/// released: `Ok(None)` at its end.
async fn next_body(body: &mut RecvStream, limit: Duration) -> Result<Option<Bytes>, ()> {
    match pingora_timeout::timeout(limit, body.data()).await {
        Ok(Some(Ok(data))) => {
            let _ = body.flow_control().release_capacity(data.len());
            Ok(Some(data))
        }
        Ok(None) => Ok(None),
        _ => Err(()),
    }
}

/// An upstream's answer to a stream, its head in.
struct Answer {
    upstream: Stream,
    /// What was read past the head.
    buf: BytesMut,
    resp: Response,
    /// The client's head.
    head: http::Response<()>,
    /// Informational heads to send before it.
    informational: Vec<http::Response<()>>,
    key: PoolKey,
}

/// A request ready to go upstream.
struct Sending<'a> {
    route: &'a Route,
    /// The head, with the body's first piece when it had one.
    out: Vec<u8>,
    /// The client's body, when more of it may come.
    body: Option<&'a mut RecvStream>,
    chunked: bool,
    /// Body bytes so far (the route's limit holds for the whole).
    counted: u64,
}

/// How sending a request and reading its answer's head went.
enum Exchanged {
    /// The connection, what was read past the head, its facts, and the
    /// client's head.
    Answered(Stream, BytesMut, Response, http::Response<()>),
    Stale,
    Refused(Refusal),
    /// The client went away (or stalled) mid-body: reset the stream.
    Cut,
}

impl Sending<'_> {
    async fn exchange(
        &mut self,
        mut upstream: Stream,
        head_request: bool,
        informational: &mut Vec<http::Response<()>>,
    ) -> Exchanged {
        let limit = self.route.timeout;
        if let Err(e) = timed(limit, upstream.write_all(&self.out)).await {
            return match e {
                Io::Failed => Exchanged::Stale,
                Io::Timeout => Exchanged::Refused(problem::GATEWAY_TIMEOUT.into()),
            };
        }
        if let Some(body) = self.body.as_deref_mut() {
            let mut piece = Vec::new();
            loop {
                let data = match next_body(body, limit).await {
                    Ok(Some(data)) => data,
                    Ok(None) => break,
                    Err(()) => return Exchanged::Cut,
                };
                self.counted += data.len() as u64;
                if self.counted > self.route.max_body_bytes {
                    return Exchanged::Refused(problem::PAYLOAD_TOO_LARGE.into());
                }
                piece.clear();
                frame_body(&mut piece, &data, self.chunked);
                if let Err(e) = timed(limit, upstream.write_all(&piece)).await {
                    return Exchanged::Refused(upstream_problem(e).into());
                }
            }
            if self.chunked {
                if let Err(e) = timed(limit, upstream.write_all(b"0\r\n\r\n")).await {
                    return Exchanged::Refused(upstream_problem(e).into());
                }
            }
        }
        if let Err(e) = timed(limit, upstream.flush()).await {
            return Exchanged::Refused(upstream_problem(e).into());
        }
        let mut head = None;
        let read = read_final_head(&mut upstream, self.route, head_request, |h, _, _| {
            if h.informational() {
                if let Ok(r) = response_for_client(h) {
                    informational.push(r);
                }
            } else {
                head = Some(response_for_client(h));
            }
        })
        .await;
        match (read, head) {
            (Ok((buf, r)), Some(Ok(head))) => Exchanged::Answered(upstream, buf, r, head),
            (Ok(_), _) => {
                tracing::warn!(route = %self.route.prefix, "upstream response head refused");
                Exchanged::Refused(problem::BAD_GATEWAY.into())
            }
            (Err(NoHead::Stale), _) => Exchanged::Stale,
            (Err(NoHead::Failed(kind)), _) => Exchanged::Refused(kind.into()),
        }
    }
}

impl FastPath {
    /// Serves an HTTP/2 connection with the verified identity `conn` from
    /// `forwarding`'s address, every stream, until it ends: `idle` bounds
    /// the wait for the preface and the time with no stream open,
    /// `max_header_list` the decoded request headers. On shutdown it sends
    /// GOAWAY and finishes the open streams.
    pub async fn serve_h2(
        &self,
        stream: Stream,
        conn: &ConnIdentity,
        forwarding: &Forwarding,
        idle: Duration,
        max_header_list: u32,
        shutdown: &ShutdownWatch,
    ) -> Ended {
        let mut builder = h2::server::Builder::new();
        builder
            .max_header_list_size(max_header_list)
            .max_concurrent_streams(MAX_STREAMS)
            .max_send_buffer_size(SEND_BUFFER);
        let mut h2c =
            match pingora_timeout::timeout(idle, builder.handshake::<_, Bytes>(stream)).await {
                Ok(Ok(c)) => c,
                Ok(Err(_)) => return Ended::Error,
                Err(_) => return Ended::Idle,
            };
        let mut watch = shutdown.clone();
        // One future for the connection's life: a new `changed()` per turn
        // would register with the watch on every request.
        let mut stopping = pin!(crate::serve::stopping(&mut watch));
        let mut going_away = false;
        let mut streams = FuturesUnordered::new();
        let mut quiet_since = Instant::now();
        let mut idle_timer = pin!(tokio::time::sleep(idle));
        loop {
            tokio::select! {
                accepted = h2c.accept() => match accepted {
                    Some(Ok((req, respond))) => {
                        streams.push(self.stream(req, respond, conn, forwarding));
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "HTTP/2 connection error");
                        return Ended::Error;
                    }
                    None => return Ended::Closed,
                },
                Some(()) = streams.next(), if !streams.is_empty() => {
                    if streams.is_empty() {
                        quiet_since = Instant::now();
                    }
                }
                () = &mut idle_timer, if streams.is_empty() => {
                    let due = quiet_since + idle;
                    if Instant::now() >= due {
                        return Ended::Idle;
                    }
                    idle_timer.as_mut().reset(due.into());
                }
                () = &mut stopping, if !going_away => {
                    going_away = true;
                    h2c.graceful_shutdown();
                }
            }
        }
    }

    /// Serves one stream.
    async fn stream(
        &self,
        req: http::Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
        conn: &ConnIdentity,
        forwarding: &Forwarding,
    ) {
        let (parts, mut body) = req.into_parts();
        let route = match self.router.route(parts.uri.path()) {
            Some(route) => route.clone(),
            None => {
                self.answer(&mut respond, "none", problem::ROUTE_NOT_FOUND.into());
                return;
            }
        };
        // Until the answer's head is in, the work stops as soon as the
        // client resets the stream: a reset stream no longer counts against
        // the concurrent-stream limit, so work left running for it would let
        // a client keep any number of upstream requests going ("rapid
        // reset", CVE-2023-44487).
        let answered = {
            let work = self.proxy_stream(&route, parts, &mut body, conn, forwarding);
            let reset = poll_fn(|cx| respond.poll_reset(cx));
            tokio::select! {
                answered = work => answered,
                _ = reset => {
                    self.metrics.fast_path.with_label_values(&["reset"]).inc();
                    return;
                }
            }
        };
        match answered {
            Ok(a) => self.relay(&route, a, &mut respond).await,
            Err(Some(r)) => self.answer(&mut respond, &route.prefix, r),
            Err(None) => respond.send_reset(Reason::CANCEL),
        }
    }

    /// Checks and proxies a routed stream; `Err(Some)`: answer this
    /// refusal, `Err(None)`: reset the stream (cut mid-way).
    async fn proxy_stream(
        &self,
        route: &std::sync::Arc<Route>,
        parts: Parts,
        body: &mut RecvStream,
        conn: &ConnIdentity,
        forwarding: &Forwarding,
    ) -> Result<Answer, Option<Refusal>> {
        if parts.method == http::Method::CONNECT {
            return Err(Some(Refusal {
                kind: problem::UPGRADE_NOT_ALLOWED,
                detail: Some("CONNECT is not allowed"),
                retry_after: None,
            }));
        }
        let inject = if route.require_identity {
            match self.revocation.check(conn).await {
                Decision::Allow => true,
                Decision::Refuse(kind) => {
                    crate::proxy::refused(
                        &self.metrics,
                        &self.reporter,
                        conn,
                        &route.prefix,
                        kind,
                        Some(forwarding.client()),
                    );
                    return Err(Some(kind.into()));
                }
                Decision::Unavailable => {
                    crate::proxy::refused_unavailable(&self.metrics);
                    return Err(Some(Refusal {
                        kind: problem::REVOCATION_UNAVAILABLE,
                        detail: None,
                        retry_after: Some(self.revocation.retry_after_secs()),
                    }));
                }
            }
        } else {
            false
        };
        let declared = match parts.headers.get(header::CONTENT_LENGTH) {
            Some(v) => Some(parse_length(v.as_bytes()).ok_or(Some(problem::BAD_REQUEST.into()))?),
            None => None,
        };
        if declared.is_some_and(|n| n > route.max_body_bytes) {
            return Err(Some(problem::PAYLOAD_TOO_LARGE.into()));
        }
        let Some(backend) = route.pool.select(b"", 256) else {
            return Err(Some(problem::UPSTREAM_UNAVAILABLE.into()));
        };
        self.served.inc();
        let limit = route.timeout;
        // The body's first piece goes with the head, in one write.
        let mut first = Bytes::new();
        let mut more = !body.is_end_stream();
        if more {
            match next_body(body, limit).await {
                Ok(Some(data)) => {
                    first = data;
                    more = !body.is_end_stream();
                }
                Ok(None) => more = false,
                Err(()) => return Err(None),
            }
        }
        if first.len() as u64 > route.max_body_bytes {
            return Err(Some(problem::PAYLOAD_TOO_LARGE.into()));
        }
        // Without a declared length, a body wholly in hand gets one.
        let (length, chunked) = match declared {
            Some(n) => (Some(n), false),
            None if !more => (Some(first.len() as u64), false),
            None => (None, true),
        };
        let assertion;
        let identity = if inject {
            assertion = conn.assertion(&self.assertions, route, crate::proxy::unix_now());
            Some((conn.headers(), &assertion))
        } else {
            None
        };
        let mut out = Vec::with_capacity(1024 + first.len().min(8192));
        write_upstream_head(&mut out, &parts, self.strip, forwarding, identity, length).map_err(
            |why| {
                Some(Refusal {
                    kind: problem::BAD_REQUEST,
                    detail: Some(why),
                    retry_after: None,
                })
            },
        )?;
        frame_body(&mut out, &first, chunked);
        let head_request = parts.method == http::Method::HEAD;
        let idempotent = matches!(
            parts.method.as_str(),
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        );
        drop(parts);
        let mut sending = Sending {
            route,
            out,
            body: more.then_some(body),
            chunked,
            counted: first.len() as u64,
        };
        let key: PoolKey = (route.index, backend.addr.clone());
        let sent = Instant::now();
        let mut retried = false;
        let mut informational = Vec::new();
        let (upstream, buf, resp, head) = loop {
            let (stream, reused) = match self.pool.take(&key) {
                Some(s) => (s, true),
                None => match Box::pin(self.connect(route, &backend)).await {
                    Ok(s) => (s, false),
                    Err(kind) => return Err(Some(kind.into())),
                },
            };
            let whole = sending.body.is_none();
            match sending
                .exchange(stream, head_request, &mut informational)
                .await
            {
                Exchanged::Answered(s, b, r, h) => break (s, b, r, h),
                Exchanged::Stale if reused && idempotent && whole && !retried => retried = true,
                Exchanged::Stale => return Err(Some(problem::BAD_GATEWAY.into())),
                Exchanged::Refused(r) => return Err(Some(r)),
                Exchanged::Cut => return Err(None),
            }
        };
        self.observe_upstream(route, sent);
        Ok(Answer {
            upstream,
            buf,
            resp,
            head,
            informational,
            key,
        })
    }

    /// Sends the upstream's answer on the stream and relays its body.
    async fn relay(&self, route: &Route, answer: Answer, respond: &mut SendResponse<Bytes>) {
        let Answer {
            mut upstream,
            buf,
            resp,
            head,
            informational,
            key,
        } = answer;
        self.count(route, resp.status);
        for r in informational {
            let _ = respond.send_informational(r);
        }
        let empty = resp.framing == Framing::Empty;
        let Ok(mut send) = respond.send_response(head, empty) else {
            // The client reset the stream: the upstream's answer is unread.
            return;
        };
        let relayed = if empty {
            Ok(buf.is_empty())
        } else {
            relay_body(&mut send, &mut upstream, buf, resp.framing, route).await
        };
        match relayed {
            Ok(clean) => {
                if clean && resp.reusable {
                    self.pool.put(key, upstream);
                }
            }
            Err(()) => send.send_reset(Reason::INTERNAL_ERROR),
        }
    }

    /// Answers a refusal on the stream: problem+json, as pingora's path
    /// does (`crate::proxy`).
    fn answer(&self, respond: &mut SendResponse<Bytes>, route: &str, r: Refusal) {
        self.count_status(route, r.kind.status);
        let body = Bytes::from(Problem::new(r.kind, r.detail.map(str::to_owned)).to_json());
        let mut resp = http::Response::new(());
        *resp.status_mut() = http::StatusCode::from_u16(r.kind.status)
            .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        let headers = resp.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(s) = r.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if let Ok(mut send) = respond.send_response(resp, false) {
            // Small: buffered by the `h2` crate until the window allows.
            send.reserve_capacity(body.len());
            let _ = send.send_data(body, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(req: http::request::Builder) -> Parts {
        req.body(()).unwrap().into_parts().0
    }

    fn head_of(parts: &Parts, identity: bool, length: Option<u64>) -> String {
        let fwd = Forwarding::new("192.0.2.7".parse().unwrap());
        let ids = [("x-oneprotect-tenant-id", HeaderValue::from_static("t-1"))];
        let assertion = HeaderValue::from_static("signed");
        let mut out = Vec::new();
        write_upstream_head(
            &mut out,
            parts,
            StripPolicy::default(),
            &fwd,
            identity.then_some((&ids[..], &assertion)),
            length,
        )
        .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_upstream_head_strips_spoofs_joins_cookies_and_adds_ours() {
        let p = parts(
            http::Request::post("https://agents.example:8443/api/x?y=1")
                .header("x-oneprotect-tenant-id", "spoof")
                .header("x_oneprotect_agent_id", "spoof")
                .header("x-forwarded-for", "203.0.113.1")
                .header("forwarded", "for=203.0.113.1")
                .header("host", "other.example")
                .header("te", "trailers")
                .header("expect", "100-continue")
                .header("cookie", "a=1")
                .header("x-a", "1")
                .header("cookie", "b=2")
                .header("content-length", "3"),
        );
        let head = head_of(&p, true, Some(3));
        assert_eq!(
            head,
            "POST /api/x?y=1 HTTP/1.1\r\nhost: agents.example:8443\r\ncookie: a=1; b=2\r\n\
             x-a: 1\r\ncontent-length: 3\r\nx-forwarded-for: 192.0.2.7\r\nx-real-ip: 192.0.2.7\r\n\
             forwarded: for=192.0.2.7\r\nx-oneprotect-tenant-id: t-1\r\n\
             x-oneprotect-identity-assertion: signed\r\n\r\n"
        );
        // No identity (a route that does not require it): none of it, and
        // still none of the client's.
        let head = head_of(&p, false, None);
        assert!(
            head.contains("\r\ntransfer-encoding: chunked\r\n"),
            "{head}"
        );
        assert!(!head.contains("content-length"), "{head}");
        assert!(!head.contains("t-1") && !head.contains("spoof"), "{head}");
        assert!(!head.contains("assertion"), "{head}");
    }

    #[test]
    fn the_authority_comes_from_the_uri_or_one_host_header() {
        let mut p = parts(http::Request::get("/x").header("host", "h.example"));
        assert!(head_of(&p, false, Some(0)).starts_with("GET /x HTTP/1.1\r\nhost: h.example\r\n"));
        p.headers
            .append("host", HeaderValue::from_static("i.example"));
        let fwd = Forwarding::new("192.0.2.7".parse().unwrap());
        let mut out = Vec::new();
        let refused = write_upstream_head(&mut out, &p, StripPolicy::default(), &fwd, None, None);
        assert!(refused.is_err());
        let p = parts(http::Request::get("/x"));
        assert!(
            write_upstream_head(&mut out, &p, StripPolicy::default(), &fwd, None, None).is_err()
        );
    }

    #[test]
    fn the_client_head_drops_connection_fields_and_keeps_the_rest() {
        let raw = b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\
                    X-Up: 1\r\nContent-Length: 2\r\nUpgrade: h2c\r\n\r\nok";
        let head = parse_head(raw).unwrap().unwrap();
        let resp = response_for_client(&head).unwrap();
        assert_eq!(resp.status(), 200);
        let names: Vec<&str> = resp.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-up", "content-length", "date"]);
        let raw = b"HTTP/1.1 204 No Content\r\nDate: Mon, 07 Dec 2026 10:00:00 GMT\r\n\r\n";
        let resp = response_for_client(&parse_head(raw).unwrap().unwrap()).unwrap();
        assert_eq!(resp.headers()["date"], "Mon, 07 Dec 2026 10:00:00 GMT");
        assert_eq!(resp.headers().len(), 1);
    }

    #[test]
    fn a_chunked_body_is_decoded_across_any_split() {
        let body = b"4;e=1\r\nabcd\r\n3\r\nefg\r\n0\r\nX-T: t\r\n\r\n";
        for cut in 0..=body.len() {
            let mut cursor = BodyCursor::new(Framing::Chunked);
            let mut got = Vec::new();
            let mut done = false;
            for piece in [&body[..cut], &body[cut..]] {
                let mut buf = BytesMut::from(piece);
                match body_part(&mut buf, &mut cursor) {
                    Part::Data {
                        data,
                        done: d,
                        extra,
                    } => {
                        got.extend_from_slice(&data);
                        assert!(!extra, "cut {cut}");
                        done |= d;
                    }
                    Part::Bad => panic!("cut {cut}: refused"),
                }
            }
            assert_eq!(got, b"abcdefg", "cut {cut}");
            assert!(done, "cut {cut}");
        }
        let mut buf = BytesMut::from(&b"zz\r\n"[..]);
        let bad = body_part(&mut buf, &mut BodyCursor::new(Framing::Chunked));
        assert!(matches!(bad, Part::Bad));
    }

    #[test]
    fn a_length_body_ends_at_its_length_and_notes_what_follows() {
        let mut cursor = BodyCursor::new(Framing::Length(5));
        let mut part = |bytes: &[u8]| {
            let mut buf = BytesMut::from(bytes);
            match body_part(&mut buf, &mut cursor) {
                Part::Data { data, done, extra } => (data.to_vec(), done, extra),
                Part::Bad => panic!("a length body is never refused"),
            }
        };
        assert_eq!(part(b"abc"), (b"abc".to_vec(), false, false));
        assert_eq!(part(b"deXX"), (b"de".to_vec(), true, true));
    }
}
