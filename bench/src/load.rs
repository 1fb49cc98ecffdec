//! The load generator: keep-alive (HTTP/1.1 and h2) and handshake load over
//! mutual TLS, one agent identity per connection, bounded in time and count.
//!
//! Latency is recorded in microseconds in an HDR histogram. With a target
//! rate (`LoadSpec::rate`) each connection sends on a fixed schedule and
//! latency is measured from the *scheduled* send time, so a stalled server is
//! charged for the requests it delayed (coordinated-omission correction, as in
//! wrk2). Without a rate the loop is closed (maximum throughput) and the
//! percentiles describe service time only.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// HTTP version on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
pub enum Proto {
    /// HTTP/1.1 with keep-alive.
    H1,
    /// HTTP/2, one stream at a time per connection.
    H2,
}

impl Proto {
    /// The ALPN id.
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Proto::H1 => b"http/1.1",
            Proto::H2 => b"h2",
        }
    }
}

/// Where to send load.
#[derive(Debug, Clone)]
pub struct Target {
    /// Name in reports.
    pub name: String,
    /// Address (always loopback).
    pub addr: SocketAddr,
    /// Whether to speak TLS (mTLS with the given client configurations).
    pub tls: bool,
    /// Request path.
    pub path: String,
}

/// How much load.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Concurrent connections.
    pub concurrency: usize,
    /// Upper bound on the run's length.
    pub duration: Duration,
    /// Upper bound on requests sent.
    pub max_requests: u64,
    /// Protocol.
    pub proto: Proto,
    /// Total target rate in requests/s; `None` for a closed loop.
    pub rate: Option<f64>,
}

/// What a run measured.
pub struct LoadResult {
    /// Successful (2xx) responses.
    pub ok: u64,
    /// Failures by kind (`connect`, `tls`, `http`, `status_403`, …).
    pub errors: BTreeMap<String, u64>,
    /// Latency of successful requests, µs.
    pub hist: Histogram<u64>,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Connections (handshakes) made.
    pub connections: u64,
    /// Of those, how many resumed a TLS session.
    pub resumed: u64,
}

impl LoadResult {
    /// An empty result.
    pub fn empty() -> Self {
        Self::new()
    }

    fn new() -> Self {
        Self {
            ok: 0,
            errors: BTreeMap::new(),
            hist: new_hist(),
            elapsed: Duration::ZERO,
            connections: 0,
            resumed: 0,
        }
    }

    fn merge(&mut self, other: LoadResult) {
        self.ok += other.ok;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        // Both histograms share bounds; adding cannot fail.
        let _ = self.hist.add(&other.hist);
        self.connections += other.connections;
        self.resumed += other.resumed;
    }

    fn error(&mut self, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_default() += 1;
    }

    /// Total errors.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits: fixed bounds, cannot fail.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Live progress on stderr (when it is a terminal) and shared counters.
pub struct Progress {
    label: String,
    ok: AtomicU64,
    err: AtomicU64,
    done: AtomicBool,
}

impl Progress {
    /// Starts a progress line for `label` lasting at most `duration`.
    pub fn start(label: impl Into<String>, duration: Duration) -> Arc<Self> {
        let p = Arc::new(Self {
            label: label.into(),
            ok: AtomicU64::new(0),
            err: AtomicU64::new(0),
            done: AtomicBool::new(false),
        });
        let tty = std::io::stderr().is_terminal();
        let q = p.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            while !q.done.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let el = start.elapsed().as_secs_f64();
                let ok = q.ok.load(Ordering::Relaxed);
                let frac = (el / duration.as_secs_f64().max(0.001)).min(1.0);
                let filled = (frac * 20.0) as usize;
                if tty {
                    eprint!(
                        "\r[{}{}] {:<28} {:>5.1}s {:>9} ok {:>6} err {:>9.0}/s   ",
                        "#".repeat(filled),
                        ".".repeat(20 - filled),
                        q.label,
                        el,
                        ok,
                        q.err.load(Ordering::Relaxed),
                        ok as f64 / el.max(0.001)
                    );
                }
            }
            if tty {
                eprintln!();
            }
        });
        p
    }

    fn finish(&self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

async fn connect_tls(
    addr: SocketAddr,
    cfg: Arc<ClientConfig>,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, bool), &'static str> {
    let tcp = TcpStream::connect(addr).await.map_err(|_| "connect")?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|_| "tls")?;
    let resumed = matches!(
        tls.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    Ok((tls, resumed))
}

