use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use oneprotect_identity::AgentIdentity;
use rustls_pki_types::{pem::PemObject, CertificateDer};

use super::*;
use crate::clock::{Clock, FixedClock};
use crate::store::{NewAdminKey, Tenant};
use time::OffsetDateTime;

struct Fixture {
    _dir: tempfile::TempDir,
    state: AppState,
    clock: FixedClock,
    tenant: TenantId,
    key: String,
    other_key: String,
}

async fn admin(state: &AppState, tenant: TenantId) -> String {
    let key = crate::secrets::new_admin_key().unwrap();
    state
        .store
        .create_admin_key(&NewAdminKey {
            id: Uuid::new_v4(),
            tenant_id: tenant,
            name: "test".into(),
            key_hash: state.pepper.hash(key.expose_secret()),
            created_at: state.clock.now(),
        })
        .await
        .unwrap();
    key.expose_secret().to_owned()
}

async fn tenant(state: &AppState) -> TenantId {
    let t = Tenant {
        id: TenantId::random(),
        name: "acme".into(),
        leaf_lifetime_secs: 3000,
        created_at: state.clock.now(),
    };
    state.store.create_tenant(&t).await.unwrap();
    t.id
}

async fn fixture_with(per_token_burst: u32, per_address_burst: u32) -> Fixture {
    fixture_full(per_token_burst, per_address_burst, None).await
}

async fn fixture_full(
    per_token_burst: u32,
    per_address_burst: u32,
    projection: Option<crate::projection::Projection>,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let clock = FixedClock::new(OffsetDateTime::now_utc());
    let shared: crate::clock::SharedClock = Arc::new(clock.clone());
    let store = AnyStore::open_sqlite(&dir.path().join("db"), 4)
        .await
        .unwrap();
    let ca = Ca::open(
        &dir.path().join("ca"),
        "oneprotect.test".parse().unwrap(),
        shared.clone(),
        true,
    )
    .unwrap();
    let state = AppState::new(Inner {
        store,
        ca: Arc::new(ca),
        pepper: Pepper::from_bytes(&[7; 32]),
        clock: shared,
        per_address: RateLimiter::new(60, per_address_burst, 1000),
        per_token: RateLimiter::new(60, per_token_burst, 1000),
        token_cache: Default::default(),
        max_body_bytes: 16 * 1024,
        body_read_timeout: std::time::Duration::from_secs(10),
        trusted_proxies: Default::default(),
        enforcer: crate::enforce::Enforcer::new(
            projection.clone(),
            std::time::Duration::from_millis(500),
        ),
        projection,
        assertions: oneprotect_identity::AssertionVerifier::new("enroll-api"),
        jwks: super::keys::PublishedKeys::new(&[crate::config::TrustedKey {
            kid: "gw-a".into(),
            public_key: "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo".into(),
        }]),
        rotation_grace: time::Duration::hours(1),
        reuse_window: std::time::Duration::from_secs(3600),
        metrics: crate::metrics::Metrics::new(),
    });
    let t = tenant(&state).await;
    let other = tenant(&state).await;
    let key = admin(&state, t).await;
    let other_key = admin(&state, other).await;
    Fixture {
        _dir: dir,
        state,
        clock,
        tenant: t,
        key,
        other_key,
    }
}

async fn fixture() -> Fixture {
    fixture_with(100, 100).await
}

