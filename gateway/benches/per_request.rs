//! The gateway's per-request work without sockets: the revocation check on a
//! cache hit, and the header rewrite (strip client identity headers, inject
//! the connection's prepared identity headers and assertion).
//!
//! Needs Redis (the check is primed through the real lookup path):
//! `ONEPROTECT_TEST_REDIS_URL` or `redis://127.0.0.1:6379`.
//!
//! Run: `cargo bench -p oneprotect-gateway --bench per_request`

#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use oneprotect_gateway::assertion::AssertionService;
use oneprotect_gateway::config::{AssertionConfig, RevocationConfig};
use oneprotect_gateway::conn::{ConnIdentity, IdentityContext};
use oneprotect_gateway::headers::{inject_identity, strip_client_headers, StripPolicy};
use oneprotect_gateway::metrics::Metrics;
use oneprotect_gateway::revocation::{Decision, Revocation};
use oneprotect_identity::{AgentIdentity, AssertionSigner, KeySchema};
use pingora::http::RequestHeader;

fn setup() -> (
    tokio::runtime::Runtime,
    Arc<Revocation>,
    ConnIdentity,
    Arc<AssertionService>,
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let pki = oneprotect_testpki::TestPki::new("oneprotect.test");
    let ca = pki.tenant_ca(&uuid::Uuid::new_v4().to_string());
    let leaf = ca.agent(&uuid::Uuid::new_v4().to_string());
    let id = Arc::new(AgentIdentity::from_chain(&leaf.cert_der, &ca.cert_der).unwrap());
    let redis_url = std::env::var("ONEPROTECT_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("bench:{}:", uuid::Uuid::new_v4().simple());
    let cfg = RevocationConfig {
        redis_url: redis_url.clone(),
        key_prefix: prefix.clone(),
        ..RevocationConfig::default()
    };
    let revocation = Arc::new(Revocation::new(&cfg, Metrics::new()).unwrap());
    let (signer, _) = AssertionSigner::generate("bench").unwrap();
    let assertions = Arc::new(AssertionService::new(signer, &AssertionConfig::default()));
    let ctx = IdentityContext {
        keys: KeySchema::new(prefix),
        assertions: assertions.clone(),
        xfcc_by: None,
    };
    let conn = ConnIdentity::new(id, &ctx);
    rt.block_on(async {
        let client = redis::Client::open(redis_url.as_str()).unwrap();
        let mut r = client.get_multiplexed_async_connection().await.unwrap();
        let [ck, ak] = conn.redis_keys();
        let _: () = redis::cmd("SET")
            .arg(ck)
            .arg("active")
            .query_async(&mut r)
            .await
            .unwrap();
        let _: () = redis::cmd("SET")
            .arg(ak)
            .arg("active")
            .query_async(&mut r)
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::watch::channel(false);
        std::mem::forget(tx);
        let sub = revocation.clone();
        tokio::spawn(async move { sub.run_subscriber(rx).await });
        for _ in 0..200 {
            if revocation.is_confirmed() && revocation.check(&conn).await == Decision::Allow {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(revocation.check(&conn).await, Decision::Allow);
        let _: () = redis::cmd("DEL")
            .arg(ck)
            .arg(ak)
            .query_async(&mut r)
            .await
            .unwrap();
    });
    (rt, revocation, conn, assertions)
}

fn request() -> RequestHeader {
    let mut req = RequestHeader::build("POST", b"/api/v1/telemetry/batch", None).unwrap();
    req.append_header("Host", "gateway.oneprotect.local")
        .unwrap();
    req.append_header("User-Agent", "oneprotect-agent/1.0")
        .unwrap();
    req.append_header("Accept", "application/json").unwrap();
    req.append_header("Content-Type", "application/json")
        .unwrap();
    req.append_header("Content-Length", "512").unwrap();
    req
}

fn bench(c: &mut Criterion) {
    let (rt, revocation, conn, assertions) = setup();
    c.bench_function("revocation check (cache hit)", |b| {
        b.iter(|| {
            let d = rt.block_on(revocation.check(&conn));
            assert_eq!(d, Decision::Allow);
        })
    });
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let rc: oneprotect_gateway::config::RouteConfig =
        toml::from_str("prefix = \"/\"\nupstreams = [\"127.0.0.1:1\"]\nhealth_check_secs = 0")
            .unwrap();
    let route = oneprotect_gateway::routes::Route::new(&rc, 0, Default::default()).unwrap();
    c.bench_function("assertion (cached per connection)", |b| {
        b.iter(|| conn.assertion(&assertions, &route, now))
    });
    let base = request();
    c.bench_function("request header clone (baseline)", |b| {
        b.iter(|| base.clone())
    });
    c.bench_function("header rewrite: clone + strip + inject 6", |b| {
        b.iter(|| {
            let mut req = base.clone();
            strip_client_headers(&mut req, StripPolicy::default());
            inject_identity(&mut req, &conn, conn.assertion(&assertions, &route, now)).unwrap();
            req
        })
    });
    let mut spoofed = request();
    spoofed
        .append_header("X-OneProtect-Tenant-Id", "spoof")
        .unwrap();
    spoofed.append_header("client-cert", ":Zm9v:").unwrap();
    c.bench_function("header rewrite with 2 spoofed headers", |b| {
        b.iter(|| {
            let mut req = spoofed.clone();
            strip_client_headers(&mut req, StripPolicy::default());
            inject_identity(&mut req, &conn, conn.assertion(&assertions, &route, now)).unwrap();
            req
        })
    });
    c.bench_function("assertion sign (what caching saves)", |b| {
        let id = conn.identity().clone();
        let (signer, _) = AssertionSigner::generate("bench").unwrap();
        let svc = AssertionService::new(signer, &AssertionConfig::default());
        let mut t = now;
        b.iter(|| {
            // A new second every time: never a cache hit.
            t += 1000;
            svc.get(&id, 0, "workers", t)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