/// An open connection ready to send requests.
pub enum Sender {
    /// HTTP/1.1.
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    /// HTTP/2.
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Sender {
    /// Sends one request and reads the whole response; returns its status.
    pub async fn send(
        &mut self,
        req: Request<Empty<Bytes>>,
    ) -> Result<http::StatusCode, &'static str> {
        let resp = match self {
            Sender::H1(s) => {
                s.ready().await.map_err(|_| "http")?;
                s.send_request(req).await
            }
            Sender::H2(s) => {
                s.ready().await.map_err(|_| "http")?;
                s.send_request(req).await
            }
        }
        .map_err(|_| "http")?;
        let status = resp.status();
        resp.into_body().collect().await.map_err(|_| "body")?;
        Ok(status)
    }
}

/// Opens one connection (TLS with `cfg` when the target is TLS).
pub async fn open(
    target: &Target,
    cfg: Option<Arc<ClientConfig>>,
    proto: Proto,
    res: &mut LoadResult,
) -> Result<Sender, &'static str> {
    macro_rules! handshake {
        ($io:expr) => {
            match proto {
                Proto::H1 => {
                    let (s, c) = hyper::client::conn::http1::handshake($io)
                        .await
                        .map_err(|_| "http")?;
                    tokio::spawn(c);
                    Sender::H1(s)
                }
                Proto::H2 => {
                    let (s, c) = hyper::client::conn::http2::handshake(TokioExecutor::new(), $io)
                        .await
                        .map_err(|_| "http")?;
                    tokio::spawn(c);
                    Sender::H2(s)
                }
            }
        };
    }
    res.connections += 1;
    match cfg {
        Some(cfg) if target.tls => {
            let (tls, resumed) = connect_tls(target.addr, cfg).await?;
            res.resumed += u64::from(resumed);
            Ok(handshake!(TokioIo::new(tls)))
        }
        _ => {
            let tcp = TcpStream::connect(target.addr)
                .await
                .map_err(|_| "connect")?;
            let _ = tcp.set_nodelay(true);
            Ok(handshake!(TokioIo::new(tcp)))
        }
    }
}

/// A GET for the target's path.
///
/// HTTP/1.1 gets the origin form with a `Host` header; HTTP/2 the absolute
/// form, from which hyper derives `:scheme` and `:authority`.
pub fn request(target: &Target, proto: Proto, close: bool) -> Request<Empty<Bytes>> {
    let mut b = match proto {
        Proto::H1 => Request::get(target.path.as_str()).header("host", target.addr.to_string()),
        Proto::H2 => Request::get(format!("https://{}{}", target.addr, target.path)),
    };
    if close {
        b = b.header("connection", "close");
    }
    // Building a GET with a valid URI cannot fail.
    b.body(Empty::new()).expect("valid request")
}

