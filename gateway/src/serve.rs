//! The gateway's connection loop for HTTP/1.1: it waits for each request
//! itself and hands pingora a complete request head.
//!
//! pingora's own loop creates a request session (and its ≈ 13 KiB boxed
//! proxy future plus a 4 KiB header buffer) *before* the next request
//! arrives, so every idle keep-alive connection holds both, and it applies
//! its header timeout to each read, so a client that trickles one byte every
//! < 60 s holds a connection forever. This loop instead, per request:
//!
//! 1. waits for the first byte with a 1-byte read and no buffer, bounded by
//!    the idle timeout (`listener.idle_timeout_secs`) and by shutdown;
//! 2. reads until the end of the request head (the first empty line), bounded
//!    as a whole by `listener.header_timeout_ms` from the first byte and in
//!    size by `listener.max_header_bytes`: too slow gets 408, too large 431
//!    (problem+json, `connection: close`);
//! 3. gives the bytes to pingora as the session's prefix, so pingora parses
//!    the head from them without another read, and runs the proxy as usual.
//!
//! HTTP/2 connections go to pingora's own loop (the `h2` crate frames them),
//! with its idle timeout set to `listener.idle_timeout_secs` (which also
//! bounds the wait for a first complete HEADERS).
//!
//! An HTTP/1.1 connection an upstream switched to a tunnel (a 101 to an
//! upgrade its route allows) watches its own certificate and agent
//! ([`Revocation::watch_tunnel`]) and is closed, both ways, as soon as
//! either is refused. Only when some route allows upgrades does the loop
//! watch at all.
//!
//! Connections without a verified client certificate (they can reach only
//! the certificate-less exchange route) live at most
//! `listener.unauthenticated_timeout_secs` in all, and one source address
//! may hold at most `listener.unauthenticated_max_per_source` of them.

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{BufMut, BytesMut};
use oneprotect_identity::problem::{self, Problem, ProblemKind};
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Ssl, Stream, UniqueID, ALPN,
};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::conn::ConnIdentity;
use crate::fast::{FastPath, Http2Ended, Served};
use crate::handshake::Handshaker;
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::revocation::Revocation;

/// The first allocation for a request head (pingora's own initial size).
const HEAD_BUF: usize = 4096;

/// Per-connection limits of the HTTP/1.1 loop.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// How long a connection may wait for its next request (and for the
    /// first one after the handshake).
    pub idle: Duration,
    /// How long a request head may take from its first byte to its end.
    pub header: Duration,
    /// The largest request head accepted, bytes.
    pub max_header_bytes: usize,
    /// How long a connection without a client certificate may live in
    /// all (it can only reach the certificate-less routes: the exchange).
    pub unauthenticated_life: Duration,
    /// How many connections without a client certificate one source
    /// address may hold at once.
    pub unauthenticated_per_source: u32,
}

/// Counts the open connections without a client certificate per source
/// address; a [`SourceSlot`] holds one.
#[derive(Debug, Default)]
pub struct PerSource {
    open: Mutex<HashMap<IpAddr, u32>>,
}

/// One connection's place in [`PerSource`]; freed on drop.
#[derive(Debug)]
pub struct SourceSlot<'a> {
    table: &'a PerSource,
    ip: IpAddr,
}

impl PerSource {
    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, u32>> {
        // Consistent at every unlock: a poisoned lock is still usable.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A slot for `ip`, unless it already holds `max`.
    pub fn acquire(&self, ip: IpAddr, max: u32) -> Option<SourceSlot<'_>> {
        let mut t = self.table();
        let n = t.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(SourceSlot { table: self, ip })
    }

    /// How many slots `ip` holds.
    pub fn held(&self, ip: IpAddr) -> u32 {
        self.table().get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for SourceSlot<'_> {
    fn drop(&mut self) {
        let mut t = self.table.table();
        if let Some(n) = t.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                t.remove(&self.ip);
            }
        }
    }
}

