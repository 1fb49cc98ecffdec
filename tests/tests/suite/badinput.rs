//! The bad-input catalogue (`docs/bad-input.md`): every case over real
//! sockets against the real enroll-api (HTTPS, SQLite) or the real pingora
//! gateway (mTLS, Redis), each asserting its documented answer, that the
//! process still serves afterwards, and — where a write could happen — that
//! nothing was written (no agent, no `agent.enrolled` event, no token use).
//!
//! `cargo test -p oneprotect-tests --test suite badinput::` (needs Redis on
//! 127.0.0.1:6379 and `openssl` on the PATH; about 60 s, the length of
//! pingora's handshake and header-read timeouts).

// Helpers run only inside tests, where a panic with its message is the
// failure report.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::enroll::{
    create_token, exchange_body, openssl, openssl_csr, start_with, Db, Env, Reply,
};
use crate::support::gateway::{
    h1_send, only, refused, seen_paths, start_gateway, upstream_headers, Gw, Opts, EXCHANGE, TD,
};
use oneprotect_enroll_api::clock::FixedClock;
use oneprotect_enroll_api::service;
use oneprotect_enroll_api::store::Store;
use oneprotect_identity::{headers, problem};
use oneprotect_testpki::{LeafSpec, TestPki};

const EX: &str = "/api/v1/agent-enrollment/exchange";

/// Asserts a problem answer: status, code and media type.
fn assert_problem(r: &Reply, status: u16, code: &str, case: &str) {
    assert_eq!(r.status, status, "{case}: {}", r.body);
    assert_eq!(r.body["code"], code, "{case}: {}", r.body);
    assert_eq!(
        r.headers.get("content-type").map(|v| v.to_str().unwrap()),
        Some(problem::CONTENT_TYPE),
        "{case}"
    );
}

/// The service still answers (nothing panicked, the listener is up).
async fn assert_serving(env: &Env) {
    let r = env
        .client
        .send("GET", "/healthz", None, None)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "service still serving");
}

async fn agent_count(env: &Env, key: &str) -> usize {
    let r = env
        .client
        .send("GET", "/api/v1/agents", Some(key), None)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["items"].as_array().unwrap().len()
}

/// Event types in the tenant's outbox, oldest first.
async fn event_types(env: &Env) -> Vec<String> {
    let store = &env.running.as_ref().unwrap().state.store;
    store
        .list_events(env.tenant, 10_000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.event.payload.event_type().to_owned())
        .collect()
}