/// Keep-alive load: `spec.concurrency` connections, connection `i` using
/// `configs[i % len]` (one agent each), requests back to back or on schedule.
pub async fn keepalive(
    target: &Target,
    configs: &[Arc<ClientConfig>],
    spec: &LoadSpec,
    label: &str,
) -> LoadResult {
    let progress = Progress::start(label, spec.duration);
    let budget = Arc::new(AtomicU64::new(spec.max_requests));
    let start = Instant::now();
    let deadline = start + spec.duration;
    let interval = spec
        .rate
        .map(|r| Duration::from_secs_f64(spec.concurrency as f64 / r.max(0.001)));
    let mut tasks = Vec::new();
    for i in 0..spec.concurrency {
        let target = target.clone();
        let cfg = configs.get(i % configs.len().max(1)).cloned();
        let budget = budget.clone();
        let progress = progress.clone();
        let proto = spec.proto;
        tasks.push(tokio::spawn(async move {
            let mut res = LoadResult::new();
            let mut sender: Option<Sender> = None;
            let mut next = Instant::now();
            while Instant::now() < deadline {
                if budget
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
                    .is_err()
                {
                    break;
                }
                if interval.is_some() {
                    let now = Instant::now();
                    if next > now {
                        tokio::time::sleep(next - now).await;
                    }
                }
                let scheduled = if interval.is_some() {
                    next
                } else {
                    Instant::now()
                };
                if let Some(iv) = interval {
                    next += iv;
                }
                if sender.is_none() {
                    match tokio::time::timeout_at(
                        deadline.into(),
                        open(&target, cfg.clone(), proto, &mut res),
                    )
                    .await
                    {
                        Ok(Ok(s)) => sender = Some(s),
                        Ok(Err(kind)) => {
                            res.error(kind);
                            progress.err.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                        Err(_) => break,
                    }
                }
                let Some(s) = sender.as_mut() else { continue };
                match tokio::time::timeout_at(
                    deadline.into(),
                    s.send(request(&target, proto, false)),
                )
                .await
                {
                    Ok(Ok(status)) if status.is_success() => {
                        let us = scheduled.elapsed().as_micros().max(1) as u64;
                        let _ = res.hist.record(us.min(60_000_000));
                        res.ok += 1;
                        progress.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Ok(status)) => {
                        res.error(format!("status_{}", status.as_u16()));
                        progress.err.fetch_add(1, Ordering::Relaxed);
                        if proto == Proto::H1 {
                            sender = None; // the server may close after an error
                        }
                    }
                    Ok(Err(kind)) => {
                        res.error(kind);
                        progress.err.fetch_add(1, Ordering::Relaxed);
                        sender = None;
                    }
                    Err(_) => break,
                }
            }
            res
        }));
    }
    let mut total = LoadResult::new();
    for t in tasks {
        if let Ok(r) = t.await {
            total.merge(r);
        }
    }
    total.elapsed = start.elapsed();
    progress.finish();
    total
}

/// Handshake load: every request on a new TLS connection (`connection:
/// close`). With configurations built without resumption every handshake is
/// full; the result counts resumed handshakes so a report can prove it.
pub async fn handshakes(
    target: &Target,
    configs: &[Arc<ClientConfig>],
    spec: &LoadSpec,
    label: &str,
) -> LoadResult {
    let progress = Progress::start(label, spec.duration);
    let budget = Arc::new(AtomicU64::new(spec.max_requests));
    let start = Instant::now();
    let deadline = start + spec.duration;
    let mut tasks = Vec::new();
    for i in 0..spec.concurrency {
        let target = target.clone();
        let configs: Vec<_> = configs.to_vec();
        let budget = budget.clone();
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            let mut res = LoadResult::new();
            let mut n = i;
            while Instant::now() < deadline {
                if budget
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
                    .is_err()
                {
                    break;
                }
                let cfg = configs.get(n % configs.len().max(1)).cloned();
                n += spec_stride(configs.len());
                let t0 = Instant::now();
                let one = async {
                    let mut s = open(&target, cfg, Proto::H1, &mut res).await?;
                    s.send(request(&target, Proto::H1, true)).await
                };
                match tokio::time::timeout_at(deadline.into(), one).await {
                    Ok(Ok(status)) if status.is_success() => {
                        let _ = res
                            .hist
                            .record((t0.elapsed().as_micros().max(1) as u64).min(60_000_000));
                        res.ok += 1;
                        progress.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Ok(status)) => {
                        res.error(format!("status_{}", status.as_u16()));
                        progress.err.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(kind)) => {
                        res.error(kind);
                        progress.err.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => break,
                }
            }
            res
        }));
    }
    let mut total = LoadResult::new();
    for t in tasks {
        if let Ok(r) = t.await {
            total.merge(r);
        }
    }
    total.elapsed = start.elapsed();
    progress.finish();
    total
}

/// Step through identities so concurrent workers use different agents.
fn spec_stride(len: usize) -> usize {
    if len > 1 {
        7
    } else {
        1
    }
}

/// Holds `count` idle mTLS connections (each after one successful request)
/// until the returned guard is dropped. Returns how many were established.
pub async fn idle_connections(
    target: &Target,
    configs: &[Arc<ClientConfig>],
    count: usize,
) -> (Vec<Sender>, LoadResult) {
    let mut res = LoadResult::new();
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let cfg = configs.get(i % configs.len().max(1)).cloned();
        match open(target, cfg, Proto::H1, &mut res).await {
            Ok(mut s) => match s.send(request(target, Proto::H1, false)).await {
                Ok(st) if st.is_success() => {
                    res.ok += 1;
                    held.push(s);
                }
                Ok(st) => res.error(format!("status_{}", st.as_u16())),
                Err(k) => res.error(k),
            },
            Err(k) => res.error(k),
        }
    }
    (held, res)
}