/// pingora's `ServerApp` for the mTLS listener: the gateway's own TLS
/// handshake ([`Handshaker`]), then this module's HTTP/1.1 loop around
/// pingora's proxy, or pingora's own loop for HTTP/2.
pub struct GatewayApp {
    proxy: Arc<HttpProxy<Gateway>>,
    limits: ConnLimits,
    handshaker: Arc<Handshaker>,
    metrics: Metrics,
    unauthenticated: PerSource,
    /// Set when some route allows upgrades: tunnels watch their state here.
    tunnels: Option<Arc<Revocation>>,
    /// The fast path (`listener.http1_fast_path`, `listener.http2_fast_path`).
    fast: Option<FastPath>,
}

impl GatewayApp {
    /// The app around `proxy`. `tunnels` is the revocation checker when
    /// some route allows upgrades (`None`: no connection can become a
    /// tunnel, and none is watched).
    pub fn new(
        proxy: HttpProxy<Gateway>,
        limits: ConnLimits,
        handshaker: Arc<Handshaker>,
        metrics: Metrics,
        tunnels: Option<Arc<Revocation>>,
        fast: Option<FastPath>,
    ) -> Self {
        Self {
            proxy: Arc::new(proxy),
            limits,
            handshaker,
            metrics,
            unauthenticated: PerSource::default(),
            tunnels,
            fast,
        }
    }

    /// Serves one request on `session`, racing it against the connection's
    /// tunnel watch when the connection may become a tunnel: `Err` when the
    /// watch refused the tunnel (it was closed).
    async fn serve_request(
        &self,
        session: ServerSession,
        shutdown: &ShutdownWatch,
        watched: Option<(&Revocation, &ConnIdentity)>,
    ) -> Result<Option<pingora::apps::ReusedHttpStream>, ()> {
        let served = self.proxy.process_new_http(session, shutdown);
        let Some((revocation, conn)) = watched else {
            return Ok(served.await);
        };
        // Boxed: inline, the watch's state (a revocation lookup) would
        // enlarge every connection's future, idle ones included, also where
        // no route allows upgrades.
        let watch = Box::pin(async {
            conn.await_tunnel().await;
            revocation.watch_tunnel(conn).await
        });
        tokio::select! {
            reused = served => Ok(reused),
            kind = watch => {
                // Dropping the request's future drops both sockets.
                self.closed(&format!("tunnel_{}", kind.code));
                let id = conn.identity();
                tracing::info!(
                    code = kind.code,
                    tenant = %id.tenant(),
                    agent = %id.agent(),
                    serial = %id.serial(),
                    "tunnel closed by the revocation check"
                );
                Err(())
            }
        }
    }

    async fn serve_h1(&self, mut stream: Stream, shutdown: &ShutdownWatch) {
        let mut watch = shutdown.clone();
        let mut settings: Option<HttpPersistentSettings> = None;
        // Held for the connection's life: its identity, for the fast path
        // and when a tunnel on it would be watched.
        let digest = stream.get_ssl_digest();
        let identity = digest
            .as_ref()
            .and_then(|d| d.extension.get::<ConnIdentity>());
        let watched = self.tunnels.as_deref().zip(identity);
        // The fast path serves verified identities, with the client address
        // pingora's path would forward (the TCP peer or a PROXY header's).
        let fast = self.fast.as_ref().filter(|f| f.http1);
        let fast = fast.zip(identity).and_then(|(fast, conn)| {
            let client = match stream.get_socket_digest()?.peer_addr()? {
                SocketAddr::Inet(a) => a.ip(),
                _ => return None,
            };
            Some((fast, conn, conn.forwarding(client)))
        });
        loop {
            let head = match read_head(&mut stream, &mut watch, &self.limits).await {
                Head::Ready(head) => head,
                Head::Closed => return,
                Head::Idle => {
                    self.closed("idle_timeout");
                    return;
                }
                Head::Slow => {
                    self.closed("header_timeout");
                    answer_and_close(stream, problem::REQUEST_HEADER_TIMEOUT).await;
                    return;
                }
                Head::TooLarge => {
                    self.closed("header_too_large");
                    answer_and_close(stream, problem::REQUEST_HEADER_TOO_LARGE).await;
                    return;
                }
            };
            let head = match &fast {
                Some((fast, conn, forwarding)) => {
                    let closing = *shutdown.borrow();
                    // Boxed: the request's state is not held by idle
                    // connections.
                    let served =
                        Box::pin(fast.serve(&mut stream, head, conn, forwarding, closing)).await;
                    match served {
                        Served::Declined(head) => head,
                        Served::Done { keep_alive: true } => continue,
                        Served::Done { keep_alive: false } => {
                            let close = pingora::protocols::Shutdown::shutdown(&mut *stream);
                            let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
                            return;
                        }
                        Served::Failed(kind) => {
                            answer_and_close(stream, kind).await;
                            return;
                        }
                        Served::Aborted => return,
                    }
                }
                None => head,
            };
            let mut session = ServerSession::new_http1(stream);
            match settings.take() {
                // Keep-alive settings of the previous request (the remaining
                // reuse count among them).
                Some(s) => s.apply_to_session(&mut session),
                None => session.set_keepalive(Some(self.limits.idle.as_secs().max(1))),
            }
            if *shutdown.borrow() {
                session.set_keepalive(None);
            }
            session.set_pipelined_prefix(head);
            let Ok(Some(reused)) = self.serve_request(session, shutdown, watched).await else {
                return;
            };
            (stream, settings) = reused.consume();
        }
    }

