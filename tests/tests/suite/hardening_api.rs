//! Issue 15, the enroll-api's trust boundary (items 8, 9, 10, 11, 12, 14, 15,
//! 16), over real sockets against the real enroll-api (HTTPS; SQLite, and
//! PostgreSQL where backends differ), with independent clients where the
//! boundary is the point: `curl` (bound to 127.0.0.2 / 127.0.0.3 as client
//! addresses), raw TLS sockets, the `openssl` CLI and nginx. Every case is a
//! row of "enroll-api trust boundary (issue 15)" in `docs/bad-input.md`.
//!
//! `cargo test -p oneprotect-tests --test suite hardening_api::` (needs
//! PostgreSQL, `openssl` and `curl`; nginx for the CRL case, which is skipped
//! with a printed message when no nginx binary is found:
//! `apt-get install -y nginx`).

// Helpers run only inside tests, where a panic with its message is the
// failure report.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::enroll::{
    create_token, exchange_body, openssl, openssl_csr, start_with, Db, Env, Reply,
};
use oneprotect_enroll_api::config::{Config, TrustedKey};
use oneprotect_enroll_api::service;
use oneprotect_identity::events::EVENT_TYPES;
use oneprotect_identity::headers::IDENTITY_ASSERTION;
use oneprotect_identity::{problem, AgentId, AssertionClaims, AssertionSigner, SerialNumber};
use oneprotect_tests::workspace_root;

const EX: &str = "/api/v1/agent-enrollment/exchange";
const TOKENS: &str = "/api/v1/agent-enrollment/tokens";
const KID: &str = "gw-hardening";
const TD: &str = "oneprotect.test";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn openapi() -> Value {
    let text = std::fs::read_to_string(workspace_root().join("specs/openapi.yaml")).unwrap();
    serde_yaml::from_str(&text).unwrap()
}

/// Follows local `$ref`s.
fn deref<'a>(doc: &'a Value, mut v: &'a Value) -> &'a Value {
    while let Some(r) = v.get("$ref").and_then(Value::as_str) {
        v = doc
            .pointer(r.strip_prefix('#').unwrap())
            .unwrap_or_else(|| panic!("dangling {r}"));
    }
    v
}

/// Every (method, path, operation) of the spec.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                out.push((method.clone(), path.clone(), op.clone()));
            }
        }
    }
    out
}

fn assert_problem(r: &Reply, status: u16, code: &str, case: &str) {
    assert_eq!(r.status, status, "{case}: {}", r.body);
    assert_eq!(r.body["code"], code, "{case}: {}", r.body);
    assert_eq!(
        r.headers.get("content-type").map(|v| v.to_str().unwrap()),
        Some(problem::CONTENT_TYPE),
        "{case}"
    );
}

fn json_headers(key: Option<&str>) -> Vec<(String, String)> {
    let mut h = vec![("content-type".to_owned(), "application/json".to_owned())];
    if let Some(k) = key {
        h.push(("authorization".to_owned(), format!("Bearer {k}")));
    }
    h
}

/// An enroll-api on SQLite (or PostgreSQL) that also trusts a gateway
/// assertion key, so the agent endpoints can be called directly.
async fn env_with(db: Db, tweak: impl FnOnce(&mut Config)) -> Result<(Env, AssertionSigner)> {
    let (signer, _) = AssertionSigner::generate(KID).map_err(|_| anyhow::anyhow!("key"))?;
    use base64::Engine as _;
    let public = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signer.public_key());
    let env = start_with(db, service::system_clock(), |c| {
        c.rotation.assertion.keys = vec![TrustedKey {
            kid: KID.into(),
            public_key: public,
        }];
        tweak(c);
    })
    .await?;
    Ok((env, signer))
}

/// What a gateway asserts for `serial` of `agent`.
fn assertion(env: &Env, signer: &AssertionSigner, agent: &str, serial: &str) -> String {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let agent: AgentId = agent.parse().unwrap();
    signer.sign(&AssertionClaims {
        iss: "oneprotect-gateway".into(),
        sub: format!("spiffe://{TD}/tenant/{}/agent/{agent}", env.tenant)
            .parse()
            .unwrap(),
        aud: "enroll-api".into(),
        iat: now,
        exp: now + 60,
        tenant_id: env.tenant,
        agent_id: agent,
        serial: serial.parse::<SerialNumber>().unwrap(),
        cert_sha256: oneprotect_identity::CertFingerprint::of_der(b"not the certificate"),
        cert_not_after: now + 3600,
    })
}

async fn enroll(env: &Env, name: &str) -> Result<Value> {
    let (_, token) = create_token(env, json!({})).await?;
    let csr = openssl_csr(&env.dir, name)?;
    let r = env
        .client
        .send("POST", EX, None, Some(exchange_body(&token, &csr)))
        .await?;
    ensure!(r.status == 201, "exchange: {} {}", r.status, r.body);
    Ok(r.body)
}