struct Resp {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

async fn call(
    f: &Fixture,
    method: Method,
    uri: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> Resp {
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
    send(f, req).await
}

async fn send(f: &Fixture, req: Request<Body>) -> Resp {
    let resp = router(f.state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()));
    if status.is_client_error() || status.is_server_error() {
        assert_eq!(headers["content-type"], problem::CONTENT_TYPE);
        assert_eq!(body["status"], status.as_u16());
        assert_eq!(
            body["type"],
            format!("{}{}", problem::TYPE_BASE, body["code"].as_str().unwrap())
        );
    }
    Resp {
        status,
        headers,
        body,
    }
}

fn assert_problem(r: &Resp, kind: ProblemKind) {
    assert_eq!(r.status.as_u16(), kind.status, "{:?}", r.body);
    assert_eq!(r.body["code"], kind.code, "{:?}", r.body);
}

const TOKENS: &str = "/api/v1/agent-enrollment/tokens";
const EXCHANGE: &str = "/api/v1/agent-enrollment/exchange";

async fn new_token(f: &Fixture, body: Value) -> (String, String) {
    let r = call(f, Method::POST, TOKENS, Some(&f.key), Some(body)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    (
        r.body["token_id"].as_str().unwrap().into(),
        r.body["token"].as_str().unwrap().into(),
    )
}

fn csr(alg: &'static rcgen::SignatureAlgorithm) -> String {
    let key = rcgen::KeyPair::generate_for(alg).unwrap();
    rcgen::CertificateParams::new(vec!["ignored.example".into()])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

fn exchange_body(token: &str, csr_pem: &str) -> Value {
    json!({"token": token, "csr_pem": csr_pem, "agent": {"hostname": "host-1", "os": "linux", "agent_version": "1.2.3"}})
}

#[tokio::test]
async fn token_lifecycle_and_tenant_scoping() {
    let f = fixture().await;
    let (id, secret) = new_token(
        &f,
        json!({"ttl_seconds": 600, "max_uses": 2, "description": "lab", "labels": {"site": "b"}}),
    )
    .await;
    assert!(crate::token::well_formed(&secret));
    let got = call(
        &f,
        Method::GET,
        &format!("{TOKENS}/{id}"),
        Some(&f.key),
        None,
    )
    .await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body["status"], "active");
    assert_eq!(got.body["max_uses"], 2);
    assert_eq!(got.body["labels"]["site"], "b");
    assert!(got.body.get("token").is_none());
    let list = call(
        &f,
        Method::GET,
        &format!("{TOKENS}?status=active&limit=10"),
        Some(&f.key),
        None,
    )
    .await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1);
    assert!(!list.body.to_string().contains(&secret));
    // Defaults: one use, one hour.
    let r = call(&f, Method::POST, TOKENS, Some(&f.key), Some(json!({}))).await;
    assert_eq!(r.body["max_uses"], 1);
    // Another tenant's token is not found, whatever the verb.
    for (m, uri) in [
        (Method::GET, format!("{TOKENS}/{id}")),
        (Method::POST, format!("{TOKENS}/{id}/revoke")),
    ] {
        assert_problem(
            &call(&f, m, &uri, Some(&f.other_key), None).await,
            problem::NOT_FOUND,
        );
    }
    let other_list = call(&f, Method::GET, TOKENS, Some(&f.other_key), None).await;
    assert_eq!(other_list.body["items"].as_array().unwrap().len(), 0);
    assert_problem(
        &call(
            &f,
            Method::GET,
            &format!("{TOKENS}/not-a-uuid"),
            Some(&f.key),
            None,
        )
        .await,
        problem::NOT_FOUND,
    );
    // Revoke is idempotent.
    let r1 = call(
        &f,
        Method::POST,
        &format!("{TOKENS}/{id}/revoke"),
        Some(&f.key),
        None,
    )
    .await;
    let r2 = call(
        &f,
        Method::POST,
        &format!("{TOKENS}/{id}/revoke"),
        Some(&f.key),
        None,
    )
    .await;
    assert_eq!((r1.status, r2.status), (StatusCode::OK, StatusCode::OK));
    assert_eq!(r1.body, r2.body);
    assert_eq!(r2.body["status"], "revoked");
}

#[tokio::test]
async fn admin_auth_is_required() {
    let f = fixture().await;
    for key in [
        None,
        Some("opak_wrong"),
        Some("opak_"),
        Some(&*format!("opak_{}", "A".repeat(43))),
    ] {
        let r = call(&f, Method::GET, TOKENS, key, None).await;
        assert_problem(&r, problem::UNAUTHORIZED);
        assert_eq!(r.headers["www-authenticate"], "Bearer");
    }
    let r = send(
        &f,
        Request::get("/api/v1/agents")
            .header("authorization", format!("Basic {}", f.key))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_problem(&r, problem::UNAUTHORIZED);
}

#[tokio::test]
async fn exchange_issues_an_identity() {
    let f = fixture().await;
    let (token_id, secret) = new_token(&f, json!({})).await;
    let r = call(
        &f,
        Method::POST,
        EXCHANGE,
        None,
        Some(exchange_body(&secret, &csr(&rcgen::PKCS_ECDSA_P256_SHA256))),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let b = &r.body;
    let leaf =
        CertificateDer::from_pem_slice(b["certificate_pem"].as_str().unwrap().as_bytes()).unwrap();
    let chain =
        CertificateDer::from_pem_slice(b["chain_pem"].as_str().unwrap().as_bytes()).unwrap();
    let id = AgentIdentity::from_chain(&leaf, &chain).unwrap();
    assert_eq!(id.tenant(), f.tenant);
    assert_eq!(id.agent().to_string(), b["agent_id"]);
    assert_eq!(id.uri().to_string(), b["spiffe_id"]);
    assert_eq!(id.serial().to_string(), b["serial"]);
    assert_eq!(
        b["trust_bundle_pem"].as_str().unwrap(),
        f.state.ca.trust_bundle_pem()
    );
    // Tenant lifetime 3000 s, NotBefore backdated 300 s: rotate 2/3 of the way
    // from issuance (now) to NotAfter.
    let parse = |k: &str| {
        OffsetDateTime::parse(
            b[k].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    let now = f.clock.now();
    assert_eq!(
        parse("not_after"),
        now + std::time::Duration::from_secs(3000)
    );
    assert_eq!(
        parse("not_before"),
        now - std::time::Duration::from_secs(300)
    );
    assert_eq!(
        parse("rotate_after"),
        now + std::time::Duration::from_secs(2000)
    );

    let agent_id = b["agent_id"].as_str().unwrap();
    let a = call(
        &f,
        Method::GET,
        &format!("/api/v1/agents/{agent_id}"),
        Some(&f.key),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.body["hostname"], "host-1");
    assert_eq!(a.body["status"], "active");
    assert_eq!(a.body["current_serial"], b["serial"]);
    assert_problem(
        &call(
            &f,
            Method::GET,
            &format!("/api/v1/agents/{agent_id}"),
            Some(&f.other_key),
            None,
        )
        .await,
        problem::NOT_FOUND,
    );
    let list = call(
        &f,
        Method::GET,
        "/api/v1/agents?status=active",
        Some(&f.key),
        None,
    )
    .await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1);
    let t = call(
        &f,
        Method::GET,
        &format!("{TOKENS}/{token_id}"),
        Some(&f.key),
        None,
    )
    .await;
    assert_eq!(t.body["status"], "used_up");
    // The single-use token is spent.
    let again = call(
        &f,
        Method::POST,
        EXCHANGE,
        None,
        Some(exchange_body(&secret, &csr(&rcgen::PKCS_ED25519))),
    )
    .await;
    assert_problem(&again, problem::INVALID_TOKEN);
    // Revoke the agent.
    assert_problem(
        &call(
            &f,
            Method::POST,
            &format!("/api/v1/agents/{agent_id}/revoke"),
            Some(&f.key),
            Some(json!({})),
        )
        .await,
        problem::INVALID_REQUEST,
    );
    let rv = call(
        &f,
        Method::POST,
        &format!("/api/v1/agents/{agent_id}/revoke"),
        Some(&f.key),
        Some(json!({"reason": "lost"})),
    )
    .await;
    assert_eq!(rv.body["status"], "revoked");
    assert_eq!(rv.body["revocation_reason"], "lost");
    let kinds: Vec<String> = f
        .state
        .store
        .list_events(f.tenant, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event.payload.event_type().to_owned())
        .collect();
    assert_eq!(
        kinds,
        [
            "agent.enrollment_token.issued",
            "agent.enrolled",
            "agent.enrollment.failed",
            "agent.revoked"
        ]
    );
    // CA material.
    let ca = call(&f, Method::GET, "/api/v1/ca", Some(&f.key), None).await;
    assert_eq!(ca.body["issuing_ca_pem"], b["chain_pem"]);
    let tb = send(
        &f,
        Request::get("/api/v1/trust-bundle")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(tb.headers["content-type"], "application/x-pem-file");
}

#[tokio::test]
async fn every_token_failure_is_the_same_answer() {
    let f = fixture().await;
    let p256 = csr(&rcgen::PKCS_ECDSA_P256_SHA256);
    let unknown = crate::token::new_secret().unwrap();
    let (revoked_id, revoked) = new_token(&f, json!({})).await;
    call(
        &f,
        Method::POST,
        &format!("{TOKENS}/{revoked_id}/revoke"),
        Some(&f.key),
        None,
    )
    .await;
    let (_, expiring) = new_token(&f, json!({"ttl_seconds": 60})).await;
    f.clock.advance(std::time::Duration::from_secs(61));
    let mut answers = Vec::new();
    for t in [
        unknown.expose_secret(),
        &revoked,
        &expiring,
        "opet_short",
        "not-a-token",
    ] {
        let r = call(
            &f,
            Method::POST,
            EXCHANGE,
            None,
            Some(exchange_body(t, &p256)),
        )
        .await;
        assert_problem(&r, problem::INVALID_TOKEN);
        answers.push(r.body);
    }
    assert!(
        answers.windows(2).all(|w| w[0] == w[1]),
        "answers differ: {answers:?}"
    );
}

/// The exchange reuses a token's row for a second (`TokenCache`), but
/// never past what the store says: a token revoked, or used up, right
/// after an exchange that cached it is refused at once, with the precise
/// reason in the audit, and no use is taken.
#[tokio::test]
async fn a_cached_token_never_outlives_its_revocation_or_its_uses() {
    use oneprotect_identity::events::{EnrollmentFailure, Payload};
    let f = fixture().await;
    let p256 = csr(&rcgen::PKCS_ECDSA_P256_SHA256);
    let last_failure = |f: &Fixture| {
        let store = f.state.store.clone();
        let tenant = f.tenant;
        async move {
            let events = store.list_events(tenant, 100).await.unwrap();
            events.iter().rev().find_map(|e| match &e.event.payload {
                Payload::EnrollmentFailed { reason_code, .. } => Some(*reason_code),
                _ => None,
            })
        }
    };

    let exchange = |secret: String| {
        let f = &f;
        let body = exchange_body(&secret, &p256);
        async move { call(f, Method::POST, EXCHANGE, None, Some(body)).await }
    };
    let uses = |id: String| {
        let f = &f;
        async move {
            let t = call(
                f,
                Method::GET,
                &format!("{TOKENS}/{id}"),
                Some(&f.key),
                None,
            )
            .await;
            t.body["uses"].clone()
        }
    };

    let (id, secret) = new_token(&f, json!({"max_uses": 3})).await;
    let first = exchange(secret.clone()).await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    let revoke = call(
        &f,
        Method::POST,
        &format!("{TOKENS}/{id}/revoke"),
        Some(&f.key),
        None,
    )
    .await;
    assert_eq!(revoke.status, StatusCode::OK, "{:?}", revoke.body);
    assert_problem(&exchange(secret).await, problem::INVALID_TOKEN);
    assert_eq!(
        last_failure(&f).await,
        Some(EnrollmentFailure::TokenRevoked)
    );
    assert_eq!(uses(id).await, 1);

    let (id, secret) = new_token(&f, json!({"max_uses": 1})).await;
    let first = exchange(secret.clone()).await;
    assert_eq!(first.status, StatusCode::CREATED, "{:?}", first.body);
    assert_problem(&exchange(secret).await, problem::INVALID_TOKEN);
    assert_eq!(last_failure(&f).await, Some(EnrollmentFailure::TokenUsedUp));
    assert_eq!(uses(id).await, 1);
}

#[tokio::test]
async fn csr_errors_have_their_own_codes_and_do_not_consume() {
    let f = fixture().await;
    let (token_id, secret) = new_token(&f, json!({})).await;
    let mut forged = CertificateSigningRequestDerBytes::of(&csr(&rcgen::PKCS_ECDSA_P256_SHA256));
    let n = forged.0.len() - 3;
    forged.0[n] ^= 1;
    let weak = openssl_csr(&["-newkey", "rsa:1024"]);
    let p521 = openssl_csr(&["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"]);
    for (pem, kind) in [
        ("garbage".to_string(), problem::INVALID_CSR),
        (forged.pem(), problem::CSR_SIGNATURE_INVALID),
        (weak, problem::WEAK_KEY),
        (p521, problem::UNSUPPORTED_KEY),
    ] {
        let r = call(
            &f,
            Method::POST,
            EXCHANGE,
            None,
            Some(exchange_body(&secret, &pem)),
        )
        .await;
        assert_problem(&r, kind);
    }
    let t = call(
        &f,
        Method::GET,
        &format!("{TOKENS}/{token_id}"),
        Some(&f.key),
        None,
    )
    .await;
    assert_eq!(t.body["uses"], 0);
    let ok = call(
        &f,
        Method::POST,
        EXCHANGE,
        None,
        Some(exchange_body(&secret, &csr(&rcgen::PKCS_ECDSA_P384_SHA384))),
    )
    .await;
    assert_eq!(ok.status, StatusCode::CREATED);
}

struct CertificateSigningRequestDerBytes(Vec<u8>);
impl CertificateSigningRequestDerBytes {
    fn of(pem: &str) -> Self {
        Self(
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
        )
    }
    fn pem(&self) -> String {
        use base64::Engine;
        format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64::engine::general_purpose::STANDARD.encode(&self.0)
        )
    }
}

fn openssl_csr(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("openssl")
        .args(["req", "-new", "-nodes", "-subj", "/CN=x", "-keyout"])
        .arg(dir.path().join("k"))
        .arg("-out")
        .arg(dir.path().join("c"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::read_to_string(dir.path().join("c")).unwrap()
}

#[tokio::test]
async fn body_errors() {
    let f = fixture().await;
    let post = |ct: &str, body: String| {
        Request::post(TOKENS)
            .header("authorization", format!("Bearer {}", f.key))
            .header("content-type", ct)
            .body(Body::from(body))
            .unwrap()
    };
    assert_problem(
        &send(&f, post("application/json", "{not json".into())).await,
        problem::INVALID_JSON,
    );
    assert_problem(
        &send(&f, post("text/plain", "{}".into())).await,
        problem::UNSUPPORTED_MEDIA_TYPE,
    );
    assert_problem(
        &send(
            &f,
            post(
                "application/json",
                format!("{{\"description\": \"{}\"}}", "a".repeat(20_000)),
            ),
        )
        .await,
        problem::PAYLOAD_TOO_LARGE,
    );
    for bad in [
        json!({"ttl_seconds": 59}),
        json!({"max_uses": 0}),
        json!({"max_uses": 10001}),
        json!({"unknown": 1}),
        json!({"ttl_seconds": "x"}),
        json!({"description": "d".repeat(257)}),
    ] {
        assert_problem(
            &call(&f, Method::POST, TOKENS, Some(&f.key), Some(bad)).await,
            problem::INVALID_REQUEST,
        );
    }
    assert_problem(
        &call(
            &f,
            Method::POST,
            EXCHANGE,
            None,
            Some(json!({"token": "x"})),
        )
        .await,
        problem::INVALID_REQUEST,
    );
    assert_problem(&call(&f, Method::POST, EXCHANGE, None, Some(json!({"token": "x", "csr_pem": "y", "agent": {"hostname": "", "os": "l", "agent_version": "1"}}))).await, problem::INVALID_REQUEST);
    assert_problem(
        &call(
            &f,
            Method::GET,
            &format!("{TOKENS}?limit=0"),
            Some(&f.key),
            None,
        )
        .await,
        problem::INVALID_REQUEST,
    );
    assert_problem(
        &call(
            &f,
            Method::GET,
            &format!("{TOKENS}?status=nope"),
            Some(&f.key),
            None,
        )
        .await,
        problem::INVALID_REQUEST,
    );
    assert_problem(
        &call(&f, Method::GET, "/nope", None, None).await,
        problem::ROUTE_NOT_FOUND,
    );
    assert_problem(
        &call(&f, Method::DELETE, TOKENS, Some(&f.key), None).await,
        problem::METHOD_NOT_ALLOWED,
    );
}

#[tokio::test]
async fn exchange_is_rate_limited_per_token_and_per_address() {
    let f = fixture_with(1, 100).await;
    let (_, secret) = new_token(&f, json!({"max_uses": 5})).await;
    let p = csr(&rcgen::PKCS_ED25519);
    assert_eq!(
        call(
            &f,
            Method::POST,
            EXCHANGE,
            None,
            Some(exchange_body(&secret, &p))
        )
        .await
        .status,
        StatusCode::CREATED
    );
    let r = call(
        &f,
        Method::POST,
        EXCHANGE,
        None,
        Some(exchange_body(&secret, &p)),
    )
    .await;
    assert_problem(&r, problem::RATE_LIMITED);
    assert!(r.headers.contains_key("retry-after"));

    let f = fixture_with(100, 1).await;
    let peer: SocketAddr = "192.0.2.7:5555".parse().unwrap();
    let req = || {
        let mut r = Request::post(EXCHANGE)
            .header("content-type", "application/json")
            .body(Body::from(exchange_body("opet_x", &p).to_string()))
            .unwrap();
        r.extensions_mut().insert(ConnectInfo(peer));
        r
    };
    assert_problem(&send(&f, req()).await, problem::INVALID_TOKEN);
    assert_problem(&send(&f, req()).await, problem::RATE_LIMITED);
}

#[tokio::test]
async fn storage_down_is_503_with_retry_after() {
    let f = fixture().await;
    assert_eq!(
        call(&f, Method::GET, "/readyz", None, None).await.status,
        StatusCode::OK
    );
    f.state.store.close().await;
    for r in [
        call(&f, Method::GET, "/readyz", None, None).await,
        call(&f, Method::GET, TOKENS, Some(&f.key), None).await,
    ] {
        assert_problem(&r, problem::STORAGE_UNAVAILABLE);
        assert_eq!(r.headers["retry-after"], "5");
    }
    assert_eq!(
        call(&f, Method::GET, "/healthz", None, None).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn every_listed_route_is_served() {
    let f = fixture().await;
    let id = Uuid::new_v4().to_string();
    for (method, template) in ROUTES {
        if *template == "/metrics" || *template == "/api/v1/projection" {
            // Loopback peers only; this in-process call has no peer address
            // (answered 404, checked below). Served: tests/suite/rotation.rs,
            // projection_status_reports_backend_reachability_and_backlog.
            continue;
        }
        let uri = template
            .replace("{token_id}", &id)
            .replace("{agent_id}", &id);
        let r = call(&f, method.parse().unwrap(), &uri, None, None).await;
        let code = r.body.get("code").and_then(Value::as_str).unwrap_or("");
        assert!(
            code != "route_not_found" && code != "method_not_allowed",
            "{method} {template}: {code}"
        );
    }
    let r = call(&f, Method::GET, "/metrics", None, None).await;
    assert_problem(&r, problem::ROUTE_NOT_FOUND);
}

#[test]
fn bearer_scheme_is_case_insensitive() {
    use super::bearer_credentials;
    for v in [
        "Bearer k",
        "bearer k",
        "BEARER k",
        "Bearer   k",
        "bEaReR k  ",
    ] {
        assert_eq!(bearer_credentials(v), Some("k"), "{v:?}");
    }
    for v in ["Basic k", "Bearerk", "Bearer", "Bearer ", "k", "Bearer\tk"] {
        assert_eq!(bearer_credentials(v), None, "{v:?}");
    }
}

#[test]
fn request_bodies_must_be_objects() {
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Two {
        a: u32,
        b: String,
    }
    assert!(super::parse_body::<Two>(br#" {"a": 1, "b": "x"} "#).is_ok());
    for (body, code) in [
        (&br#"[1, "x"]"#[..], "invalid_request"),
        (b"null", "invalid_request"),
        (b"42", "invalid_request"),
        (br#""x""#, "invalid_request"),
        (br#"{"a": 1, "a": 2, "b": "x"}"#, "invalid_request"),
        (b"[1,", "invalid_json"),
        (b"", "invalid_json"),
        (br#"{"a": 1, "b": "x"} trailing"#, "invalid_json"),
    ] {
        match super::parse_body::<Two>(body) {
            Err(ApiError::Problem(kind, _)) => {
                assert_eq!(kind.code, code, "{}", String::from_utf8_lossy(body))
            }
            other => panic!("{}: {other:?}", String::from_utf8_lossy(body)),
        }
    }
}

#[tokio::test]
async fn jwks_publishes_the_gateway_keys_with_cache_headers() {
    let f = fixture().await;
    let r = call(&f, Method::GET, "/.well-known/jwks.json", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["content-type"], "application/jwk-set+json");
    assert_eq!(r.headers["cache-control"], "public, max-age=60");
    let set = oneprotect_identity::JwkSet::parse(r.body.to_string().as_bytes()).unwrap();
    let keys = set.ed25519_keys().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].0, "gw-a");
    assert_eq!(r.body["keys"][0]["alg"], "EdDSA");
    assert_eq!(r.body["keys"][0]["crv"], "Ed25519");

    let etag = r.headers["etag"].to_str().unwrap().to_owned();
    let req = Request::builder()
        .uri("/.well-known/jwks.json")
        .header("if-none-match", format!("\"other\", {etag}"))
        .body(Body::empty())
        .unwrap();
    let r = send(&f, req).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert_eq!(r.headers["etag"], etag.as_str());
    let req = Request::builder()
        .uri("/.well-known/jwks.json")
        .header("if-none-match", "\"stale\"")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&f, req).await.status, StatusCode::OK);
}

/// `requests_total` counts by route template and status, `problems_total`
/// by problem code (every code exported at 0 from the start), and the outbox
/// gauges show the backlog the relay (absent here) has not sent.
#[tokio::test]
async fn requests_problems_and_outbox_backlog_are_metered() {
    let f = fixture().await;
    let m = &f.state.metrics;
    let page = m.render();
    for kind in problem::ALL {
        let line = format!(
            "oneprotect_enroll_problems_total{{code=\"{}\"}} 0",
            kind.code
        );
        assert!(page.contains(&line), "{line} missing:\n{page}");
    }
    assert!(page.contains("oneprotect_enroll_rotations_total{outcome=\"refused\"} 0"));

    let (_, token) = new_token(&f, json!({"ttl_seconds": 600, "max_uses": 1})).await;
    let r = call(
        &f,
        Method::POST,
        EXCHANGE,
        None,
        Some(exchange_body(&token, &csr(&rcgen::PKCS_ECDSA_P256_SHA256))),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let r = call(
        &f,
        Method::POST,
        EXCHANGE,
        None,
        Some(exchange_body(&token, &csr(&rcgen::PKCS_ECDSA_P256_SHA256))),
    )
    .await;
    assert_problem(&r, problem::INVALID_TOKEN);
    call(&f, Method::GET, "/no/such/route", None, None).await;

    f.clock.advance(std::time::Duration::from_secs(42));
    m.update_outbox(&f.state.store, f.state.clock.now()).await;
    let page = m.render();
    for line in [
        "oneprotect_enroll_requests_total{method=\"POST\",route=\"/api/v1/agent-enrollment/tokens\",status=\"201\"} 1",
        "oneprotect_enroll_requests_total{method=\"POST\",route=\"/api/v1/agent-enrollment/exchange\",status=\"201\"} 1",
        "oneprotect_enroll_requests_total{method=\"POST\",route=\"/api/v1/agent-enrollment/exchange\",status=\"401\"} 1",
        "oneprotect_enroll_requests_total{method=\"GET\",route=\"none\",status=\"404\"} 1",
        "oneprotect_enroll_problems_total{code=\"invalid_token\"} 1",
        "oneprotect_enroll_problems_total{code=\"route_not_found\"} 1",
        "oneprotect_enroll_outbox_oldest_pending_seconds 42",
    ] {
        assert!(page.contains(line), "{line} missing:\n{page}");
    }
    let pending = gauge(&page, "oneprotect_enroll_outbox_pending");
    let rows = f.state.store.list_pending_events(100).await.unwrap();
    assert!(!rows.is_empty());
    assert_eq!(pending, rows.len() as i64);

    // Sent rows leave the backlog.
    for r in &rows {
        f.state
            .store
            .mark_events_sent(&[r.seq], f.state.clock.now())
            .await
            .unwrap();
    }
    m.update_outbox(&f.state.store, f.state.clock.now()).await;
    let page = m.render();
    assert_eq!(gauge(&page, "oneprotect_enroll_outbox_pending"), 0);
    assert_eq!(
        gauge(&page, "oneprotect_enroll_outbox_oldest_pending_seconds"),
        0
    );
}

/// The value of the label-less sample `name`.
fn gauge(page: &str, name: &str) -> i64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing:\n{page}"))
        .trim()
        .parse()
        .unwrap()
}

/// `GET /api/v1/projection` from `peer` with `key`.
async fn projection_status(f: &Fixture, peer: &str, key: Option<&str>) -> Resp {
    let mut b = Request::builder().uri("/api/v1/projection");
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    let mut req = b.body(Body::empty()).unwrap();
    let peer: std::net::SocketAddr = peer.parse().unwrap();
    req.extensions_mut()
        .insert(axum::extract::ConnectInfo(peer));
    send(f, req).await
}

#[tokio::test]
async fn projection_status_reports_backend_reachability_and_backlog() {
    // Operators only: a loopback client with an admin key. Anyone else is
    // told the route does not exist, key or not.
    let f = fixture().await;
    new_token(&f, json!({"ttl_seconds": 600})).await;
    for key in [Some(f.key.as_str()), None] {
        assert_problem(
            &projection_status(&f, "192.0.2.7:4000", key).await,
            problem::ROUTE_NOT_FOUND,
        );
    }
    assert_problem(
        &call(&f, Method::GET, "/api/v1/projection", Some(&f.key), None).await,
        problem::ROUTE_NOT_FOUND,
    );
    assert_problem(
        &projection_status(&f, "127.0.0.1:4000", None).await,
        problem::UNAUTHORIZED,
    );
    // No projection configured: said so, with the outbox backlog.
    let r = projection_status(&f, "127.0.0.1:4000", Some(&f.key)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["backend"], "none");
    assert_eq!(r.body["reachable"], Value::Null);
    assert!(
        r.body["outbox_pending"].as_u64().unwrap() >= 1,
        "{:?}",
        r.body
    );

    // A Redis that does not answer: 200, reachable false, a reason.
    let down = crate::projection::Projection::new("redis://127.0.0.1:1", "p:", 1).unwrap();
    let f = fixture_full(100, 100, Some(down)).await;
    let r = projection_status(&f, "[::1]:4000", Some(&f.key)).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["backend"], "redis");
    assert_eq!(r.body["reachable"], false);
    assert!(r.body["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(r.body["sequence"], Value::Null);

    // The in-process bus: built and announced.
    let bus = oneprotect_revocation_bus::MemoryBus::new();
    bus.mark_built(1_800_000_000);
    let projection = crate::projection::Projection::memory(bus.clone(), "p:");
    bus.announce(&oneprotect_identity::revocation::Change::Resync);
    let f = fixture_full(100, 100, Some(projection)).await;
    let r = projection_status(&f, "127.0.0.1:4000", Some(&f.key)).await;
    assert_eq!(r.body["backend"], "memory");
    assert_eq!(r.body["reachable"], true);
    assert_eq!(r.body["built_at"], 1_800_000_000);
    assert_eq!(r.body["sequence"], 1);
}