    /// pingora's HTTP/2 loop. Its idle timeout (`h2_idle_timeout`, set to
    /// `listener.idle_timeout_secs`) runs from the h2 handshake and covers a
    /// HEADERS frame that never completes; the h2 handshake itself waits
    /// for the client's preface without a bound, so the preface must arrive
    /// within the idle timeout too.
    async fn serve_h2(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let read = Arc::new(AtomicUsize::new(0));
        let counted: Stream = Box::new(CountedRead {
            inner: stream,
            read: read.clone(),
        });
        let idle = self.limits.idle;
        let no_preface = async {
            pingora_timeout::sleep(idle).await;
            if read.load(Ordering::Relaxed) >= H2_PREFACE_LEN {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            reuse = ServerApp::process_new(&self.proxy, counted, shutdown) => reuse,
            () = no_preface => {
                self.closed("idle_timeout");
                None
            }
        }
    }

    /// The fast path's HTTP/2 loop (ADR-0028) for a connection with a
    /// verified identity: every stream is served there.
    async fn serve_h2_fast(&self, stream: Stream, shutdown: &ShutdownWatch) {
        let digest = stream.get_ssl_digest();
        let conn = digest
            .as_ref()
            .and_then(|d| d.extension.get::<ConnIdentity>());
        let client = match stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().cloned())
        {
            Some(SocketAddr::Inet(a)) => Some(a.ip()),
            _ => None,
        };
        let (Some(fast), Some(conn), Some(client)) = (self.fast.as_ref(), conn, client) else {
            return;
        };
        let forwarding = conn.forwarding(client);
        let max_header_list = u32::try_from(self.limits.max_header_bytes).unwrap_or(u32::MAX);
        let ended = fast
            .serve_h2(
                stream,
                conn,
                &forwarding,
                self.limits.idle,
                max_header_list,
                shutdown,
            )
            .await;
        match ended {
            Http2Ended::Idle => self.closed("idle_timeout"),
            Http2Ended::Error => self.closed("h2_error"),
            Http2Ended::Closed => {}
        }
    }

    fn closed(&self, reason: &str) {
        self.metrics
            .connections_closed
            .with_label_values(&[reason])
            .inc();
    }
}