async fn token_uses(env: &Env, token_id: &str) -> u64 {
    let r = env
        .client
        .send("GET", &format!("{TOKENS}/{token_id}"), Some(&env.key), None)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["uses"].as_u64().unwrap()
}

async fn count(env: &Env, path: &str) -> usize {
    let r = env
        .client
        .send("GET", path, Some(&env.key), None)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["items"].as_array().unwrap().len()
}

/// A TLS connection to the service, trusting only its dev certificate.
async fn tls_connect(env: &Env) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(env.dir.join("tls/dev-cert.pem"))?
    {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let addr = env.running.as_ref().unwrap().https_addr.unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await?)
}

// ---------------------------------------------------------------------------------------------
// Item 8: answers with a secret or a certificate are not cacheable; spec headers are sent
// ---------------------------------------------------------------------------------------------

/// Every header that `specs/openapi.yaml` lists on a success answer is sent
/// by the live service, with a value its schema accepts; every answer that
/// carries a token secret or a freshly issued certificate has
/// `Cache-Control: no-store` (and `Pragma: no-cache`); token creation's
/// `Location` names the new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn success_headers_listed_in_the_spec_are_sent() -> Result<()> {
    let (env, signer) = env_with(Db::Sqlite, |_| {}).await?;
    let doc = openapi();
    // One live call per operation whose success answer lists headers.
    let (_, token) = create_token(&env, json!({})).await?;
    let csr = openssl_csr(&env.dir, "h1")?;
    let enrolled = env
        .client
        .send("POST", EX, None, Some(exchange_body(&token, &csr)))
        .await?;
    ensure!(enrolled.status == 201, "{}", enrolled.body);
    let agent = enrolled.body["agent_id"].as_str().unwrap().to_owned();
    let serial = enrolled.body["serial"].as_str().unwrap().to_owned();
    let created = env
        .client
        .send("POST", TOKENS, Some(&env.key), Some(json!({})))
        .await?;
    let csr2 = openssl_csr(&env.dir, "h2")?;
    let mut h = json_headers(None);
    h.push((
        IDENTITY_ASSERTION.to_owned(),
        assertion(&env, &signer, &agent, &serial),
    ));
    let rotated = env
        .client
        .send_raw(
            "POST",
            &format!("/api/v1/agents/{agent}/certificate/rotate"),
            &h,
            Bytes::from(json!({"csr_pem": csr2}).to_string()),
        )
        .await?;
    ensure!(rotated.status == 200, "{}", rotated.body);
    let new_serial = rotated.body["serial"].as_str().unwrap().to_owned();
    let confirmed = env
        .client
        .send_raw(
            "POST",
            &format!("/api/v1/agents/{agent}/certificate/confirm"),
            &[(
                IDENTITY_ASSERTION.to_owned(),
                assertion(&env, &signer, &agent, &new_serial),
            )],
            Bytes::new(),
        )
        .await?;
    let tenant = env.tenant.to_string();
    let crl = env
        .client
        .send("GET", &format!("/api/v1/tenants/{tenant}/crl"), None, None)
        .await?;
    let crl_chain = env
        .client
        .send(
            "GET",
            &format!("/api/v1/tenants/{tenant}/crl-chain"),
            None,
            None,
        )
        .await?;
    let root_crl = env.client.send("GET", "/api/v1/crl", None, None).await?;
    let jwks = env
        .client
        .send("GET", "/.well-known/jwks.json", None, None)
        .await?;
    let live: std::collections::BTreeMap<&str, &Reply> = [
        ("createEnrollmentToken", &created),
        ("exchangeEnrollmentToken", &enrolled),
        ("rotateAgentCertificate", &rotated),
        ("confirmAgentCertificate", &confirmed),
        ("getTenantCrl", &crl),
        ("getTenantCrlChain", &crl_chain),
        ("getRootCrl", &root_crl),
        ("getAssertionKeys", &jwks),
    ]
    .into_iter()
    .collect();
    let mut checked = 0;
    for (method, path, op) in operations(&doc) {
        for (status, response) in op["responses"].as_object().unwrap() {
            if !status.starts_with('2') {
                continue;
            }
            let response = deref(&doc, response);
            let Some(headers) = response["headers"].as_object() else {
                continue;
            };
            let id = op["operationId"].as_str().unwrap();
            let r = live.get(id).unwrap_or_else(|| {
                panic!("{id} lists success headers: add a live call for it here")
            });
            assert_eq!(r.status.to_string(), *status, "{method} {path}: {}", r.body);
            for (name, header) in headers {
                let header = deref(&doc, header);
                let value = r
                    .headers
                    .get(name.as_str())
                    .unwrap_or_else(|| panic!("{method} {path} {status}: no {name} header"))
                    .to_str()
                    .unwrap();
                let validator = jsonschema::validator_for(&header["schema"]).unwrap();
                assert!(
                    validator.is_valid(&json!(value)),
                    "{method} {path} {status}: {name}: {value:?} does not fit {}",
                    header["schema"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 8, "only {checked} headers checked");
    // Whatever the spec says: an answer with a secret or a certificate is
    // never cacheable.
    for (what, r) in [
        ("token created", &created),
        ("exchange", &enrolled),
        ("rotate", &rotated),
    ] {
        let text = r.body.to_string();
        assert!(
            text.contains("opet_") || text.contains("BEGIN CERTIFICATE"),
            "{what}"
        );
        assert_eq!(r.headers["cache-control"], "no-store", "{what}");
        assert_eq!(r.headers["pragma"], "no-cache", "{what}");
    }
    // Location resolves to the token just created.
    let location = created.headers["location"].to_str().unwrap();
    let fetched = env
        .client
        .send("GET", location, Some(&env.key), None)
        .await?;
    assert_eq!(fetched.status, 200, "{}", fetched.body);
    assert_eq!(fetched.body["token_id"], created.body["token_id"]);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Item 9: every request body is a closed object
// ---------------------------------------------------------------------------------------------

/// The JSON pointers of every object schema inside `schema` that refuses
/// unknown properties (the body itself is `""`).
fn closed_objects(doc: &Value, schema: &Value, at: String, out: &mut Vec<String>) {
    let schema = deref(doc, schema);
    if schema["type"] == "object" && schema["additionalProperties"] == json!(false) {
        out.push(at.clone());
    }
    for (name, property) in schema["properties"].as_object().into_iter().flatten() {
        closed_objects(doc, property, format!("{at}/{name}"), out);
    }
}

/// Walks every request schema of `specs/openapi.yaml`: for each operation
/// with a request body, a valid body (its spec example, made real where the
/// example holds placeholders) is sent as a JSON array, as scalars, and with
/// an unknown field added to every closed object in it (top level and
/// nested, e.g. `"admin": true`, `agent.tenant_id`). Each is 422
/// `invalid_request`; nothing is consumed or written (token uses, agents,
/// tokens, the agent's certificate and status are unchanged); the
/// unmodified body then succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_strict_for_every_schema_in_the_spec() -> Result<()> {
    let (env, signer) = env_with(Db::Sqlite, |_| {}).await?;
    let doc = openapi();
    let first = enroll(&env, "walk0").await?;
    let agent = first["agent_id"].as_str().unwrap().to_owned();
    let serial = first["serial"].as_str().unwrap().to_owned();
    let (token_id, token) = create_token(&env, json!({"max_uses": 1})).await?;
    let csr = openssl_csr(&env.dir, "walk1")?;
    let tokens_before = count(&env, TOKENS).await;
    let mut walked = BTreeSet::new();
    for (method, path, op) in operations(&doc) {
        let Some(body) = op.get("requestBody") else {
            continue;
        };
        let id = op["operationId"].as_str().unwrap().to_owned();
        let content = &deref(&doc, body)["content"]["application/json"];
        let schema = &content["schema"];
        let example = content["examples"]
            .as_object()
            .unwrap()
            .values()
            .map(|e| deref(&doc, e)["value"].clone())
            .max_by_key(|v| v.as_object().map_or(0, |o| o.len()))
            .unwrap();
        // The request: real path ids, auth and placeholder values.
        let path = path.replace("{agent_id}", &agent);
        let mut headers = json_headers(None);
        let mut valid = example.clone();
        match id.as_str() {
            "createEnrollmentToken" | "revokeAgent" => {
                headers = json_headers(Some(&env.key));
            }
            "exchangeEnrollmentToken" => {
                valid["token"] = json!(token);
                valid["csr_pem"] = json!(csr);
            }
            "rotateAgentCertificate" => {
                valid["csr_pem"] = json!(openssl_csr(&env.dir, "walk2")?);
                headers.push((
                    IDENTITY_ASSERTION.to_owned(),
                    assertion(&env, &signer, &agent, &serial),
                ));
            }
            other => panic!("{other} takes a body: add its request set-up here"),
        }
        let mut bad: Vec<(String, Value)> = vec![
            (
                "array_of_the_values".into(),
                Value::Array(valid.as_object().unwrap().values().cloned().collect()),
            ),
            ("empty_array".into(), json!([])),
            ("string".into(), json!("x")),
            ("number".into(), json!(42)),
            ("null".into(), Value::Null),
        ];
        let mut objects = Vec::new();
        closed_objects(&doc, schema, String::new(), &mut objects);
        assert!(
            objects.contains(&String::new()),
            "{id}: body schema not closed"
        );
        for at in &objects {
            for field in ["admin", "tenant_id"] {
                let mut v = valid.clone();
                let target = v
                    .pointer_mut(at)
                    .unwrap_or_else(|| panic!("{id}: {at} not in the example"));
                target[field] = json!(true);
                bad.push((format!("unknown_field {at}/{field}"), v));
            }
        }
        for (case, body) in &bad {
            let r = env
                .client
                .send_raw(
                    &method.to_uppercase(),
                    &path,
                    &headers,
                    Bytes::from(body.to_string()),
                )
                .await?;
            assert_problem(&r, 422, "invalid_request", &format!("{id} {case}"));
        }
        // Nothing happened.
        assert_eq!(token_uses(&env, &token_id).await, 0, "{id}");
        assert_eq!(count(&env, "/api/v1/agents").await, 1, "{id}");
        assert_eq!(count(&env, TOKENS).await, tokens_before, "{id}");
        let a = env
            .client
            .send(
                "GET",
                &format!("/api/v1/agents/{agent}"),
                Some(&env.key),
                None,
            )
            .await?;
        assert_eq!(a.body["status"], "active", "{id}");
        assert_eq!(a.body["current_serial"], json!(serial), "{id}");
        walked.insert(id);
    }
    assert_eq!(
        walked,
        BTreeSet::from(
            [
                "createEnrollmentToken",
                "exchangeEnrollmentToken",
                "rotateAgentCertificate",
                "revokeAgent"
            ]
            .map(String::from)
        )
    );
    // The same bodies, unmodified, are accepted (the mutation was the refusal's only cause).
    let r = env
        .client
        .send("POST", EX, None, Some(exchange_body(&token, &csr)))
        .await?;
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(token_uses(&env, &token_id).await, 1);
    let r = env
        .client
        .send(
            "POST",
            TOKENS,
            Some(&env.key),
            Some(json!({"description": "ok"})),
        )
        .await?;
    assert_eq!(r.status, 201, "{}", r.body);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Item 10: free text is checked once, the same on both backends
// ---------------------------------------------------------------------------------------------

async fn control_characters_refused(db: Db) -> Result<()> {
    let env = start_with(db, service::system_clock(), |_| {}).await?;
    let first = enroll(&env, "nul").await?;
    let agent = first["agent_id"].as_str().unwrap().to_owned();
    let tokens_before = count(&env, TOKENS).await;
    let cases: [(&str, Value); 6] = [
        ("description_nul", json!({"description": "a\u{0}b"})),
        (
            "description_newline",
            json!({"description": "forged\nlog line"}),
        ),
        (
            "description_escape",
            json!({"description": "\u{1b}[31mred"}),
        ),
        (
            "label_value_nul",
            json!({"labels": {"site": "ber\u{0}lin"}}),
        ),
        ("label_key_nul", json!({"labels": {"si\u{0}te": "berlin"}})),
        ("description_c1", json!({"description": "c1\u{85}"})),
    ];
    for (case, body) in &cases {
        let r = env
            .client
            .send("POST", TOKENS, Some(&env.key), Some(body.clone()))
            .await?;
        assert_problem(&r, 422, "invalid_request", &format!("{db:?} {case}"));
    }
    assert_eq!(
        count(&env, TOKENS).await,
        tokens_before,
        "{db:?}: no token created"
    );
    let r = env
        .client
        .send(
            "POST",
            &format!("/api/v1/agents/{agent}/revoke"),
            Some(&env.key),
            Some(json!({"reason": "stolen\u{0}"})),
        )
        .await?;
    assert_problem(&r, 422, "invalid_request", &format!("{db:?} reason_nul"));
    let (token_id, token) = create_token(&env, json!({})).await?;
    let csr = openssl_csr(&env.dir, "nul2")?;
    let mut body = exchange_body(&token, &csr);
    body["agent"]["os"] = json!("linux\u{0}");
    let r = env.client.send("POST", EX, None, Some(body)).await?;
    assert_problem(&r, 422, "invalid_request", &format!("{db:?} agent_os_nul"));
    assert_eq!(token_uses(&env, &token_id).await, 0);
    let a = env
        .client
        .send(
            "GET",
            &format!("/api/v1/agents/{agent}"),
            Some(&env.key),
            None,
        )
        .await?;
    assert_eq!(a.body["status"], "active");
    // Other Unicode is kept, the same on both backends.
    let r = env
        .client
        .send(
            "POST",
            &format!("/api/v1/agents/{agent}/revoke"),
            Some(&env.key),
            Some(json!({"reason": "Gerät – 端末 ✓"})),
        )
        .await?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["revocation_reason"], "Gerät – 端末 ✓");
    Ok(())
}

/// A NUL (or any control character) in a token description or label, a
/// revocation reason or the agent's self-description is 422 on PostgreSQL
/// exactly as on SQLite (it was 500 and 201), and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_free_text_are_refused_on_both_backends() -> Result<()> {
    control_characters_refused(Db::Sqlite).await?;
    control_characters_refused(Db::Postgres).await
}

// ---------------------------------------------------------------------------------------------
// Item 11: the Bearer scheme is case-insensitive
// ---------------------------------------------------------------------------------------------

/// `Authorization: bearer …`, `BEARER …`, extra spaces: accepted (RFC 9110
/// §11.1); other schemes and a missing credential: 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_scheme_is_case_insensitive() -> Result<()> {
    let env = start_with(Db::Sqlite, service::system_clock(), |_| {}).await?;
    let key = env.key.clone();
    for value in [
        format!("Bearer {key}"),
        format!("bearer {key}"),
        format!("BEARER {key}"),
        format!("bEaReR {key}"),
        format!("Bearer   {key}"),
    ] {
        let r = env
            .client
            .send_raw(
                "GET",
                "/api/v1/agents",
                &[("authorization".into(), value.clone())],
                Bytes::new(),
            )
            .await?;
        assert_eq!(
            r.status,
            200,
            "{}: {}",
            value.replace(&key, "<key>"),
            r.body
        );
    }
    for value in [
        format!("Basic {key}"),
        format!("Bearerx {key}"),
        format!("Bearer{key}"),
        "Bearer".to_owned(),
        "bearer ".to_owned(),
        key.clone(),
    ] {
        let r = env
            .client
            .send_raw(
                "GET",
                "/api/v1/agents",
                &[("authorization".into(), value.clone())],
                Bytes::new(),
            )
            .await?;
        assert_problem(&r, 401, "unauthorized", &value.replace(&key, "<key>"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Item 12: the spec's Event schema cannot drift from identity's event types
// ---------------------------------------------------------------------------------------------

/// `components/schemas/Event` in `specs/openapi.yaml` is one of exactly the
/// event schemas of `identity::events::EVENT_TYPES`, and an agent's event
/// history (which includes `agent.certificate.superseded`) validates.
#[test]
fn openapi_event_schema_lists_exactly_the_identity_event_types() {
    let doc = openapi();
    let listed: BTreeSet<String> = doc["components"]["schemas"]["Event"]["oneOf"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["$ref"].as_str().unwrap().to_owned())
        .collect();
    let expected: BTreeSet<String> = EVENT_TYPES
        .iter()
        .map(|t| format!("events/{t}.v1.schema.json"))
        .collect();
    assert_eq!(
        listed, expected,
        "Event.oneOf vs identity::events::EVENT_TYPES"
    );
    for r in &listed {
        assert!(workspace_root().join("specs").join(r).is_file(), "{r}");
    }
}

// ---------------------------------------------------------------------------------------------
// Item 15: a stalled body gets 408
// ---------------------------------------------------------------------------------------------

/// Reads everything until the server closes (bounded by `limit`).
async fn read_until_closed<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    limit: Duration,
) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

fn head(len: usize) -> String {
    format!(
        "POST {EX} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n"
    )
}

fn assert_408(case: &str, out: &str, closed: bool) {
    assert!(out.starts_with("HTTP/1.1 408"), "{case}: {out}");
    assert!(out.contains("request_body_timeout"), "{case}: {out}");
    assert!(
        out.to_ascii_lowercase().contains("connection: close"),
        "{case}: {out}"
    );
    assert!(
        closed,
        "{case}: the connection must be closed after the 408"
    );
}

/// A body that stops after 20 of 200 announced bytes, and one that trickles
/// a byte every 100 ms (each read quick, the whole never done), both get 408
/// `request_body_timeout` with `Connection: close` at the configured
/// deadline (1 s here, default 10 s) and the connection is closed; the
/// service keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_trickled_bodies_get_408() -> Result<()> {
    let env = start_with(Db::Sqlite, service::system_clock(), |c| {
        c.limits.body_read_timeout_ms = 1000;
    })
    .await?;
    // Stalled: part of the body, then nothing (the socket stays open).
    let mut s = tls_connect(&env).await?;
    s.write_all(head(200).as_bytes()).await?;
    s.write_all(br#"{"token":"opet_aaaaa"#).await?;
    s.flush().await?;
    let (out, closed) = read_until_closed(&mut s, Duration::from_secs(30)).await;
    assert_408("body_stalled", &out, closed);

    // Trickled: one byte every 100 ms, at most 300 (30 s), on its own task.
    let s = tls_connect(&env).await?;
    let (mut rd, mut wr) = tokio::io::split(s);
    wr.write_all(head(400).as_bytes()).await?;
    wr.flush().await?;
    let writer = tokio::spawn(async move {
        for _ in 0..300 {
            if wr.write_all(b" ").await.is_err() || wr.flush().await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let (out, closed) = read_until_closed(&mut rd, Duration::from_secs(30)).await;
    writer.abort();
    assert_408("body_trickled", &out, closed);

    // A complete body on a fresh connection is served as before.
    let r = env.client.send("GET", "/healthz", None, None).await?;
    assert_eq!(r.status, 200);
    let r = env
        .client
        .send("POST", TOKENS, Some(&env.key), Some(json!({})))
        .await?;
    assert_eq!(r.status, 201, "{}", r.body);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Item 14: the exchange's per-address limit sees the client, never a forged header
// ---------------------------------------------------------------------------------------------

/// One exchange by `curl`, from `source` (bound with `--interface`), with an
/// optional `X-Forwarded-For`; the HTTP status.
async fn curl_exchange(env: &Env, source: &str, xff: Option<&str>, body: &Value) -> Result<u16> {
    let addr = env.running.as_ref().unwrap().https_addr.unwrap();
    let body_file = env.dir.join(format!("body-{}.json", uuid::Uuid::new_v4()));
    std::fs::write(&body_file, body.to_string())?;
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "--interface", source, "--cacert"])
        .arg(env.dir.join("tls/dev-cert.pem"))
        .args([
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-H",
            "content-type: application/json",
        ]);
    if let Some(x) = xff {
        cmd.args(["-H", &format!("x-forwarded-for: {x}")]);
    }
    cmd.arg("--data-binary")
        .arg(format!("@{}", body_file.display()))
        .arg(format!("https://127.0.0.1:{}{EX}", addr.port()));
    let out = cmd.output().await.context("run curl")?;
    ensure!(
        out.status.success(),
        "curl from {source}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

fn bogus_exchange() -> Value {
    exchange_body(&format!("opet_{}", "B".repeat(43)), "not a csr")
}

async fn valid_exchange(env: &Env, name: &str) -> Result<Value> {
    let (_, token) = create_token(env, json!({})).await?;
    Ok(exchange_body(&token, &openssl_csr(&env.dir, name)?))
}

/// The per-address exchange limit (burst 3 here) with `forwarded.trusted_proxies
/// = ["127.0.0.1"]`: a client at 127.0.0.2 that exhausts its bucket is
/// limited whatever `X-Forwarded-For` it forges, while 127.0.0.3 enrolls; behind
/// the trusted peer 127.0.0.1 (the gateway's place), the right-most forwarded
/// address is the bucket: one forwarded client exhausting its bucket does not
/// block another forwarded client, and a client-written entry left of the
/// gateway's is ignored. With the default (nobody trusted), the header from
/// 127.0.0.1 is ignored too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_rate_limit_uses_the_forwarded_client_only_from_trusted_peers() -> Result<()> {
    let limits = |c: &mut Config| {
        c.limits.exchange_per_address_burst = 3;
        c.limits.exchange_per_address_per_minute = 1;
    };
    let env = start_with(Db::Sqlite, service::system_clock(), |c| {
        limits(c);
        c.forwarded.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await?;
    let bogus = bogus_exchange();

    // 1. Untrusted 127.0.0.2 forging a new X-Forwarded-For each time.
    for i in 0..3 {
        let xff = format!("203.0.113.{i}");
        assert_eq!(
            curl_exchange(&env, "127.0.0.2", Some(&xff), &bogus).await?,
            401,
            "bogus {i}"
        );
    }
    assert_eq!(
        curl_exchange(&env, "127.0.0.2", Some("203.0.113.99"), &bogus).await?,
        429,
        "xff_forged_by_untrusted_peer: limited on its own address"
    );
    let good = valid_exchange(&env, "c2").await?;
    assert_eq!(
        curl_exchange(&env, "127.0.0.2", None, &good).await?,
        429,
        "still limited"
    );
    // 2. Another source address is not affected.
    assert_eq!(
        curl_exchange(&env, "127.0.0.3", None, &good).await?,
        201,
        "127.0.0.3 enrolls"
    );

    // 3. Behind the trusted peer: the forwarded client 198.51.100.7 exhausts its bucket...
    for i in 0..3 {
        assert_eq!(
            curl_exchange(&env, "127.0.0.1", Some("198.51.100.7"), &bogus).await?,
            401,
            "forwarded bogus {i}"
        );
    }
    assert_eq!(
        curl_exchange(&env, "127.0.0.1", Some("198.51.100.7"), &bogus).await?,
        429,
        "xff_from_trusted_peer: limited on the forwarded address"
    );
    // ...which does not block another client through the same gateway,
    let good = valid_exchange(&env, "c3").await?;
    assert_eq!(
        curl_exchange(&env, "127.0.0.1", Some("198.51.100.8"), &good).await?,
        201,
        "another forwarded client enrolls"
    );
    // and only the right-most entry counts.
    let good = valid_exchange(&env, "c4").await?;
    assert_eq!(
        curl_exchange(&env, "127.0.0.1", Some("198.51.100.7, 198.51.100.9"), &good).await?,
        201,
        "xff_left_entries_ignored: the bucket is .9"
    );
    assert_eq!(
        curl_exchange(&env, "127.0.0.1", Some("198.51.100.9, 198.51.100.7"), &good).await?,
        429,
        "xff_prepended_entry_does_not_escape: the bucket is .7"
    );

    // 4. Default configuration: nobody is trusted.
    let plain = start_with(Db::Sqlite, service::system_clock(), limits).await?;
    for i in 0..3 {
        let xff = format!("192.0.2.{i}");
        assert_eq!(
            curl_exchange(&plain, "127.0.0.1", Some(&xff), &bogus).await?,
            401,
            "plain {i}"
        );
    }
    assert_eq!(
        curl_exchange(&plain, "127.0.0.1", Some("192.0.2.77"), &bogus).await?,
        429,
        "xff_ignored_by_default"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Item 16: CRLs for every CA of the chain, usable by nginx
// ---------------------------------------------------------------------------------------------

fn nginx_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

async fn curl_get_file(env: &Env, path: &str, out: &Path) -> Result<()> {
    let addr = env.running.as_ref().unwrap().https_addr.unwrap();
    let st = tokio::process::Command::new("curl")
        .args(["-sS", "--fail", "--max-time", "20", "--cacert"])
        .arg(env.dir.join("tls/dev-cert.pem"))
        .arg("-o")
        .arg(out)
        .arg(format!("https://127.0.0.1:{}{path}", addr.port()))
        .status()
        .await?;
    ensure!(st.success(), "curl {path}");
    Ok(())
}

/// curl with a client certificate to nginx; (HTTP status, body).
async fn curl_mtls(dir: &Path, port: u16, name: &str) -> Result<(u16, String)> {
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "--cacert",
            "server.pem",
            "--cert",
        ])
        .arg(format!("{name}.pem"))
        .arg("--key")
        .arg(format!("{name}.key"))
        .args(["-w", "\n%{http_code}"])
        .arg(format!("https://127.0.0.1:{port}/"))
        .current_dir(dir)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
}

struct Nginx(std::process::Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The root CRL (`/api/v1/crl`) and the combined tenant + root file
/// (`/api/v1/tenants/{id}/crl-chain`) verify under the root with the openssl
/// CLI; `openssl verify -crl_check_all` with the combined file accepts a good
/// agent and refuses a revoked one (with only the tenant CRL it refuses both:
/// "unable to get certificate CRL"). Then nginx (Debian package) configured
/// with our CA chain and `ssl_crl` from our endpoint accepts the good agent
/// and refuses the revoked one, while an nginx given only the tenant CRL
/// refuses every agent, as the issue found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_with_our_crl_chain_accepts_good_and_refuses_revoked_agents() -> Result<()> {
    let env = start_with(Db::Sqlite, service::system_clock(), |_| {}).await?;
    let dir = env.dir.clone();
    let tenant = env.tenant.to_string();
    let good = enroll(&env, "good").await?;
    let bad = enroll(&env, "bad").await?;
    for (name, r) in [("good", &good), ("bad", &bad)] {
        std::fs::write(
            dir.join(format!("{name}.pem")),
            r["certificate_pem"].as_str().unwrap(),
        )?;
    }
    std::fs::write(
        dir.join("root.pem"),
        good["trust_bundle_pem"].as_str().unwrap(),
    )?;
    std::fs::write(
        dir.join("tenant-ca.pem"),
        good["chain_pem"].as_str().unwrap(),
    )?;
    std::fs::write(
        dir.join("ca-chain.pem"),
        format!(
            "{}{}",
            good["chain_pem"].as_str().unwrap(),
            good["trust_bundle_pem"].as_str().unwrap()
        ),
    )?;
    let bad_agent = bad["agent_id"].as_str().unwrap();
    let r = env
        .client
        .send(
            "POST",
            &format!("/api/v1/agents/{bad_agent}/revoke"),
            Some(&env.key),
            Some(json!({"reason": "stolen laptop"})),
        )
        .await?;
    assert_eq!(r.status, 200, "{}", r.body);

    // Fetched with curl, as an operator's cron job would.
    curl_get_file(
        &env,
        &format!("/api/v1/tenants/{tenant}/crl-chain"),
        &dir.join("crl-chain.pem"),
    )
    .await?;
    curl_get_file(
        &env,
        &format!("/api/v1/tenants/{tenant}/crl?format=pem"),
        &dir.join("tenant-crl.pem"),
    )
    .await?;
    curl_get_file(&env, "/api/v1/crl", &dir.join("root-crl.der")).await?;
    let chain = std::fs::read_to_string(dir.join("crl-chain.pem"))?;
    assert_eq!(
        chain.matches("-----BEGIN X509 CRL-----").count(),
        2,
        "{chain}"
    );
    let root_crl = openssl(
        &[
            "crl",
            "-inform",
            "DER",
            "-in",
            "root-crl.der",
            "-CAfile",
            "root.pem",
            "-noout",
            "-text",
        ],
        &dir,
    )?;
    assert!(root_crl.contains("No Revoked Certificates"), "{root_crl}");
    assert!(root_crl.contains("OneProtect agent root CA"), "{root_crl}");

    // openssl verify, checking CRLs of every CA of the chain.
    let verify = |crl: &str, leaf: &str| {
        std::process::Command::new("openssl")
            .args([
                "verify",
                "-crl_check_all",
                "-CAfile",
                "root.pem",
                "-untrusted",
                "tenant-ca.pem",
            ])
            .args(["-CRLfile", crl, leaf])
            .current_dir(&dir)
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
    };
    let out = verify("crl-chain.pem", "good.pem")?;
    assert!(out.contains("good.pem: OK"), "{out}");
    let out = verify("crl-chain.pem", "bad.pem")?;
    assert!(out.contains("certificate revoked"), "{out}");
    let out = verify("tenant-crl.pem", "good.pem")?;
    assert!(out.contains("unable to get certificate CRL"), "{out}");

    let Some(nginx) = nginx_binary() else {
        eprintln!(
            "SKIPPED nginx part of hardening_api::nginx_with_our_crl_chain_accepts_good_and_refuses_revoked_agents: \
             no nginx binary on PATH, /usr/sbin or /usr/local/sbin (install: apt-get install -y nginx)"
        );
        return Ok(());
    };
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-days",
            "1",
            "-keyout",
            "server.key",
            "-out",
            "server.pem",
        ],
        &dir,
    )?;
    let (with_chain, tenant_only) = (oneprotect_tests::free_port(), oneprotect_tests::free_port());
    std::fs::create_dir_all(dir.join("nginx-tmp"))?;
    let d = dir.display();
    let server = |port: u16, crl: &str| {
        format!(
            "  server {{\n    listen 127.0.0.1:{port} ssl;\n    ssl_certificate {d}/server.pem;\n    \
             ssl_certificate_key {d}/server.key;\n    ssl_client_certificate {d}/ca-chain.pem;\n    \
             ssl_verify_client on;\n    ssl_verify_depth 2;\n    ssl_crl {d}/{crl};\n    \
             location / {{ return 200 \"agent $ssl_client_s_dn\\n\"; }}\n  }}\n"
        )
    };
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log info;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/nginx-tmp/body;\n  proxy_temp_path {d}/nginx-tmp/proxy;\n  \
         fastcgi_temp_path {d}/nginx-tmp/fastcgi;\n  uwsgi_temp_path {d}/nginx-tmp/uwsgi;\n  scgi_temp_path {d}/nginx-tmp/scgi;\n{}{}}}\n",
        server(with_chain, "crl-chain.pem"),
        server(tenant_only, "tenant-crl.pem"),
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let child = std::process::Command::new(&nginx)
        .args(["-e", &format!("{d}/nginx-error.log"), "-p"])
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("start nginx")?;
    let _nginx = Nginx(child);
    let mut up = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", tenant_only))
            .await
            .is_ok()
            && tokio::net::TcpStream::connect(("127.0.0.1", with_chain))
                .await
                .is_ok()
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = || std::fs::read_to_string(dir.join("nginx-error.log")).unwrap_or_default();
    ensure!(up, "nginx did not start: {}", log());

    let (status, body) = curl_mtls(&dir, with_chain, "good").await?;
    assert_eq!(
        status,
        200,
        "good agent through nginx with the CRL chain: {body}\n{}",
        log()
    );
    assert!(body.contains(good["agent_id"].as_str().unwrap()), "{body}");
    let (status, body) = curl_mtls(&dir, with_chain, "bad").await?;
    assert_eq!(status, 400, "revoked agent: {body}");
    assert!(log().contains("certificate revoked"), "{}", log());
    let (status, _) = curl_mtls(&dir, tenant_only, "good").await?;
    assert_eq!(
        status, 400,
        "with only the tenant CRL nginx refuses even a good agent"
    );
    assert!(log().contains("unable to get certificate CRL"), "{}", log());
    Ok(())
}
