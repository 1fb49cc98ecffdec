//! The gateway end to end: real sockets, real Redis, an in-process pingora
//! gateway, a tiny echo upstream, and clients we did not write (`curl`).
//!
//! Run: `cargo test -p oneprotect-tests --test suite gateway::` (needs Redis
//! on 127.0.0.1:6379, `redis-server` and `curl` on the PATH).

// The helpers below run only inside tests, where a panic with its message is the failure report
// (clippy's allow-unwrap-in-tests covers `#[test]` functions but not their helpers).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use oneprotect_identity::{headers, AgentIdentity};
use oneprotect_testpki::{Leaf, LeafSpec, TenantCa, TestPki};
use redis::AsyncCommands;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

use crate::support::gateway::{
    echo, h1_send, only, read, refused, request, start_gateway, upstream_headers, write, Opts,
    EXCHANGE, TD,
};
use crate::support::redis::RedisChild;

const SPOOFS: &[(&str, &str)] = &[
    (
        "X-OneProtect-Tenant-Id",
        "00000000-0000-4000-8000-000000000000",
    ),
    (
        "x-oneprotect-tenant-id",
        "11111111-1111-4111-8111-111111111111",
    ),
    ("X-ONEPROTECT-IDENTITY-ASSERTION", "forged"),
    ("X-Forwarded-Client-Cert", "By=evil;URI=spiffe://evil"),
    ("Client-Cert", ":Zm9v:"),
    ("client-cert-chain", ":Zm9v:"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_cert_reaches_upstream_with_exactly_the_injected_identity_headers() {
    let gw = start_gateway(Opts::shared_redis()).await;
    let (mut s, _task) = gw.h1(Some((&gw.leaf, &gw.ca))).await.unwrap();
    let r = h1_send(&mut s, "/api/things", SPOOFS).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["path"], "/api/things");

    let id = &gw.id;
    assert_eq!(only(&r, headers::TENANT_ID), id.tenant().to_string());
    assert_eq!(only(&r, headers::AGENT_ID), id.agent().to_string());
    assert_eq!(only(&r, headers::CERT_SERIAL), id.serial().to_string());
    assert_eq!(only(&r, headers::SPIFFE_ID), id.uri().to_string());
    let not_after = time::OffsetDateTime::parse(
        &only(&r, headers::CERT_NOT_AFTER),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(not_after.unix_timestamp(), id.not_after());
    let assertion = only(&r, headers::IDENTITY_ASSERTION);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let verified = gw.verifier.verify(&assertion, now).unwrap();
    assert_eq!(verified.claims.agent_id, id.agent());
    assert_eq!(verified.claims.cert_sha256, id.fingerprint());

    // Exactly the injected set: nothing else with our prefix, no foreign
    // identity header.
    let ours: Vec<&String> = upstream_headers(&r)
        .keys()
        .filter(|k| headers::is_client_identity_header(k))
        .collect();
    assert_eq!(ours.len(), headers::INJECTED.len(), "{ours:?}");
    for name in headers::INJECTED {
        assert!(ours.iter().any(|k| *k == name), "{name} missing");
    }

    // Same connection, second request: same assertion (signed once).
    let r2 = h1_send(&mut s, "/api/again", &[]).await.unwrap();
    assert_eq!(r2.status, 200);
    assert_eq!(only(&r2, headers::IDENTITY_ASSERTION), assertion);

    let (status, metrics) = gw.admin_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("oneprotect_gateway_requests_total"),
        "{metrics}"
    );
    assert!(metrics.contains("oneprotect_gateway_revocation_cache_hits_total"));
    assert!(
        metrics.contains("oneprotect_gateway_redis_connected 1"),
        "{metrics}"
    );
    assert_eq!(gw.admin_get("/healthz").await.0, 200);
    gw.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_without_identity_and_requests_without_a_certificate() {
    let gw = start_gateway(Opts::shared_redis()).await;
    let (mut s, _task) = gw.h1(None).await.unwrap();
    // The enrollment exchange needs no certificate; spoofed identity headers
    // are still removed and none injected.
    let r = h1_send(&mut s, EXCHANGE, SPOOFS).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        !upstream_headers(&r)
            .keys()
            .any(|k| headers::is_client_identity_header(k)),
        "{}",
        r.body
    );
    // Everything else needs one.
    let r = h1_send(&mut s, "/api/things", SPOOFS).await.unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.body["code"], "identity_required");
    assert_eq!(
        r.headers.get("content-type").unwrap(),
        "application/problem+json"
    );
    let r = h1_send(&mut s, "/nowhere", &[]).await.unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.body["code"], "route_not_found");
    gw.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_certificates_are_refused_at_the_handshake() {
    let gw = start_gateway(Opts::shared_redis()).await;
    let agent = uuid::Uuid::new_v4().to_string();

    let foreign = TestPki::new(TD).tenant_ca(&gw.ca.tenant);
    assert!(
        refused(&gw, &foreign.agent(&agent), &foreign).await,
        "foreign CA"
    );

    let now = time::OffsetDateTime::now_utc();
    let mut spec = LeafSpec::agent(&gw.ca, &agent);
    spec.not_before = now - time::Duration::days(2);
    spec.not_after = now - time::Duration::days(1);
    assert!(refused(&gw, &gw.ca.leaf(&spec), &gw.ca).await, "expired");

    let mut spec = LeafSpec::agent(&gw.ca, &agent);
    spec.not_before = now + time::Duration::days(1);
    spec.not_after = now + time::Duration::days(2);
    assert!(
        refused(&gw, &gw.ca.leaf(&spec), &gw.ca).await,
        "not yet valid"
    );

    let mut spec = LeafSpec::agent(&gw.ca, &agent);
    spec.uris = vec![format!(
        "spiffe://{TD}/tenant/{}/agent/{agent}",
        uuid::Uuid::new_v4()
    )];
    assert!(
        refused(&gw, &gw.ca.leaf(&spec), &gw.ca).await,
        "tenant mismatch"
    );

    // The good leaf still works, and the failures were counted by reason.
    let (mut s, _t) = gw.h1(Some((&gw.leaf, &gw.ca))).await.unwrap();
    assert_eq!(h1_send(&mut s, "/api/x", &[]).await.unwrap().status, 200);
    let (_, metrics) = gw.admin_get("/metrics").await;
    for reason in ["expired", "not_yet_valid", "tenant_mismatch"] {
        assert!(
            metrics.contains(&format!("reason=\"{reason}\"")),
            "{reason}: {metrics}"
        );
    }
    gw.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_during_keep_alive_refuses_and_closes_the_connection() {
    let gw = start_gateway(Opts::shared_redis()).await;
    let (mut s, task) = gw.h1(Some((&gw.leaf, &gw.ca))).await.unwrap();
    assert_eq!(h1_send(&mut s, "/api/x", &[]).await.unwrap().status, 200);

    gw.revoke_cert().await;
    // The announcement travels asynchronously; poll on the same connection.
    let mut r = None;
    for _ in 0..100 {
        let resp = h1_send(&mut s, "/api/x", &[]).await.unwrap();
        if resp.status != 200 {
            r = Some(resp);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = r.expect("revocation never applied");
    assert_eq!(r.status, 403);
    assert_eq!(r.body["code"], "certificate_revoked");
    assert_eq!(r.headers.get("connection").unwrap(), "close");
    // The gateway closed the connection after the response.
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("connection closed")
        .unwrap();
    assert!(s.ready().await.is_err());

    // A new connection with the same certificate is refused too.
    let (mut s, _t) = gw.h1(Some((&gw.leaf, &gw.ca))).await.unwrap();
    assert_eq!(h1_send(&mut s, "/api/x", &[]).await.unwrap().status, 403);
    gw.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_after_agent_revocation_are_refused() {
    let gw = start_gateway(Opts::shared_redis()).await;
    let stream = gw
        .tls(gw.client(Some((&gw.leaf, &gw.ca)), b"h2"))
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut s, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut send = |path: &'static str| {
        let fut = s.send_request(request(path, SPOOFS));
        async move { read(fut.await.unwrap()).await.unwrap() }
    };
    let r = send("/api/a").await;
    assert_eq!(r.status, 200);
    assert_eq!(only(&r, headers::AGENT_ID), gw.id.agent().to_string());
    assert!(!upstream_headers(&r).contains_key("client-cert"));

    gw.revoke_agent().await;
    let mut status = 200;
    for _ in 0..100 {
        let r = send("/api/b").await;
        status = r.status;
        if status != 200 {
            assert_eq!(r.body["code"], "agent_revoked");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 403);
    // Every later stream on the same connection: 403.
    for _ in 0..3 {
        let r = send("/api/c").await;
        assert_eq!(r.status, 403);
        assert_eq!(r.body["code"], "agent_revoked");
    }
    gw.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_serves_until_max_staleness_then_fails_closed_and_recovers() {
    let redis = RedisChild::start(oneprotect_tests::free_port()).await;
    let port = redis.port;
    let gw = start_gateway(Opts {
        redis_url: format!("redis://127.0.0.1:{port}"),
        max_staleness_ms: 3000,
        heartbeat_ms: 200,
        require_client_cert: false,
        redis_up: true,
        routes: Vec::new(),
        extra_routes: String::new(),
        listener_extra: String::new(),
    })
    .await;
    let (mut s, _t) = gw.h1(Some((&gw.leaf, &gw.ca))).await.unwrap();
    assert_eq!(h1_send(&mut s, "/api/x", &[]).await.unwrap().status, 200);

    redis.stop().await;
    // Cached answers are still trusted for up to max_staleness...
    assert_eq!(h1_send(&mut s, "/api/x", &[]).await.unwrap().status, 200);
    // ...then the gateway fails closed.
    let mut last = None;
    for _ in 0..200 {
        let r = h1_send(&mut s, "/api/x", &[]).await.unwrap();
        if r.status != 200 {
            last = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = last.expect("never failed closed");
    assert_eq!(r.status, 503);
    assert_eq!(r.body["code"], "revocation_unavailable");
    assert!(r.headers.get("retry-after").is_some());
    assert_eq!(gw.admin_get("/readyz").await.0, 503);

    // Redis back (empty: the projection is rebuilt) -> recovers.
    let redis = RedisChild::start(port).await;
    gw.set_active(&gw.id).await;
    let mut status = 0;
    for _ in 0..200 {
        status = h1_send(&mut s, "/api/x", &[]).await.unwrap().status;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200);
    gw.wait_ready().await;
    drop(gw);
    redis.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_with_a_client_certificate() {
    let gw = start_gateway(Opts::shared_redis()).await;
    let (chain, key, root) = gw.client_pem_files();
    let port = gw.addr.port();
    let curl = |with_cert: bool| {
        let mut c = std::process::Command::new("curl");
        c.args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&root)
            .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
            .args([
                "-H",
                "X-OneProtect-Agent-Id: spoofed",
                "-H",
                "client-cert: :Zm9v:",
            ]);
        if with_cert {
            c.arg("--cert").arg(&chain).arg("--key").arg(&key);
        }
        c.arg(format!("https://localhost:{port}/api/curl"));
        tokio::task::spawn_blocking(move || c.output().unwrap())
    };
    let out = curl(true).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let h = body["headers"].as_object().unwrap();
    assert_eq!(
        h[headers::AGENT_ID],
        serde_json::json!([gw.id.agent().to_string()])
    );
    assert!(!h.contains_key("client-cert"));

    let out = curl(false).await.unwrap();
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(body["code"], "identity_required");
    gw.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_bundle_reload_keeps_open_connections() {
    let gw = start_gateway(Opts::shared_redis()).await;
    let (mut old, _t) = gw.h1(Some((&gw.leaf, &gw.ca))).await.unwrap();
    assert_eq!(h1_send(&mut old, "/api/x", &[]).await.unwrap().status, 200);

    // Rotate the platform root: only the new one is trusted from now on.
    let pki2 = TestPki::new(TD);
    let ca2 = pki2.tenant_ca(&uuid::Uuid::new_v4().to_string());
    let leaf2 = ca2.agent(&uuid::Uuid::new_v4().to_string());
    let id2 = AgentIdentity::from_chain(&leaf2.cert_der, &ca2.cert_der).unwrap();
    gw.set_active(&id2).await;
    write(gw.dir.path(), "bundle.pem", &pki2.root_pem());
    gw.trust.reload().unwrap();

    // The open connection keeps its verified identity.
    assert_eq!(h1_send(&mut old, "/api/x", &[]).await.unwrap().status, 200);
    // New handshakes use the new bundle. (The client trusts the old root for
    // the server certificate, which is unchanged.)
    assert!(refused(&gw, &gw.leaf, &gw.ca).await);
    let (mut s, _t) = gw.h1(Some((&leaf2, &ca2))).await.unwrap();
    let r = h1_send(&mut s, "/api/x", &[]).await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(only(&r, headers::AGENT_ID), id2.agent().to_string());
    gw.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_tls13_session_keeps_the_identity() {
    let gw = start_gateway(Opts::shared_redis()).await;
    let cfg = gw.client(Some((&gw.leaf, &gw.ca)), b"http/1.1");
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let stream = gw.tls(cfg.clone()).await.unwrap();
        kinds.push(stream.get_ref().1.handshake_kind());
        let (mut s, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let r = h1_send(&mut s, "/api/x", &[]).await.unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(only(&r, headers::AGENT_ID), gw.id.agent().to_string());
    }
    assert_eq!(kinds[0], Some(rustls::HandshakeKind::Full));
    assert_eq!(kinds[1], Some(rustls::HandshakeKind::Resumed));
    gw.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_a_problem_document() {
    let gw = start_gateway(Opts::shared_redis()).await;
    let (mut s, _t) = gw.h1(Some((&gw.leaf, &gw.ca))).await.unwrap();
    let r = h1_send(&mut s, "/dead/x", &[]).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.body["code"], "bad_gateway");
    assert_eq!(
        r.headers.get("content-type").unwrap(),
        "application/problem+json"
    );
    gw.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mandatory_client_certificate_refuses_certificate_less_handshakes() {
    let mut opts = Opts::shared_redis();
    opts.require_client_cert = true;
    let gw = start_gateway(opts).await;
    let failed = match gw.h1(None).await {
        Err(_) => true,
        Ok((mut s, _t)) => h1_send(&mut s, "/api/x", &[]).await.is_err(),
    };
    assert!(failed, "a certificate-less client got an HTTP answer");
    let (mut s, _t) = gw.h1(Some((&gw.leaf, &gw.ca))).await.unwrap();
    assert_eq!(h1_send(&mut s, "/api/x", &[]).await.unwrap().status, 200);
    gw.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_s_client_with_good_and_foreign_certificates() {
    let gw = start_gateway(Opts::shared_redis()).await;
    let dir = gw.dir.path();
    let root = write(dir, "root.pem", &gw.pki.root_pem());
    let port = gw.addr.port();
    let s_client = |leaf: &Leaf, ca: &TenantCa, name: &str| {
        let cert = write(dir, &format!("{name}.pem"), &leaf.cert_pem);
        // s_client sends only the first certificate of -cert; the issuing CA
        // goes in -cert_chain.
        let chain = write(dir, &format!("{name}-ca.pem"), &ca.cert_pem);
        let key = write(dir, &format!("{name}.key"), &leaf.key_pem);
        let mut c = std::process::Command::new("timeout");
        c.args(["10", "openssl", "s_client", "-quiet", "-no_ign_eof"])
            .args([
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                "localhost",
            ])
            .args(["-alpn", "http/1.1", "-verify_return_error", "-CAfile"])
            .arg(&root)
            .arg("-cert")
            .arg(&cert)
            .arg("-cert_chain")
            .arg(&chain)
            .arg("-key")
            .arg(&key)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut child = c.spawn().unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let _ = stdin.write_all(
                b"GET /api/s_client HTTP/1.1\r\nHost: localhost\r\nX-OneProtect-Agent-Id: spoofed\r\nConnection: close\r\n\r\n",
            );
            // Keep stdin open until the server closes the connection.
            let out = child.wait_with_output().unwrap();
            drop(stdin);
            (
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
    };
    let (out, err) = s_client(&gw.leaf, &gw.ca, "good").await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}\n{err}");
    assert!(out.contains(&gw.id.agent().to_string()), "{out}");
    assert!(!out.contains("spoofed"), "{out}");

    let foreign = TestPki::new(TD).tenant_ca(&gw.ca.tenant);
    let leaf = foreign.agent(&uuid::Uuid::new_v4().to_string());
    let (out, _) = s_client(&leaf, &foreign, "foreign").await.unwrap();
    assert!(!out.contains("HTTP/1.1"), "{out}");
    gw.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_announcement_is_detected_by_sequence_lag() {
    let mut opts = Opts::shared_redis();
    opts.heartbeat_ms = 100;
    let gw = start_gateway(opts).await;
    let (mut s, _t) = gw.h1(Some((&gw.leaf, &gw.ca))).await.unwrap();
    assert_eq!(h1_send(&mut s, "/api/x", &[]).await.unwrap().status, 200);
    let resets = |m: &str| {
        m.lines()
            .find(|l| l.starts_with("oneprotect_gateway_revocation_cache_resets_total "))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap()
    };
    let before = resets(&gw.admin_get("/metrics").await.1);
    // A publisher that died between INCR and PUBLISH.
    let mut r = gw.redis().await;
    let _: u64 = r.incr(gw.keys.revocation_seq(), 1).await.unwrap();
    let mut after = before;
    for _ in 0..200 {
        after = resets(&gw.admin_get("/metrics").await.1);
        if after > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(after > before, "lag never detected");
    // The distrusted cache is re-confirmed from Redis.
    assert_eq!(h1_send(&mut s, "/api/x", &[]).await.unwrap().status, 200);
    gw.cleanup().await;
}

/// An enroll-api switched to another shard count (ADR-0024) under a running
/// gateway writes keys and announcements this gateway no longer reads: the
/// gateway notices on its next heartbeat, stops confirming Redis and fails
/// closed at `max_staleness`; it serves again once the layouts agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_projection_layout_fails_closed_until_the_layouts_agree() {
    let mut opts = Opts::shared_redis();
    opts.heartbeat_ms = 100;
    opts.max_staleness_ms = 1000;
    let gw = start_gateway(opts).await;
    let (mut s, _t) = gw.h1(Some((&gw.leaf, &gw.ca))).await.unwrap();
    assert_eq!(h1_send(&mut s, "/api/x", &[]).await.unwrap().status, 200);
    let mut r = gw.redis().await;
    let _: () = r.set(gw.keys.projection_shards(), 12).await.unwrap();
    let mut last = None;
    for _ in 0..200 {
        let resp = h1_send(&mut s, "/api/x", &[]).await.unwrap();
        if resp.status != 200 {
            last = Some(resp);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let resp = last.expect("never failed closed after the layout changed");
    assert_eq!(resp.status, 503, "{}", resp.body);
    assert_eq!(resp.body["code"], "revocation_unavailable");
    assert_eq!(gw.admin_get("/readyz").await.0, 503);
    // The layouts agree again (1 recorded, or none): served again.
    let _: () = r.set(gw.keys.projection_shards(), 1).await.unwrap();
    gw.wait_ready().await;
    let (mut s, _t) = gw.h1(Some((&gw.leaf, &gw.ca))).await.unwrap();
    assert_eq!(h1_send(&mut s, "/api/x", &[]).await.unwrap().status, 200);
    gw.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_from_the_start_identity_routes_fail_closed() {
    // Nothing listens on this port.
    let mut opts = Opts::shared_redis();
    opts.redis_url = format!("redis://127.0.0.1:{}", oneprotect_tests::free_port());
    opts.redis_up = false;
    let gw = start_gateway(opts).await;
    assert_eq!(gw.admin_get("/readyz").await.0, 503);
    let (mut s, _t) = gw.h1(Some((&gw.leaf, &gw.ca))).await.unwrap();
    let r = h1_send(&mut s, "/api/x", &[]).await.unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.body["code"], "revocation_unavailable");
    assert!(r.headers.get("retry-after").is_some());
    // The enrollment exchange needs no revocation check.
    let (mut s, _t) = gw.h1(None).await.unwrap();
    assert_eq!(h1_send(&mut s, EXCHANGE, &[]).await.unwrap().status, 200);
}

/// A TLS upstream answering like [`start_echo`] ([`echo`])
/// with `server`'s certificate; with `client_root` it requires a client
/// certificate chaining to that root and records each one it saw.
async fn start_tls_echo(
    server: &oneprotect_testpki::Leaf,
    client_root: Option<Vec<u8>>,
) -> (SocketAddr, Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_root {
        Some(root) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(CertificateDer::from(root)).unwrap();
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(v)
        }
        None => builder.with_no_client_auth(),
    };
    let cfg = builder
        .with_single_cert(
            vec![CertificateDer::from(server.cert_der.clone())],
            PrivateKeyDer::try_from(server.key_der.clone()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let (acceptor, seen) = (acceptor.clone(), seen2.clone());
            tokio::spawn(async move {
                // A refused client certificate ends here.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Some(c) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                    seen.lock().unwrap().push(c.to_vec());
                }
                let svc = hyper::service::service_fn(echo);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// Upstream TLS per route: a private CA (`tls_ca_file`) verifies the
/// upstream's certificate, and the gateway presents its own client
/// certificate (`tls_client_cert`/`tls_client_key`) to an upstream that
/// requires one. Without the CA file the upstream's certificate is not
/// trusted — even though another route to the same upstream address and SNI
/// has just left a verified connection in pingora's pool (whose key leaves
/// the CA list out; the gateway keeps CA sets apart) — and without the
/// client certificate the upstream refuses the gateway: both are 502
/// `bad_gateway` problem documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstreams_with_a_private_ca_and_a_gateway_client_certificate() {
    let files = tempfile::tempdir().unwrap();
    let upstream_pki = TestPki::new("upstream.test");
    let upstream_cert = upstream_pki.server_cert(&["localhost"]);
    let client_pki = TestPki::new("gateway-client.test");
    let client_ca = client_pki.tenant_ca(&uuid::Uuid::new_v4().to_string());
    let client = client_ca.agent(&uuid::Uuid::new_v4().to_string());
    let (mtls, seen) = start_tls_echo(&upstream_cert, Some(client_pki.root_der())).await;
    let (tls_only, _) = start_tls_echo(&upstream_cert, None).await;
    let ca = write(files.path(), "upstream-ca.pem", &upstream_pki.root_pem());
    let chain = write(
        files.path(),
        "client.pem",
        &format!("{}{}", client.cert_pem, client_ca.cert_pem),
    );
    let key = write(files.path(), "client.key", &client.key_pem);
    let (ca, chain, key) = (ca.display(), chain.display(), key.display());
    let mut opts = Opts::shared_redis();
    opts.extra_routes = format!(
        r#"
[[routes]]
prefix = "/mtls"
upstreams = ["{mtls}"]
tls = true
sni = "localhost"
tls_ca_file = "{ca}"
tls_client_cert = "{chain}"
tls_client_key = "{key}"
health_check_secs = 0

[[routes]]
prefix = "/no-client-cert"
upstreams = ["{mtls}"]
tls = true
sni = "localhost"
tls_ca_file = "{ca}"
health_check_secs = 0

[[routes]]
prefix = "/tls"
upstreams = ["{tls_only}"]
tls = true
sni = "localhost"
tls_ca_file = "{ca}"
health_check_secs = 0

[[routes]]
prefix = "/untrusted"
upstreams = ["{tls_only}"]
tls = true
sni = "localhost"
health_check_secs = 0
"#
    );
    let gw = start_gateway(opts).await;
    let agent = Some((&gw.leaf, &gw.ca));

    let (mut s, _t) = gw.h1(agent).await.unwrap();
    let r = h1_send(&mut s, "/mtls/x", SPOOFS).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["path"], "/mtls/x");
    assert_eq!(
        only(&r, oneprotect_identity::headers::AGENT_ID),
        gw.id.agent().to_string()
    );
    assert_eq!(
        seen.lock().unwrap().first(),
        Some(&client.cert_der),
        "the upstream saw the gateway's client certificate"
    );
    let (mut s, _t) = gw.h1(agent).await.unwrap();
    let r = h1_send(&mut s, "/tls/x", &[]).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);

    for path in ["/no-client-cert/x", "/untrusted/x"] {
        let (mut s, _t) = gw.h1(agent).await.unwrap();
        let r = h1_send(&mut s, path, &[]).await.unwrap();
        assert_eq!(r.status, 502, "{path}: {}", r.body);
        assert_eq!(r.body["code"], "bad_gateway", "{path}");
    }
    // Only the one route with a client certificate got through to it.
    assert_eq!(seen.lock().unwrap().len(), 1);
    gw.cleanup().await;
}