#[async_trait]
impl ServerApp for GatewayApp {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // The listener is plain TCP: TLS (and a PROXY header from a trusted
        // balancer) is done here, bounded, counted and rate-limit logged.
        // Boxed, as is the HTTP/2 loop: inline, their state would stay part
        // of every connection's future (an idle HTTP/1.1 connection too).
        let stream = Box::pin(self.handshaker.accept(stream)).await?;
        // A connection without a verified client certificate can only reach
        // the certificate-less routes (the exchange): a short life, and a
        // few per source address.
        let unauthenticated = stream
            .get_ssl_digest()
            .is_none_or(|d| d.extension.get::<ConnIdentity>().is_none());
        let mut _slot = None;
        if unauthenticated {
            let ip = match stream
                .get_socket_digest()
                .as_deref()
                .and_then(|d| d.peer_addr())
            {
                Some(SocketAddr::Inet(a)) => Some(a.ip()),
                _ => None,
            };
            if let Some(ip) = ip {
                match self
                    .unauthenticated
                    .acquire(ip, self.limits.unauthenticated_per_source)
                {
                    Some(slot) => _slot = Some(slot),
                    None => {
                        self.closed("unauthenticated_per_source");
                        return None;
                    }
                }
            }
        }
        let serve = async {
            match stream.selected_alpn_proto() {
                Some(ALPN::H2)
                    if !unauthenticated && self.fast.as_ref().is_some_and(|f| f.http2) =>
                {
                    Box::pin(self.serve_h2_fast(stream, shutdown)).await;
                    None
                }
                Some(ALPN::H2) | Some(ALPN::Custom(_)) => {
                    Box::pin(self.serve_h2(stream, shutdown)).await
                }
                _ => {
                    self.serve_h1(stream, shutdown).await;
                    None
                }
            }
        };
        if !unauthenticated {
            return serve.await;
        }
        match pingora_timeout::timeout(self.limits.unauthenticated_life, serve).await {
            Ok(reuse) => reuse,
            Err(_) => {
                self.closed("unauthenticated_timeout");
                None
            }
        }
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}

/// The HTTP/2 client connection preface (`PRI * HTTP/2.0...`), bytes.
const H2_PREFACE_LEN: usize = 24;

/// A stream that counts the bytes read from it (everything else passes
/// through).
#[derive(Debug)]
struct CountedRead {
    inner: Stream,
    read: Arc<AtomicUsize>,
}

impl tokio::io::AsyncRead for CountedRead {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            self.read
                .fetch_add(buf.filled().len() - before, Ordering::Relaxed);
        }
        res
    }
}

