//! The trivial upstream every target proxies to: answers `200 ok` to any
//! request, counts connections and requests (so a report can show whether a
//! proxy kept its upstream connections alive), and serves those counts at
//! `GET /__stats`. Runs as its own process (`oneprotect-bench upstream`) so
//! its CPU is accounted separately from the load generator's.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Counters of the upstream.
#[derive(Default, Debug)]
pub struct Stats {
    /// Accepted connections.
    pub connections: AtomicU64,
    /// Requests served.
    pub requests: AtomicU64,
}

/// Serves forever on `listener`.
pub async fn serve(listener: TcpListener) -> std::io::Result<()> {
    let stats = Arc::new(Stats::default());
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let stats = stats.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let stats = stats.clone();
                async move {
                    stats.requests.fetch_add(1, Ordering::Relaxed);
                    let body = if req.uri().path() == "/__stats" {
                        Bytes::from(format!(
                            "{{\"connections\":{},\"requests\":{}}}",
                            stats.connections.load(Ordering::Relaxed),
                            stats.requests.load(Ordering::Relaxed)
                        ))
                    } else {
                        Bytes::from_static(b"ok\n")
                    };
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(body)))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// Binds `addr` (port 0 for any) and prints `listening <addr>` on stdout.
pub async fn run(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    println!("listening {}", listener.local_addr()?);
    serve(listener).await?;
    Ok(())
}
