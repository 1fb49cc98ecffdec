//! Secrets never reach the logs: every event at TRACE level, from creating a
//! token through a good exchange, a replay, a bad CSR and a wrong admin key,
//! is captured and scanned. Its own test binary, so the process-wide
//! subscriber sees nothing but this flow.

// Helpers run only inside the test; a panic with its message is the report.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use oneprotect_enroll_api::ca::Ca;
use oneprotect_enroll_api::clock::{SharedClock, SystemClock};
use oneprotect_enroll_api::http::{router, AppState, Inner};
use oneprotect_enroll_api::ratelimit::RateLimiter;
use oneprotect_enroll_api::secrets::{new_admin_key, Pepper};
use oneprotect_enroll_api::store::{AnyStore, NewAdminKey, Store, Tenant};
use oneprotect_identity::TenantId;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn call(
    state: &AppState,
    method: &str,
    uri: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    let req = match body {
        Some(v) => b
            .header("content-type", "application/json")
            .body(Body::from(v.to_string())),
        None => b.body(Body::empty()),
    }
    .unwrap();
    let resp = router(state.clone()).oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_the_logs() {
    let captured = Captured::default();
    let sink = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || sink.clone())
        .init();

    let dir = tempfile::tempdir().unwrap();
    let clock: SharedClock = Arc::new(SystemClock);
    let store = AnyStore::open_sqlite(&dir.path().join("db"), 4)
        .await
        .unwrap();
    let ca = Ca::open(
        &dir.path().join("ca"),
        "oneprotect.test".parse().unwrap(),
        clock.clone(),
        true,
    )
    .unwrap();
    let state = AppState::new(Inner {
        store,
        ca: Arc::new(ca),
        pepper: Pepper::from_bytes(&[9; 32]),
        clock: clock.clone(),
        per_address: RateLimiter::new(600, 100, 1000),
        per_token: RateLimiter::new(600, 100, 1000),
        token_cache: Default::default(),
        max_body_bytes: 64 * 1024,
        body_read_timeout: std::time::Duration::from_secs(10),
        trusted_proxies: Default::default(),
        projection: None,
        assertions: oneprotect_identity::AssertionVerifier::new("enroll-api"),
        jwks: oneprotect_enroll_api::http::keys::PublishedKeys::new(&[]),
        rotation_grace: time::Duration::hours(1),
        reuse_window: std::time::Duration::from_secs(3600),
        metrics: oneprotect_enroll_api::metrics::Metrics::new(),
        enforcer: oneprotect_enroll_api::enforce::Enforcer::new(
            None,
            std::time::Duration::from_millis(500),
        ),
    });
    let tenant = Tenant {
        id: TenantId::random(),
        name: "acme".into(),
        leaf_lifetime_secs: 3600,
        created_at: clock.now(),
    };
    state.store.create_tenant(&tenant).await.unwrap();
    let key = new_admin_key().unwrap();
    state
        .store
        .create_admin_key(&NewAdminKey {
            id: uuid::Uuid::new_v4(),
            tenant_id: tenant.id,
            name: "ops".into(),
            key_hash: state.pepper.hash(key.expose_secret()),
            created_at: clock.now(),
        })
        .await
        .unwrap();
    let key = key.expose_secret().to_owned();

    let (status, created) = call(
        &state,
        "POST",
        "/api/v1/agent-enrollment/tokens",
        Some(&key),
        Some(json!({"max_uses": 1})),
    )
    .await;
    assert_eq!(status, 201);
    let token = created["token"].as_str().unwrap().to_owned();
    let token_id = created["token_id"].as_str().unwrap().to_owned();
    let csr = {
        let k = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::default()
            .serialize_request(&k)
            .unwrap()
            .pem()
            .unwrap()
    };
    let body = |csr: &str| json!({"token": token, "csr_pem": csr, "agent": {"hostname": "h", "os": "linux", "agent_version": "1"}});
    let ex = "/api/v1/agent-enrollment/exchange";
    assert_eq!(
        call(&state, "POST", ex, None, Some(body("bad csr")))
            .await
            .0,
        400
    );
    assert_eq!(
        call(&state, "POST", ex, None, Some(body(&csr))).await.0,
        201
    );
    assert_eq!(
        call(&state, "POST", ex, None, Some(body(&csr))).await.0,
        401
    );
    assert_eq!(
        call(
            &state,
            "GET",
            "/api/v1/agents",
            Some(&format!("{key}x")),
            None
        )
        .await
        .0,
        401
    );
    assert_eq!(
        call(&state, "GET", "/api/v1/agents", Some(&key), None)
            .await
            .0,
        200
    );

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("agent enrolled"), "nothing captured: {text}");
    assert!(text.contains(&token_id));
    assert!(!text.contains(&token[5..]), "token secret in logs");
    assert!(!text.contains(&key[5..]), "admin key in logs");
    assert!(!text.contains("opet_") && !text.contains("opak_"));
}