impl tokio::io::AsyncWrite for CountedRead {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl pingora::protocols::Shutdown for CountedRead {
    async fn shutdown(&mut self) {
        pingora::protocols::Shutdown::shutdown(&mut *self.inner).await;
    }
}

impl UniqueID for CountedRead {
    fn id(&self) -> pingora::protocols::UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for CountedRead {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for CountedRead {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for CountedRead {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: pingora::protocols::raw_connect::ProxyDigest) {
        self.inner.set_proxy_digest(digest);
    }
}

impl GetSocketDigest for CountedRead {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: pingora::protocols::SocketDigest) {
        self.inner.set_socket_digest(digest);
    }
}

#[async_trait]
impl Peek for CountedRead {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

/// How waiting for a request head ended.
#[derive(Debug, PartialEq)]
enum Head {
    /// The bytes up to and including the head's empty line (and whatever
    /// followed it in the same reads).
    Ready(BytesMut),
    /// The peer closed or reset the connection, or the service is stopping.
    Closed,
    /// No request within the idle timeout.
    Idle,
    /// A request began but its head did not end within the header timeout.
    Slow,
    /// The head grew past the size limit.
    TooLarge,
}

async fn read_head<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    shutdown: &mut ShutdownWatch,
    limits: &ConnLimits,
) -> Head {
    // 1. Idle: no buffer is held until the first byte arrives. A request
    //    already waiting (common under load) needs no timer.
    let mut first = [0u8; 1];
    let read = match poll_once(stream.read(&mut first)) {
        Some(r) => Ok(r),
        None => tokio::select! {
            biased;
            r = pingora_timeout::timeout(limits.idle, stream.read(&mut first)) => r,
            () = stopping(shutdown) => return Head::Closed,
        },
    };
    match read {
        Err(_) => return Head::Idle,
        Ok(Ok(1)) => {}
        Ok(_) => return Head::Closed,
    }
    // 2. The head, bounded as a whole.
    let deadline = Instant::now() + limits.header;
    let mut buf = BytesMut::with_capacity(HEAD_BUF);
    buf.put_u8(first[0]);
    let mut scan = HeadScan::default();
    loop {
        if scan.complete(&buf) {
            return Head::Ready(buf);
        }
        if buf.len() > limits.max_header_bytes {
            return Head::TooLarge;
        }
        // What is already buffered (by TLS, say) needs no timer.
        let read = match poll_once(stream.read_buf(&mut buf)) {
            Some(r) => r,
            None => {
                let left = deadline.saturating_duration_since(Instant::now());
                match pingora_timeout::timeout(left, stream.read_buf(&mut buf)).await {
                    Ok(r) => r,
                    Err(_) => return Head::Slow,
                }
            }
        };
        match read {
            Ok(0) | Err(_) => return Head::Closed,
            Ok(_) => {}
        }
    }
}

/// Polls a future once, without a waker that anything will call.
pub(crate) fn poll_once<F: Future>(fut: F) -> Option<F::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(fut).poll(&mut cx) {
        Poll::Ready(out) => Some(out),
        Poll::Pending => None,
    }
}

/// Resolves once the service is shutting down; never if it cannot tell.
pub(crate) async fn stopping(watch: &mut ShutdownWatch) {
    loop {
        if *watch.borrow_and_update() {
            return;
        }
        if watch.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Finds the end of a request head across reads: the first empty line
/// (`\n\n` or `\n\r\n`) after the request line. Empty lines before the
/// request line are skipped, as the HTTP/1.1 parser does (RFC 9112 §2.2).
#[derive(Debug, Default)]
struct HeadScan {
    /// Where the request line starts, once a byte other than CR/LF is seen.
    start: Option<usize>,
    /// Bytes already searched for line ends.
    searched: usize,
}

impl HeadScan {
    fn complete(&mut self, buf: &[u8]) -> bool {
        let start = match self.start {
            Some(s) => s,
            None => match buf.iter().position(|&b| b != b'\r' && b != b'\n') {
                Some(s) => {
                    self.start = Some(s);
                    self.searched = s;
                    s
                }
                None => return false,
            },
        };
        // Re-check the last two bytes: an end can straddle reads.
        let from = self.searched.saturating_sub(2).max(start);
        for i in from..buf.len() {
            if buf[i] == b'\n' {
                match &buf[i + 1..] {
                    [b'\n', ..] | [b'\r', b'\n', ..] => return true,
                    _ => {}
                }
            }
        }
        self.searched = buf.len();
        false
    }
}

/// Answers a request whose head was refused, then closes the connection.
///
/// Before closing it reads and drops what the client still sends (at most
/// 2 s, until 500 ms pass without data), as nginx's lingering close does:
/// closing a socket with unread data sends a reset, which can destroy the
/// answer before the client reads it.
async fn answer_and_close(mut stream: Stream, kind: ProblemKind) {
    let body = Problem::new(kind, None).to_json();
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(
        format!(
            "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\n\
             cache-control: no-store\r\ndate: {}\r\nconnection: close\r\n\r\n",
            kind.status,
            kind.title,
            problem::CONTENT_TYPE,
            body.len(),
            pingora::protocols::http::date::get_cached_date()
                .to_str()
                .unwrap_or_default(),
        )
        .as_bytes(),
    );
    out.extend_from_slice(&body);
    let linger = async {
        stream.write_all(&out).await?;
        stream.flush().await?;
        let mut sink = vec![0u8; 16 * 1024];
        while tokio::time::timeout(Duration::from_millis(500), stream.read(&mut sink))
            .await
            .is_ok_and(|r| r.is_ok_and(|n| n > 0))
        {}
        Ok::<_, std::io::Error>(())
    };
    // The peer may be gone; closing is all that is left either way.
    let _ = tokio::time::timeout(Duration::from_secs(2), linger).await;
    let close = pingora::protocols::Shutdown::shutdown(&mut *stream);
    let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(header_ms: u64, max: usize) -> ConnLimits {
        ConnLimits {
            idle: Duration::from_millis(300),
            header: Duration::from_millis(header_ms),
            max_header_bytes: max,
            unauthenticated_life: Duration::from_secs(30),
            unauthenticated_per_source: 32,
        }
    }

    fn scan_all(chunks: &[&[u8]]) -> Vec<bool> {
        let mut scan = HeadScan::default();
        let mut buf = Vec::new();
        chunks
            .iter()
            .map(|c| {
                buf.extend_from_slice(c);
                scan.complete(&buf)
            })
            .collect()
    }

    #[test]
    fn head_scan_finds_the_empty_line_across_reads() {
        assert_eq!(scan_all(&[b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"]), [true]);
        assert_eq!(scan_all(&[b"GET / HTTP/1.1\nHost: a\n\n"]), [true]);
        // The end split between reads at every place.
        let full = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for cut in 1..full.len() {
            let got = scan_all(&[&full[..cut], &full[cut..]]);
            assert_eq!(got, [false, true], "cut at {cut}");
        }
        // One byte at a time.
        let bytes: Vec<&[u8]> = full.chunks(1).collect();
        let got = scan_all(&bytes);
        assert_eq!(got.iter().filter(|c| **c).count(), 1);
        assert!(got[got.len() - 1]);
        // Empty lines before the request line are not its end.
        assert_eq!(
            scan_all(&[b"\r\n\r\n", b"GET / HTTP/1.1\r\n", b"\r\n"]),
            [false, false, true]
        );
        // A body-less line break inside a header is not an end.
        assert_eq!(scan_all(&[b"GET / HTTP/1.1\r\nX: a\r\nY: b\r\n"]), [false]);
    }

    async fn head_of(client_writes: Vec<(u64, Vec<u8>)>, lim: ConnLimits) -> Head {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            for (pause_ms, bytes) in client_writes {
                tokio::time::sleep(Duration::from_millis(pause_ms)).await;
                if client.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            // Keep the connection open until the reader is done.
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let (_tx, mut rx) = tokio::sync::watch::channel(false);
        let head = read_head(&mut server, &mut rx, &lim).await;
        writer.abort();
        head
    }

    #[tokio::test]
    async fn a_whole_head_is_handed_over_with_what_followed_it() {
        let req = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi".to_vec();
        let head = head_of(vec![(0, req.clone())], limits(1_000, 1024)).await;
        assert_eq!(head, Head::Ready(BytesMut::from(&req[..])));
    }

    #[tokio::test]
    async fn a_trickled_head_is_cut_at_the_header_timeout_not_per_read() {
        // One byte every 50 ms: each read is quick, the whole is too slow.
        let writes = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            .iter()
            .map(|b| (50, vec![*b]))
            .collect();
        let head = head_of(writes, limits(400, 1024)).await;
        assert_eq!(head, Head::Slow);
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused_and_silence_is_idle() {
        let mut big = b"GET / HTTP/1.1\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'a', 2048));
        assert_eq!(
            head_of(vec![(0, big)], limits(1_000, 1024)).await,
            Head::TooLarge
        );
        assert_eq!(head_of(vec![], limits(1_000, 1024)).await, Head::Idle);
    }

    #[test]
    fn per_source_slots_are_capped_and_freed() {
        let t = PerSource::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = t.acquire(a, 2).unwrap();
        let s2 = t.acquire(a, 2).unwrap();
        assert!(t.acquire(a, 2).is_none());
        let s3 = t.acquire(b, 2).unwrap();
        drop(s1);
        assert_eq!(t.held(a), 1);
        let s4 = t.acquire(a, 2).unwrap();
        drop((s2, s3, s4));
        assert_eq!(t.held(a), 0);
        assert!(t.table().is_empty());
    }

    #[tokio::test]
    async fn shutdown_ends_the_idle_wait() {
        let (_client, mut server) = tokio::io::duplex(1024);
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        let lim = ConnLimits {
            idle: Duration::from_secs(30),
            ..limits(1_000, 1024)
        };
        let wait = tokio::spawn(async move { read_head(&mut server, &mut rx, &lim).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(true).unwrap();
        let head = tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("the idle wait ends on shutdown")
            .unwrap();
        assert_eq!(head, Head::Closed);
    }
}
