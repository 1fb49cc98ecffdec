//! Keep-alive load through the gateway vs. straight to the upstream, same
//! run, same process: an echo upstream, an in-process gateway (one proxy
//! thread), and `CONNS` HTTP/1.1 keep-alive clients each sending `REQS`
//! requests. Prints requests/second for both. The client shares the CPU
//! with the gateway, so read the ratio, not the absolute numbers.
//!
//! Needs Redis on 127.0.0.1:6379 (or `ONEPROTECT_TEST_REDIS_URL`).
//!
//! Run: `cargo run --release -p oneprotect-gateway --example keepalive_load`

#![allow(missing_docs, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

const CONNS: usize = 8;
const REQS: usize = 5_000;

async fn echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn run<S>(conns: Vec<S>) -> f64
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let start = Instant::now();
    let mut tasks = Vec::new();
    for s in conns {
        tasks.push(tokio::spawn(async move {
            let (mut tx, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(
                hyper_util::rt::TokioIo::new(s),
            )
            .await
            .unwrap();
            tokio::spawn(conn);
            for _ in 0..REQS {
                tx.ready().await.unwrap();
                let req = hyper::Request::get("/api/bench")
                    .header("host", "localhost")
                    .body(Empty::new())
                    .unwrap();
                let resp = tx.send_request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                resp.into_body().collect().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (CONNS * REQS) as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let upstream = rt.block_on(echo());
    let dir = tempfile::tempdir().unwrap();
    let pki = oneprotect_testpki::TestPki::new("oneprotect.test");
    let ca = pki.tenant_ca(&uuid::Uuid::new_v4().to_string());
    let leaf = ca.agent(&uuid::Uuid::new_v4().to_string());
    let id = oneprotect_identity::AgentIdentity::from_chain(&leaf.cert_der, &ca.cert_der).unwrap();
    let server = pki.server_cert(&["localhost"]);
    let w = |n: &str, t: &str| {
        let p = dir.path().join(n);
        std::fs::write(&p, t).unwrap();
        p.display().to_string()
    };
    let (cert, key, bundle) = (
        w("s.pem", &server.cert_pem),
        w("s.key", &server.key_pem),
        w("b.pem", &pki.root_pem()),
    );
    let redis_url = std::env::var("ONEPROTECT_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("bench:{}:", uuid::Uuid::new_v4().simple());
    let (port, admin) = (free_port(), free_port());
    let toml = format!(
        "[listener]\nlisten = \"127.0.0.1:{port}\"\ncert = \"{cert}\"\nkey = \"{key}\"\ntrust_bundle = \"{bundle}\"\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n[revocation]\nredis_url = \"{redis_url}\"\nkey_prefix = \"{prefix}\"\n\
         [runtime]\nthreads = 1\ngraceful_shutdown_secs = 0\n[[routes]]\nprefix = \"/api\"\nupstreams = [\"{upstream}\"]\n"
    );
    let cfg = oneprotect_gateway::Prepared::load(
        oneprotect_gateway::Config::from_toml(&toml, std::path::Path::new("bench")).unwrap(),
    )
    .unwrap();
    let keys = oneprotect_identity::KeySchema::new(prefix);
    rt.block_on(async {
        let c = redis::Client::open(redis_url.as_str()).unwrap();
        let mut r = c.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("SET")
            .arg(keys.cert_status(&id.tenant(), &id.serial()))
            .arg("active")
            .query_async(&mut r)
            .await
            .unwrap();
        let _: () = redis::cmd("SET")
            .arg(keys.agent_status(&id.tenant(), &id.agent()))
            .arg("active")
            .query_async(&mut r)
            .await
            .unwrap();
    });
    let gw = oneprotect_gateway::build(cfg).unwrap().spawn();
    std::thread::sleep(Duration::from_millis(1500));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(pki.root_der())).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![
            CertificateDer::from(leaf.cert_der.clone()),
            CertificateDer::from(ca.cert_der),
        ],
        PrivateKeyDer::try_from(leaf.key_der).unwrap(),
    )
    .unwrap();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));

    for round in 0..2 {
        let direct = rt.block_on(async {
            let mut v = Vec::new();
            for _ in 0..CONNS {
                v.push(TcpStream::connect(upstream).await.unwrap());
            }
            run(v).await
        });
        let via = rt.block_on(async {
            let mut v = Vec::new();
            for _ in 0..CONNS {
                let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                v.push(
                    connector
                        .connect(ServerName::try_from("localhost").unwrap(), tcp)
                        .await
                        .unwrap(),
                );
            }
            run(v).await
        });
        println!(
            "round {round}: {CONNS} keep-alive connections x {REQS} requests: direct {direct:.0} req/s, via gateway (mTLS, revocation check, header rewrite) {via:.0} req/s ({:.2}x)",
            via / direct
        );
    }
    rt.block_on(async {
        let c = redis::Client::open(redis_url.as_str()).unwrap();
        let mut r = c.get_multiplexed_async_connection().await.unwrap();
        let _: () = redis::cmd("DEL")
            .arg(keys.cert_status(&id.tenant(), &id.serial()))
            .arg(keys.agent_status(&id.tenant(), &id.agent()))
            .query_async(&mut r)
            .await
            .unwrap();
    });
    gw.stop();
}
