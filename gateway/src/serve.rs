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
//! HTTP/2 connections go to pingora's own loop (the `h2` crate frames them).

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{BufMut, BytesMut};
use oneprotect_identity::problem::{self, Problem, ProblemKind};
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::handshake::HandshakeDeadline;
use crate::metrics::Metrics;
use crate::proxy::Gateway;

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
}

/// pingora's `ServerApp` for the mTLS listener: this module's HTTP/1.1 loop
/// around pingora's proxy, pingora's own loop for HTTP/2.
pub struct GatewayApp {
    proxy: Arc<HttpProxy<Gateway>>,
    limits: ConnLimits,
    handshakes: Arc<HandshakeDeadline>,
    metrics: Metrics,
}

impl GatewayApp {
    /// The app around `proxy`.
    pub fn new(
        proxy: HttpProxy<Gateway>,
        limits: ConnLimits,
        handshakes: Arc<HandshakeDeadline>,
        metrics: Metrics,
    ) -> Self {
        Self {
            proxy: Arc::new(proxy),
            limits,
            handshakes,
            metrics,
        }
    }

    async fn serve_h1(&self, mut stream: Stream, shutdown: &ShutdownWatch) {
        let mut watch = shutdown.clone();
        let mut settings: Option<HttpPersistentSettings> = None;
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
            let Some(reused) = self.proxy.process_new_http(session, shutdown).await else {
                return;
            };
            (stream, settings) = reused.consume();
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
        self.handshakes.handshaken(stream.id());
        match stream.selected_alpn_proto() {
            Some(ALPN::H2) | Some(ALPN::Custom(_)) => {
                ServerApp::process_new(&self.proxy, stream, shutdown).await
            }
            _ => {
                self.serve_h1(stream, shutdown).await;
                None
            }
        }
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
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
fn poll_once<F: Future>(fut: F) -> Option<F::Output> {
    let mut cx = Context::from_waker(Waker::noop());
    match pin!(fut).poll(&mut cx) {
        Poll::Ready(out) => Some(out),
        Poll::Pending => None,
    }
}

/// Resolves once the service is shutting down; never if it cannot tell.
async fn stopping(watch: &mut ShutdownWatch) {
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
             cache-control: no-store\r\nconnection: close\r\n\r\n",
            kind.status,
            kind.title,
            problem::CONTENT_TYPE,
            body.len()
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