async fn token_uses(env: &Env, token_id: &str) -> u64 {
    let r = env
        .client
        .send(
            "GET",
            &format!("/api/v1/agent-enrollment/tokens/{token_id}"),
            Some(&env.key),
            None,
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["uses"].as_u64().unwrap()
}

async fn exchange(env: &Env, token: &str, csr: &str) -> Reply {
    env.client
        .send("POST", EX, None, Some(exchange_body(token, csr)))
        .await
        .unwrap()
}

async fn sqlite_env() -> Env {
    start_with(Db::Sqlite, service::system_clock(), |_| {})
        .await
        .unwrap()
}

/// A CSR made by the openssl CLI with `newkey` (`-newkey` argument and
/// `-pkeyopt`s) and extra `req` arguments.
fn csr_with(dir: &Path, name: &str, newkey: &[&str], extra: &[&str]) -> Result<String> {
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let mut args = vec!["req", "-new", "-nodes", "-keyout", &key, "-out", &csr];
    args.extend_from_slice(newkey);
    if !extra.contains(&"-subj") {
        args.extend_from_slice(&["-subj", "/CN=x"]);
    }
    args.extend_from_slice(extra);
    openssl(&args, dir)?;
    Ok(std::fs::read_to_string(dir.join(csr))?)
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn csr_der(csr_pem: &str) -> Vec<u8> {
    let b64: String = csr_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// enroll-api: CSRs
// ---------------------------------------------------------------------------------------------

/// Every refused CSR answers its documented problem; the token is not
/// consumed, no agent and no `agent.enrolled` event are written; the same
/// token then enrolls a good CSR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn badinput_csrs_are_refused_and_nothing_is_written() -> Result<()> {
    let env = sqlite_env().await;
    let dir = env.dir.clone();
    let (token_id, token) = create_token(&env, json!({"max_uses": 1, "ttl_seconds": 600})).await?;
    let good = openssl_csr(&dir, "good")?;
    let der = csr_der(&good);

    let mut bad_sig = der.clone();
    let last = bad_sig.len() - 1;
    bad_sig[last] ^= 0x01;
    let truncated = der[..der.len() - 12].to_vec();
    let mut huge = good.clone();
    while huge.len() <= oneprotect_enroll_api::ca::MAX_CSR_PEM_LEN {
        huge.push_str(&good);
    }
    let server = TestPki::new(TD).server_cert(&["localhost"]);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("csr_garbage_text", "hello, I am a CSR".into(), 400, "invalid_csr"),
        ("csr_empty", String::new(), 400, "invalid_csr"),
        (
            "csr_pem_bad_base64",
            "-----BEGIN CERTIFICATE REQUEST-----\n!!!not base64!!!\n-----END CERTIFICATE REQUEST-----\n".into(),
            400,
            "invalid_csr",
        ),
        (
            "csr_pem_wrong_label",
            pem("CERTIFICATE", &der),
            400,
            "invalid_csr",
        ),
        ("csr_certificate_instead", server.cert_pem.clone(), 400, "invalid_csr"),
        (
            "csr_der_truncated",
            pem("CERTIFICATE REQUEST", &truncated),
            400,
            "invalid_csr",
        ),
        (
            "csr_der_trailing_bytes",
            pem("CERTIFICATE REQUEST", &[der.as_slice(), &[0, 0, 0]].concat()),
            400,
            "invalid_csr",
        ),
        ("csr_huge", huge, 400, "invalid_csr"),
        (
            "csr_wrong_signature",
            pem("CERTIFICATE REQUEST", &bad_sig),
            400,
            "csr_signature_invalid",
        ),
        (
            "csr_rsa_1024",
            csr_with(&dir, "rsa1024", &["-newkey", "rsa:1024"], &[])?,
            400,
            "weak_key",
        ),
        (
            "csr_ec_p521",
            csr_with(
                &dir,
                "p521",
                &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-521"],
                &[],
            )?,
            400,
            "unsupported_key",
        ),
        (
            "csr_ec_secp256k1",
            csr_with(
                &dir,
                "k1",
                &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp256k1"],
                &[],
            )?,
            400,
            "unsupported_key",
        ),
        (
            "csr_ed448",
            csr_with(&dir, "ed448", &["-newkey", "ed448"], &[])?,
            400,
            "unsupported_key",
        ),
        (
            "csr_rsa_2048_sha1",
            csr_with(&dir, "sha1", &["-newkey", "rsa:2048"], &["-sha1"])?,
            400,
            "unsupported_key",
        ),
    ];
    for (case, csr, status, code) in &cases {
        let r = exchange(&env, &token, csr).await;
        assert_problem(&r, *status, code, case);
    }
    assert_serving(&env).await;
    assert_eq!(agent_count(&env, &env.key).await, 0, "no agent written");
    assert_eq!(token_uses(&env, &token_id).await, 0, "token not consumed");
    let types = event_types(&env).await;
    assert!(!types.iter().any(|t| t == "agent.enrolled"), "{types:?}");
    // Each refusal after the token check is audited (without secrets).
    let failed = types
        .iter()
        .filter(|t| *t == "agent.enrollment.failed")
        .count();
    assert!(failed >= 1, "{types:?}");

    // The single-use token still works for a good CSR.
    let r = exchange(&env, &token, &good).await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(agent_count(&env, &env.key).await, 1);
    Ok(())
}

/// A CSR asking for CA=true, certificate signing, serverAuth, another
/// tenant's URI SAN, DNS and IP SANs and a subject is still enrolled, but
/// the issued leaf carries only the service's URI and the agent profile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn badinput_csr_requested_names_and_extensions_are_ignored() -> Result<()> {
    let env = sqlite_env().await;
    let dir = env.dir.clone();
    let other_tenant = uuid::Uuid::new_v4();
    let other_agent = uuid::Uuid::new_v4();
    let san = format!(
        "subjectAltName=URI:spiffe://oneprotect.test/tenant/{other_tenant}/agent/{other_agent},DNS:evil.example,IP:10.0.0.1"
    );
    let csr = csr_with(
        &dir,
        "greedy",
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        &[
            "-subj",
            "/CN=evil/O=other-tenant",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
            "-addext",
            "extendedKeyUsage=serverAuth,clientAuth",
            "-addext",
            &san,
        ],
    )?;
    let (_, token) = create_token(&env, json!({})).await?;
    let r = exchange(&env, &token, &csr).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let want = format!(
        "spiffe://oneprotect.test/tenant/{}/agent/{}",
        env.tenant,
        r.body["agent_id"].as_str().context("agent_id")?
    );
    std::fs::write(
        dir.join("greedy-leaf.pem"),
        r.body["certificate_pem"].as_str().context("cert")?,
    )?;
    let text = openssl(
        &[
            "x509",
            "-in",
            "greedy-leaf.pem",
            "-noout",
            "-subject",
            "-ext",
            "subjectAltName,basicConstraints,keyUsage,extendedKeyUsage",
        ],
        &dir,
    )?;
    let sans: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.contains("Subject Alternative Name"))
        .nth(1)
        .context("SAN line")?
        .split(',')
        .map(str::trim)
        .collect();
    assert_eq!(sans, vec![format!("URI:{want}")], "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(!text.contains("Certificate Sign"), "{text}");
    assert!(!text.contains("CRL Sign"), "{text}");
    assert!(!text.contains("Server Authentication"), "{text}");
    assert!(
        !text.contains("evil") && !text.contains("other-tenant"),
        "{text}"
    );
    assert!(!text.contains(&other_tenant.to_string()), "{text}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// enroll-api: request bodies
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn badinput_exchange_bodies() -> Result<()> {
    let env = sqlite_env().await;
    let (token_id, token) = create_token(&env, json!({})).await?;
    let csr = openssl_csr(&env.dir, "agent")?;
    let json_ct = vec![("content-type".to_owned(), "application/json".to_owned())];
    let raw = |ct: &[(String, String)], body: Vec<u8>| {
        let client = env.client.clone();
        let ct = ct.to_vec();
        async move {
            client
                .send_raw("POST", EX, &ct, Bytes::from(body))
                .await
                .unwrap()
        }
    };
    let r = raw(&json_ct, b"{not json".to_vec()).await;
    assert_problem(&r, 400, "invalid_json", "body_not_json");
    let r = raw(&json_ct, Vec::new()).await;
    assert_problem(&r, 400, "invalid_json", "body_empty");
    let r = raw(
        &[("content-type".to_owned(), "text/plain".to_owned())],
        exchange_body(&token, &csr).to_string().into_bytes(),
    )
    .await;
    assert_problem(&r, 415, "unsupported_media_type", "body_wrong_media_type");
    let r = raw(&[], exchange_body(&token, &csr).to_string().into_bytes()).await;
    assert_problem(&r, 415, "unsupported_media_type", "body_no_media_type");
    let r = raw(
        &json_ct,
        json!({"token": token, "agent": {"hostname": "h", "os": "l", "agent_version": "1"}})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_problem(&r, 422, "invalid_request", "body_missing_csr");
    let r = raw(
        &json_ct,
        json!({"token": 42, "csr_pem": csr, "agent": {"hostname": "h", "os": "l", "agent_version": "1"}})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_problem(&r, 422, "invalid_request", "body_token_not_a_string");
    let mut body = exchange_body(&token, &csr);
    body["agent"]["hostname"] = json!("evil\u{0007}\nhost");
    let r = raw(&json_ct, body.to_string().into_bytes()).await;
    assert_problem(&r, 422, "invalid_request", "body_control_characters");
    let mut body = exchange_body(&token, &csr);
    body["agent"]["hostname"] = json!("h".repeat(254));
    let r = raw(&json_ct, body.to_string().into_bytes()).await;
    assert_problem(&r, 422, "invalid_request", "body_hostname_too_long");
    let mut body = exchange_body(&token, &csr);
    body["padding"] = json!("x".repeat(env.cfg.limits.max_body_bytes + 1));
    let r = raw(&json_ct, body.to_string().into_bytes()).await;
    assert_problem(&r, 413, "payload_too_large", "body_too_large");
    assert_serving(&env).await;
    assert_eq!(agent_count(&env, &env.key).await, 0);
    assert_eq!(token_uses(&env, &token_id).await, 0);
    let types = event_types(&env).await;
    assert!(!types.iter().any(|t| t == "agent.enrolled"), "{types:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// enroll-api: tokens
// ---------------------------------------------------------------------------------------------

/// Unknown, malformed, expired, used-up and revoked tokens all get the same
/// answer, byte for byte; none writes an agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn badinput_tokens_get_one_answer_for_every_invalid_kind() -> Result<()> {
    let clock = FixedClock::new(time::OffsetDateTime::now_utc());
    let env = start_with(Db::Sqlite, std::sync::Arc::new(clock.clone()), |_| {}).await?;
    let csr = openssl_csr(&env.dir, "agent")?;
    let (_, expired) = create_token(&env, json!({"ttl_seconds": 60})).await?;
    clock.advance(Duration::from_secs(120));
    let (_, used) = create_token(&env, json!({"max_uses": 1})).await?;
    assert_eq!(exchange(&env, &used, &csr).await.status, 201);
    let (revoked_id, revoked) = create_token(&env, json!({})).await?;
    let r = env
        .client
        .send(
            "POST",
            &format!("/api/v1/agent-enrollment/tokens/{revoked_id}/revoke"),
            Some(&env.key),
            None,
        )
        .await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let unknown = format!("opet_{}", "A".repeat(43));
    let cases = [
        ("token_unknown", unknown.as_str()),
        ("token_malformed", "hello"),
        ("token_empty", ""),
        (
            "token_admin_key_shape",
            "opak_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ),
        ("token_expired", expired.as_str()),
        ("token_used", used.as_str()),
        ("token_revoked", revoked.as_str()),
    ];
    let mut first: Option<(Value, String)> = None;
    for (case, token) in cases {
        let r = exchange(&env, token, &csr).await;
        assert_problem(&r, 401, "invalid_token", case);
        assert!(r.headers.get("www-authenticate").is_none(), "{case}");
        let ct = r.headers["content-type"].to_str()?.to_owned();
        match &first {
            None => first = Some((r.body.clone(), ct)),
            Some((body, c)) => {
                assert_eq!(&r.body, body, "{case}: same answer for every kind");
                assert_eq!(&ct, c, "{case}");
            }
        }
    }
    assert_serving(&env).await;
    assert_eq!(
        agent_count(&env, &env.key).await,
        1,
        "only the good exchange"
    );
    let enrolled = event_types(&env)
        .await
        .iter()
        .filter(|t| *t == "agent.enrolled")
        .count();
    assert_eq!(enrolled, 1);
    Ok(())
}

/// Guessing tokens from one address runs into 429 `rate_limited` with a
/// Retry-After; a valid token from that address is refused too until the
/// window passes; nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn badinput_token_brute_force_is_rate_limited() -> Result<()> {
    let env = start_with(Db::Sqlite, service::system_clock(), |c| {
        c.limits.exchange_per_address_burst = 5;
        c.limits.exchange_per_address_per_minute = 1;
    })
    .await?;
    let csr = openssl_csr(&env.dir, "agent")?;
    let (token_id, token) = create_token(&env, json!({})).await?;
    let (mut refused, mut limited) = (0, 0);
    for i in 0..20 {
        let guess = format!("opet_{:A>43}", i);
        let r = exchange(&env, &guess, &csr).await;
        match r.status {
            401 => {
                assert_eq!(limited, 0, "a 401 after a 429");
                assert_problem(&r, 401, "invalid_token", "token_brute_force");
                refused += 1;
            }
            429 => {
                assert_problem(&r, 429, "rate_limited", "token_brute_force");
                let after: u64 = r.headers["retry-after"].to_str()?.parse()?;
                assert!(after >= 1);
                limited += 1;
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
    }
    assert!(refused <= 6, "burst of 5 (+1 refill): {refused}");
    assert!(limited >= 14, "{limited}");
    let r = exchange(&env, &token, &csr).await;
    assert_problem(&r, 429, "rate_limited", "token_brute_force_valid_token");
    assert_serving(&env).await;
    assert_eq!(agent_count(&env, &env.key).await, 0);
    assert_eq!(token_uses(&env, &token_id).await, 0);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// enroll-api: admin keys and ids
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn badinput_admin_keys_and_other_tenants() -> Result<()> {
    let env = sqlite_env().await;
    let csr = openssl_csr(&env.dir, "agent")?;
    let (token_id, token) = create_token(&env, json!({"max_uses": 2})).await?;
    let r = exchange(&env, &token, &csr).await;
    assert_eq!(r.status, 201);
    let agent = r.body["agent_id"].as_str().context("agent_id")?.to_owned();

    let wrong = format!("opak_{}", "A".repeat(43));
    let auths: [(&str, Option<String>); 5] = [
        ("admin_key_missing", None),
        ("admin_key_wrong", Some(format!("Bearer {wrong}"))),
        ("admin_key_malformed", Some("Bearer hello".into())),
        ("admin_key_basic_scheme", Some(format!("Basic {}", env.key))),
        ("admin_key_token_instead", Some(format!("Bearer {token}"))),
    ];
    for (case, auth) in &auths {
        let mut h = vec![("content-type".to_owned(), "application/json".to_owned())];
        if let Some(a) = auth {
            h.push(("authorization".to_owned(), a.clone()));
        }
        let r = env
            .client
            .send_raw("GET", "/api/v1/agents", &h, Bytes::new())
            .await?;
        assert_problem(&r, 401, "unauthorized", case);
        assert_eq!(r.headers["www-authenticate"], "Bearer", "{case}");
        // A write with the same credentials: refused, nothing created.
        let r = env
            .client
            .send_raw(
                "POST",
                "/api/v1/agent-enrollment/tokens",
                &h,
                Bytes::from(json!({}).to_string()),
            )
            .await?;
        assert_problem(&r, 401, "unauthorized", case);
        let r = env
            .client
            .send_raw(
                "POST",
                &format!("/api/v1/agents/{agent}/revoke"),
                &h,
                Bytes::from(json!({"reason": "x"}).to_string()),
            )
            .await?;
        assert_problem(&r, 401, "unauthorized", case);
    }
    let tokens = env
        .client
        .send(
            "GET",
            "/api/v1/agent-enrollment/tokens",
            Some(&env.key),
            None,
        )
        .await?;
    assert_eq!(tokens.body["items"].as_array().map(Vec::len), Some(1));

    // Another tenant's admin key: every read and write of this tenant's
    // agent and token is 404, and nothing changes.
    let other = oneprotect_enroll_api::cli::tenant_create(&env.cfg, "other", Some(3600)).await?;
    let other_key = oneprotect_enroll_api::cli::admin_key_create(&env.cfg, other, "x").await?;
    let ok = other_key.expose_secret();
    let cross: [(&str, &str, String, Option<Value>); 5] = [
        (
            "other_tenant_agent_get",
            "GET",
            format!("/api/v1/agents/{agent}"),
            None,
        ),
        (
            "other_tenant_agent_revoke",
            "POST",
            format!("/api/v1/agents/{agent}/revoke"),
            Some(json!({"reason": "cross-tenant"})),
        ),
        (
            "other_tenant_agent_events",
            "GET",
            format!("/api/v1/agents/{agent}/events"),
            None,
        ),
        (
            "other_tenant_token_get",
            "GET",
            format!("/api/v1/agent-enrollment/tokens/{token_id}"),
            None,
        ),
        (
            "other_tenant_token_revoke",
            "POST",
            format!("/api/v1/agent-enrollment/tokens/{token_id}/revoke"),
            None,
        ),
    ];
    for (case, method, path, body) in cross {
        let r = env.client.send(method, &path, Some(ok), body).await?;
        assert_problem(&r, 404, "not_found", case);
    }
    assert_eq!(agent_count(&env, ok).await, 0, "other tenant lists none");
    let a = env
        .client
        .send(
            "GET",
            &format!("/api/v1/agents/{agent}"),
            Some(&env.key),
            None,
        )
        .await?;
    assert_eq!(
        a.body["status"], "active",
        "not revoked by the other tenant"
    );
    let t = env
        .client
        .send(
            "GET",
            &format!("/api/v1/agent-enrollment/tokens/{token_id}"),
            Some(&env.key),
            None,
        )
        .await?;
    assert_eq!(t.body["status"], "active", "token not revoked");
    let types = event_types(&env).await;
    assert!(!types.iter().any(|t| t == "agent.revoked"), "{types:?}");
    assert_serving(&env).await;
    Ok(())
}

/// (case, method, path, body, status, code)
type Case = (
    &'static str,
    &'static str,
    String,
    Option<Value>,
    u16,
    &'static str,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn badinput_ids_routes_and_queries() -> Result<()> {
    let env = sqlite_env().await;
    let k = Some(env.key.as_str());
    let unknown = uuid::Uuid::new_v4();
    let cases: [Case; 12] = [
        (
            "id_agent_not_uuid",
            "GET",
            "/api/v1/agents/not-a-uuid".into(),
            None,
            404,
            "not_found",
        ),
        (
            "id_agent_sql_like",
            "GET",
            "/api/v1/agents/1%27%20OR%20%271%27=%271".into(),
            None,
            404,
            "not_found",
        ),
        (
            "id_agent_unknown",
            "GET",
            format!("/api/v1/agents/{unknown}"),
            None,
            404,
            "not_found",
        ),
        (
            "id_agent_revoke_not_uuid",
            "POST",
            "/api/v1/agents/42/revoke".into(),
            Some(json!({"reason": "x"})),
            404,
            "not_found",
        ),
        (
            "id_agent_revoke_unknown",
            "POST",
            format!("/api/v1/agents/{unknown}/revoke"),
            Some(json!({"reason": "x"})),
            404,
            "not_found",
        ),
        (
            "id_token_not_uuid",
            "GET",
            "/api/v1/agent-enrollment/tokens/xyz".into(),
            None,
            404,
            "not_found",
        ),
        (
            "id_tenant_crl_not_uuid",
            "GET",
            "/api/v1/tenants/nope/crl".into(),
            None,
            404,
            "not_found",
        ),
        (
            "query_limit_zero",
            "GET",
            "/api/v1/agents?limit=0".into(),
            None,
            422,
            "invalid_request",
        ),
        (
            "query_unknown_parameter",
            "GET",
            "/api/v1/agents?evil=1".into(),
            None,
            422,
            "invalid_request",
        ),
        (
            "query_bad_cursor",
            "GET",
            "/api/v1/agents?cursor=zzz".into(),
            None,
            422,
            "invalid_request",
        ),
        (
            "route_unknown",
            "GET",
            "/api/v1/nothing-here".into(),
            None,
            404,
            "route_not_found",
        ),
        (
            "route_wrong_method",
            "DELETE",
            "/api/v1/agents".into(),
            None,
            405,
            "method_not_allowed",
        ),
    ];
    for (case, method, path, body, status, code) in cases {
        let r = env.client.send(method, &path, k, body).await?;
        assert_problem(&r, status, code, case);
    }
    assert_eq!(agent_count(&env, &env.key).await, 0);
    assert!(!event_types(&env).await.iter().any(|t| t == "agent.revoked"));
    assert_serving(&env).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// gateway: certificates
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn badinput_gateway_refuses_broken_certificates_at_the_handshake() {
    let gw = start_gateway(Opts::shared_redis()).await;
    let agent = uuid::Uuid::new_v4().to_string();
    let now = time::OffsetDateTime::now_utc();
    let base = || LeafSpec::agent(&gw.ca, &agent);
    let foreign = TestPki::new(TD).tenant_ca(&gw.ca.tenant);
    let mut cases: Vec<(
        &str,
        oneprotect_testpki::Leaf,
        &oneprotect_testpki::TenantCa,
    )> = vec![("cert_foreign_ca", foreign.agent(&agent), &foreign)];
    let mut s = base();
    s.not_before = now - time::Duration::days(2);
    s.not_after = now - time::Duration::days(1);
    cases.push(("cert_expired", gw.ca.leaf(&s), &gw.ca));
    let mut s = base();
    s.not_before = now + time::Duration::days(1);
    s.not_after = now + time::Duration::days(2);
    cases.push(("cert_not_yet_valid", gw.ca.leaf(&s), &gw.ca));
    let mut s = base();
    s.uris = vec![format!(
        "spiffe://{TD}/tenant/{}/agent/{agent}",
        uuid::Uuid::new_v4()
    )];
    cases.push(("cert_tenant_mismatch_leaf_vs_ca", gw.ca.leaf(&s), &gw.ca));
    let mut s = base();
    s.uris.push(format!(
        "spiffe://{TD}/tenant/{}/agent/{}",
        gw.ca.tenant,
        uuid::Uuid::new_v4()
    ));
    cases.push(("cert_two_uri_sans", gw.ca.leaf(&s), &gw.ca));
    let mut s = base();
    s.uris.clear();
    s.dns = vec!["agent.example".into()];
    cases.push(("cert_no_uri_san", gw.ca.leaf(&s), &gw.ca));
    let mut s = base();
    s.is_ca = true;
    cases.push(("cert_leaf_is_ca", gw.ca.leaf(&s), &gw.ca));
    let mut s = base();
    s.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    cases.push(("cert_missing_client_auth_eku", gw.ca.leaf(&s), &gw.ca));
    let mut s = base();
    s.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyCertSign,
    ];
    cases.push(("cert_key_usage_cert_sign", gw.ca.leaf(&s), &gw.ca));
    let mut s = base();
    s.uris = vec![format!(
        "spiffe://other.test/tenant/{}/agent/{agent}",
        gw.ca.tenant
    )];
    cases.push(("cert_other_trust_domain", gw.ca.leaf(&s), &gw.ca));
    let mut s = base();
    s.uris = vec![format!(
        "https://{TD}/tenant/{}/agent/{agent}",
        gw.ca.tenant
    )];
    cases.push(("cert_uri_not_spiffe", gw.ca.leaf(&s), &gw.ca));

    for (case, leaf, ca) in &cases {
        assert!(refused(&gw, leaf, ca).await, "{case}: not refused");
        // Still serving after each refusal.
        let (mut s, _t) = gw.h1(Some((&gw.leaf, &gw.ca))).await.unwrap();
        assert_eq!(
            h1_send(&mut s, "/api/x", &[]).await.unwrap().status,
            200,
            "{case}: good client after"
        );
    }
    gw.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// gateway: headers
// ---------------------------------------------------------------------------------------------

/// Every client-sent identity header, in every spelling and duplicated, is
/// removed; the upstream sees exactly the injected set, each once — on an
/// identity route and on the certificate-less exchange route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn badinput_gateway_strips_spoofed_identity_headers() {
    let gw = start_gateway(Opts::shared_redis()).await;
    let mut spoofs: Vec<(String, String)> = Vec::new();
    for name in headers::INJECTED
        .iter()
        .chain(headers::STRIPPED_EXACT.iter())
        .chain(["x-oneprotect-anything-else"].iter())
    {
        let upper = name.to_uppercase();
        let mixed: String = name
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i % 2 == 0 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect();
        for n in [name.to_string(), upper, mixed] {
            spoofs.push((n.clone(), "spoofed-1".into()));
            spoofs.push((n, "spoofed-2".into()));
        }
    }
    let extra: Vec<(&str, &str)> = spoofs
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let (mut s, _t) = gw.h1(Some((&gw.leaf, &gw.ca))).await.unwrap();
    let r = h1_send(&mut s, "/api/spoof", &extra).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let ours: Vec<&String> = upstream_headers(&r)
        .keys()
        .filter(|k| headers::is_client_identity_header(k))
        .collect();
    assert_eq!(ours.len(), headers::INJECTED.len(), "{ours:?}");
    for name in headers::INJECTED {
        assert_ne!(only(&r, name), "spoofed-1");
    }
    assert_eq!(only(&r, headers::AGENT_ID), gw.id.agent().to_string());
    assert!(!r.body.to_string().contains("spoofed-"), "{}", r.body);

    let (mut s, _t) = gw.h1(None).await.unwrap();
    let r = h1_send(&mut s, EXCHANGE, &extra).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.body.to_string().contains("spoofed-"), "{}", r.body);
    assert!(!upstream_headers(&r)
        .keys()
        .any(|k| headers::is_client_identity_header(k)));
    gw.cleanup().await;
}

/// Sends `raw` on a fresh mTLS connection (good certificate) and reads
/// until the gateway closes or 30 s pass; returns what came back.
async fn raw_exchange(gw: &Gw, raw: &[u8]) -> String {
    let mut tls = gw
        .tls(gw.client(Some((&gw.leaf, &gw.ca)), b"http/1.1"))
        .await
        .unwrap();
    let _ = tls.write_all(raw).await;
    let _ = tls.flush().await;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn badinput_gateway_oversized_and_smuggled_requests() {
    let gw = start_gateway(Opts::shared_redis()).await;
    let id = uuid::Uuid::new_v4().simple().to_string();

    // One header of 1 MiB.
    let big = format!(
        "GET /api/big-{id} HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let out = raw_exchange(&gw, big.as_bytes()).await;
    // Refused by the gateway's head limit (listener.max_header_bytes).
    assert_raw_problem(&out, 431, "request_header_too_large");

    // Many headers.
    let mut many = format!("GET /api/many-{id} HTTP/1.1\r\nHost: localhost\r\n");
    for i in 0..2000 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let out = raw_exchange(&gw, many.as_bytes()).await;
    assert_eq!(
        statuses(&out),
        vec![400],
        "headers_too_many: {}",
        &out[..out.len().min(300)]
    );
    assert!(out.contains("Connection: close"), "{out}");

    // Content-Length and Transfer-Encoding together (CL.TE smuggling).
    let clte = format!(
        "POST /api/clte-{id} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /api/smuggled-clte-{id} HTTP/1.1\r\nHost: localhost\r\n\r\n"
    );
    let out = raw_exchange(&gw, clte.as_bytes()).await;
    // RFC 9112 6.1: processed as chunked, Content-Length dropped before
    // forwarding, the connection closed after the response: the trailing
    // request is never read.
    assert_eq!(statuses(&out), vec![200], "smuggling_cl_te: {out}");
    let (_, body) = out.split_once("\r\n\r\n").unwrap();
    let echoed: Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        echoed["headers"]["transfer-encoding"],
        json!(["chunked"]),
        "{body}"
    );
    assert!(echoed["headers"].get("content-length").is_none(), "{body}");

    // A chunked body (no Content-Length) over the route's 1 MiB limit:
    // 413 problem, connection closed.
    let mut chunked = format!(
        "POST /api/chunked-{id} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let chunk = "b".repeat(64 * 1024);
    for _ in 0..24 {
        chunked.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    chunked.push_str("0\r\n\r\n");
    let out = raw_exchange(&gw, chunked.as_bytes()).await;
    assert_eq!(
        statuses(&out),
        vec![413],
        "chunked_over_limit: {}",
        &out[..out.len().min(300)]
    );
    assert!(out.contains("payload_too_large"), "{out}");

    // Two different Content-Lengths.
    let clcl = format!(
        "POST /api/clcl-{id} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 40\r\nConnection: close\r\n\r\nhelloGET /api/smuggled-clcl-{id} HTTP/1.1\r\n\r\n"
    );
    let out = raw_exchange(&gw, clcl.as_bytes()).await;
    assert_eq!(statuses(&out), vec![400], "smuggling_cl_cl: {out}");
    assert!(out.contains("Connection: close"), "{out}");

    // An obfuscated Transfer-Encoding.
    let te = format!(
        "POST /api/tete-{id} HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: xchunked\r\nConnection: close\r\n\r\n0\r\n\r\n"
    );
    let out = raw_exchange(&gw, te.as_bytes()).await;
    assert_eq!(statuses(&out), vec![400], "smuggling_te_obfuscated: {out}");
    assert!(out.contains("Connection: close"), "{out}");

    let seen = seen_paths().lock().unwrap().clone();
    let reached: Vec<&String> = seen.iter().filter(|p| p.contains(&id)).collect();
    // The over-limit chunked request's head reaches the upstream (bodies
    // stream); its body is cut at the limit and never completes.
    assert_eq!(
        reached,
        vec![&format!("/api/clte-{id}"), &format!("/api/chunked-{id}")],
        "only the chunked CL.TE request (and the over-limit one's head) reached the upstream"
    );
    let (mut s, _t) = gw.h1(Some((&gw.leaf, &gw.ca))).await.unwrap();
    assert_eq!(h1_send(&mut s, "/api/x", &[]).await.unwrap().status, 200);
    gw.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// gateway: connections
// ---------------------------------------------------------------------------------------------

/// Reads from `tcp` (or a TLS stream) until the peer closes, at most
/// `bound`; true when it closed. Returns what was read too.
async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    tcp: &mut S,
    bound: Duration,
) -> (bool, Vec<u8>) {
    let deadline = tokio::time::Instant::now() + bound;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (true, out),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (false, out),
        }
    }
}

/// Opens an mTLS HTTP/1.1 connection, sends `chunks` with `pause` before
/// each, and reads until the gateway closes it (at most `bound`, else the
/// test fails). Returns what the gateway sent.
async fn sent_then_closed(
    gw: &Gw,
    chunks: &[&[u8]],
    pause: Duration,
    bound: Duration,
    case: &str,
) -> String {
    let mut tls = gw
        .tls(gw.client(Some((&gw.leaf, &gw.ca)), b"http/1.1"))
        .await
        .unwrap();
    for chunk in chunks {
        tokio::time::sleep(pause).await;
        if tls.write_all(chunk).await.is_err() || tls.flush().await.is_err() {
            break;
        }
    }
    let (closed, out) = closed_within(&mut tls, bound).await;
    assert!(closed, "{case}: not closed within {bound:?}");
    String::from_utf8_lossy(&out).into_owned()
}

/// One problem+json answer with `status` and `code`, closing the connection.
fn assert_raw_problem(out: &str, status: u16, code: &str) {
    assert_eq!(statuses(out), vec![status], "{out}");
    let (head, body) = out.split_once("\r\n\r\n").expect("a whole answer");
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("content-type: application/problem+json"),
        "{out}"
    );
    assert!(head.contains("connection: close"), "{out}");
    let problem: Value = serde_json::from_str(body).expect("a JSON body");
    assert_eq!(problem["code"], code, "{out}");
    assert_eq!(problem["status"], status, "{out}");
}

/// The sample lines of one metric family.
fn metric_lines(metrics: &str, name: &str) -> String {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Garbage instead of TLS and plain HTTP on the TLS port are closed at
/// once; a client that never finishes the handshake is cut by
/// `listener.handshake_timeout_ms`, a request head that stalls or trickles
/// by `listener.header_timeout_ms` (408, counted over the whole head, not
/// per read), a connection that sends nothing after its request by
/// `listener.idle_timeout_secs`; the gateway serves good clients throughout.
/// pingora's own bounds are 60 s per handshake and 60 s per header read, so
/// every bound below (20 s) can only hold through the gateway's deadlines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn badinput_gateway_connections_garbage_stalled_and_slowloris() {
    let gw = start_gateway(Opts {
        listener_extra:
            "handshake_timeout_ms = 1500\nheader_timeout_ms = 1500\nidle_timeout_secs = 2".into(),
        ..Opts::shared_redis()
    })
    .await;
    let bound = Duration::from_secs(20);
    let garbage = async {
        let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
        let junk: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
        let _ = tcp.write_all(&junk).await;
        let (closed, out) = closed_within(&mut tcp, Duration::from_secs(30)).await;
        assert!(closed, "conn_garbage_bytes: not closed");
        assert!(
            !String::from_utf8_lossy(&out).contains("HTTP/"),
            "conn_garbage_bytes"
        );
    };
    let plain = async {
        let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
        let _ = tcp
            .write_all(b"GET /api/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await;
        let (closed, out) = closed_within(&mut tcp, Duration::from_secs(30)).await;
        assert!(closed, "conn_plain_http: not closed");
        assert!(
            !String::from_utf8_lossy(&out).contains("HTTP/1.1 200"),
            "conn_plain_http"
        );
    };
    let silent = async {
        let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
        let (closed, _) = closed_within(&mut tcp, bound).await;
        assert!(
            closed,
            "conn_never_sends_client_hello: not closed within {bound:?}"
        );
    };
    let partial_hello = async {
        let mut tcp = TcpStream::connect(gw.addr).await.unwrap();
        // A handshake record header announcing 512 bytes, then nothing.
        let _ = tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await;
        let (closed, _) = closed_within(&mut tcp, bound).await;
        assert!(
            closed,
            "conn_partial_client_hello: not closed within {bound:?}"
        );
    };
    let slowloris = async {
        let half: &[u8] = b"GET /api/slow HTTP/1.1\r\nHost: localhost\r\nX-A: 1\r\n";
        let out = sent_then_closed(
            &gw,
            &[half],
            Duration::ZERO,
            bound,
            "conn_slowloris_stalled_header",
        )
        .await;
        assert_raw_problem(&out, 408, "request_header_timeout");
    };
    let trickle = async {
        // One byte every 100 ms: each read comes quickly, the head never ends
        // within the deadline.
        let head = b"GET /api/trickle HTTP/1.1\r\nHost: localhost\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let bytes: Vec<&[u8]> = head.chunks(1).collect();
        let out = sent_then_closed(
            &gw,
            &bytes,
            Duration::from_millis(100),
            bound,
            "conn_slowloris_trickle",
        )
        .await;
        assert_raw_problem(&out, 408, "request_header_timeout");
    };
    let idle = async {
        // The answer, then nothing until the idle timeout closes the
        // connection without another word.
        let request: &[u8] = b"GET /api/idle HTTP/1.1\r\nHost: localhost\r\n\r\n";
        let out = sent_then_closed(
            &gw,
            &[request],
            Duration::ZERO,
            bound,
            "conn_idle_keepalive",
        )
        .await;
        assert_eq!(statuses(&out), vec![200], "conn_idle_keepalive: {out}");
        assert!(
            !out.to_ascii_lowercase().contains("connection: close"),
            "{out}"
        );
    };
    let served = async {
        // Good clients are served while the bad ones hang on.
        for _ in 0..5 {
            let (mut s, _t) = gw.h1(Some((&gw.leaf, &gw.ca))).await.unwrap();
            assert_eq!(h1_send(&mut s, "/api/x", &[]).await.unwrap().status, 200);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::join!(
        garbage,
        plain,
        silent,
        partial_hello,
        slowloris,
        trickle,
        idle,
        served
    );
    let metrics = gw.admin_get("/metrics").await.1;
    let closes = metric_lines(&metrics, "oneprotect_gateway_connections_closed_total");
    assert!(closes.contains("reason=\"header_timeout\"} 2"), "{closes}");
    assert!(closes.contains("reason=\"idle_timeout\"}"), "{closes}");
    let failures = metric_lines(&metrics, "oneprotect_gateway_handshake_failures_total");
    assert!(failures.contains("reason=\"timeout\"} 2"), "{failures}");
    let (mut s, _t) = gw.h1(Some((&gw.leaf, &gw.ca))).await.unwrap();
    assert_eq!(h1_send(&mut s, "/api/x", &[]).await.unwrap().status, 200);
    gw.cleanup().await;
}
