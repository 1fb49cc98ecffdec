//! The upstream kit end to end: upstreams believe an agent's identity only
//! from the gateway's assertion, verified with the keys the enroll-api
//! publishes (`/.well-known/jwks.json`) — the Python example with no
//! OneProtect code, and the `oneprotect-upstream` crate — and a gateway key
//! rotation under traffic costs no request.
//!
//! `cargo test -p oneprotect-tests --test suite kit_upstream::`

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use tokio::io::AsyncBufReadExt as _;

use crate::support::gateway_toml::RouteToml;
use crate::support::stack::{plain, trusted_key, Device, Stack, GATEWAY_KID};
use oneprotect_agent::client::Endpoint;
use oneprotect_identity::{headers as h, AgentId, AssertionClaims, AssertionSigner};

/// Poll attempts (50 ms apart) before a wait gives up.
const POLLS: usize = 600;

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// What the gateway asserts for `dev` on a route with audience `aud`.
fn claims_of(dev: &Device, aud: &str) -> Result<AssertionClaims> {
    let issued = dev.identity()?.issued;
    let now = now();
    Ok(AssertionClaims {
        iss: "oneprotect-gateway".into(),
        sub: issued.spiffe_id.parse()?,
        aud: aud.into(),
        iat: now,
        exp: now + 30,
        tenant_id: issued.tenant_id,
        agent_id: issued.agent_id,
        serial: issued.serial,
        cert_sha256: oneprotect_identity::CertFingerprint::of_der(b"cert"),
        cert_not_after: issued.not_after.unix_timestamp(),
    })
}

/// The identity headers a gateway sends with `claims`, signed by `signer`.
fn gateway_headers(signer: &AssertionSigner, c: &AssertionClaims) -> Vec<(&'static str, String)> {
    let not_after = time::OffsetDateTime::from_unix_timestamp(c.cert_not_after)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    vec![
        (h::TENANT_ID, c.tenant_id.to_string()),
        (h::AGENT_ID, c.agent_id.to_string()),
        (h::CERT_SERIAL, c.serial.to_string()),
        (h::CERT_NOT_AFTER, not_after),
        (h::SPIFFE_ID, c.sub.to_string()),
        (h::IDENTITY_ASSERTION, signer.sign(c)),
    ]
}

/// `GET path` through the gateway, waiting out 503s while the projection
/// learns a new certificate.
async fn through(ep: &Endpoint, path: &str) -> Result<(u16, Value)> {
    for _ in 0..POLLS {
        let r = ep.request(http::Method::GET, path, &[], None).await?;
        if r.status.as_u16() != 503 {
            let body = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
            return Ok((r.status.as_u16(), body));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{path}: still 503")
}

fn jwks_url(stack: &Stack) -> String {
    format!("http://{}/.well-known/jwks.json", stack.gateway().upstream)
}

/// Starts `examples/upstream-python/upstream.py` on `port` with the venv
/// `scripts/prereqs.sh test` makes; returns once it listens.
async fn python_upstream(jwks: &str, audience: &str, port: u16) -> Result<tokio::process::Child> {
    let root = oneprotect_tests::workspace_root();
    let python = root.join(".venv/upstream-python/bin/python");
    ensure!(
        python.exists(),
        "{} is missing: run scripts/prereqs.sh test (it creates the Python example's venv)",
        python.display()
    );
    let mut child = tokio::process::Command::new(python)
        .arg(root.join("examples/upstream-python/upstream.py"))
        .args(["--jwks-url", jwks, "--audience", audience])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .context("the Python upstream did not start within 60 s")??
        .context("the Python upstream exited")?;
    ensure!(
        line == format!("listening on 127.0.0.1:{port}"),
        "unexpected first line {line:?}"
    );
    Ok(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_upstream_verifies_real_assertions_and_refuses_forged_ones() -> Result<()> {
    let port = oneprotect_tests::free_port();
    let stack = Stack::builder("kit_py")
        .gateway()
        .gateway_route(
            RouteToml::new("/py", format!("127.0.0.1:{port}"))
                .named("py-workers")
                .without_health_check(),
        )
        .start()
        .await?;
    let _python = python_upstream(&jwks_url(&stack), "py-workers", port).await?;
    let tmp = tempfile::tempdir()?;
    let dev = stack.device(tmp.path()).await?;
    let issued = dev.identity()?.issued;

    // A real request through the gateway: verified by the Python upstream.
    let (status, body) = through(&dev.endpoint()?, "/py/hello?x=1").await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["path"], "/py/hello?x=1");
    assert_eq!(body["agent"]["agent_id"], issued.agent_id.to_string());
    assert_eq!(body["agent"]["tenant_id"], issued.tenant_id.to_string());
    assert_eq!(body["agent"]["serial"], issued.serial.to_string());
    assert_eq!(body["agent"]["kid"], GATEWAY_KID);

    // Straight to the upstream, past the gateway. First what a gateway
    // would send (so each refusal below is for its own reason), then the
    // forgeries.
    let py = SocketAddr::from(([127, 0, 0, 1], port));
    let signer = &stack.gateway().signer;
    let good = claims_of(&dev, "py-workers")?;
    let (status, body) = plain(py, "GET", "/direct", &gateway_headers(signer, &good), None).await?;
    assert_eq!(status, 200, "{body}");

    let (forger, _) = AssertionSigner::generate(GATEWAY_KID).map_err(|_| anyhow::anyhow!("key"))?;
    let mut expired = good.clone();
    (expired.iat, expired.exp) = (now() - 120, now() - 60);
    let mut other_route = good.clone();
    other_route.aud = "enroll-api".into();
    let mut mismatched = gateway_headers(signer, &good);
    mismatched[1].1 = AgentId::random().to_string();
    let mut none_alg = gateway_headers(signer, &good);
    let payload = none_alg[5]
        .1
        .split('.')
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    none_alg[5].1 = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{payload}.");
    let mut missing = gateway_headers(signer, &good);
    missing.pop();
    for (what, headers, detail) in [
        (
            "signed by another key under the gateway's kid",
            gateway_headers(&forger, &good),
            "does not verify",
        ),
        ("expired", gateway_headers(signer, &expired), "expired"),
        (
            "for another route's audience",
            gateway_headers(signer, &other_route),
            "audience",
        ),
        (
            "with another agent's id header",
            mismatched,
            "x-oneprotect-agent-id does not match",
        ),
        ("alg none", none_alg, "EdDSA"),
        ("without an assertion", missing, "exactly once"),
    ] {
        let (status, body) = plain(py, "GET", "/direct", &headers, None).await?;
        assert_eq!(
            (status, body["code"].as_str()),
            (401, Some("identity_required")),
            "{what}: {body}"
        );
        let text = body["detail"].as_str().unwrap_or_default();
        assert!(
            text.to_lowercase().contains(&detail.to_lowercase()),
            "{what}: detail {text:?}"
        );
    }
    Ok(())
}

/// An upstream built on `oneprotect-upstream`: every request through
/// `VerifyLayer`; it counts the verified requests by signing key id.
async fn rust_upstream(
    listener: tokio::net::TcpListener,
    jwks: &str,
    audience: &str,
) -> Result<(
    oneprotect_upstream::Verifier,
    Arc<Mutex<BTreeMap<String, u64>>>,
)> {
    use oneprotect_upstream::{Options, VerifiedAgent, Verifier, VerifyLayer};
    let verifier = Verifier::from_jwks_url(jwks, None, audience, Options::default()).await?;
    verifier.spawn_refresh(Duration::from_secs(1));
    let seen: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let counts = seen.clone();
    let app = axum::Router::new()
        .fallback(move |agent: VerifiedAgent| {
            let counts = counts.clone();
            async move {
                *counts.lock().unwrap().entry(agent.kid).or_default() += 1;
                agent.agent_id.to_string()
            }
        })
        .layer(VerifyLayer::new(verifier.clone()));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((verifier, seen))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gateway_key_rotation_under_traffic_loses_no_request() -> Result<()> {
    // The gateway routes to the upstream's socket, bound first; the
    // upstream serves once the stack's key set can be fetched.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mut stack = Stack::builder("kit_rotate")
        .gateway()
        .rotatable_assertion_key()
        .gateway_route(
            RouteToml::new("/work", listener.local_addr()?)
                .named("workers")
                .without_health_check(),
        )
        .start()
        .await?;
    let (verifier, seen) = rust_upstream(listener, &jwks_url(&stack), "workers").await?;
    let old_kid = stack.gateway().signer.kid().to_owned();
    let tmp = tempfile::tempdir()?;
    let dev = stack.device(tmp.path()).await?;
    let (status, body) = through(&dev.endpoint()?, "/work/warm").await?;
    assert_eq!(status, 200, "{body}");

    // Traffic: two clients, each request on a new connection, bounded in
    // count and time; every answer recorded.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let ep = dev.endpoint()?;
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut answers: BTreeMap<u16, u64> = BTreeMap::new();
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let status = match ep.request(http::Method::GET, "/work/x", &[], None).await {
                    Ok(r) => r.status.as_u16(),
                    Err(_) => 0,
                };
                *answers.entry(status).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            answers
        }));
    }
    let kid_count = |kid: &str| seen.lock().unwrap().get(kid).copied().unwrap_or(0);
    let wait_for = |kid: String, what: &'static str| {
        let seen = seen.clone();
        async move {
            for _ in 0..POLLS {
                if seen.lock().unwrap().get(&kid).copied().unwrap_or(0) > 0 {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::bail!("{what}: no request verified under {kid}")
        }
    };
    wait_for(old_kid.clone(), "before the rotation").await?;

    // 1. Publish the new key next to the old one.
    let (_, pkcs8) = AssertionSigner::generate("new").map_err(|_| anyhow::anyhow!("key"))?;
    let new =
        AssertionSigner::from_pkcs8_thumbprint_kid(&pkcs8).map_err(|_| anyhow::anyhow!("key"))?;
    let old_entry = trusted_key(&stack.gateway().signer);
    let both = vec![old_entry, trusted_key(&new)];
    stack
        .restart_enroll_api(move |cfg| cfg.rotation.assertion.keys = both)
        .await?;
    // 2. The gateway signs with it: the key file replaced (atomically),
    //    picked up by the gateway's poll.
    let staged = stack.dir.join("assertion.pk8.new");
    std::fs::write(&staged, &pkcs8)?;
    std::fs::rename(&staged, &stack.gateway().key_file)?;
    wait_for(new.kid().to_owned(), "after the switch").await?;
    // 3. The old key retired once its last assertion expired (4 s).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let only_new = vec![trusted_key(&new)];
    stack
        .restart_enroll_api(move |cfg| cfg.rotation.assertion.keys = only_new)
        .await?;
    let at_retirement = kid_count(new.kid());
    for _ in 0..POLLS {
        if kid_count(new.kid()) > at_retirement + 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut answers: BTreeMap<u16, u64> = BTreeMap::new();
    for c in clients {
        for (status, n) in c.await? {
            *answers.entry(status).or_default() += n;
        }
    }
    let total: u64 = answers.values().sum();
    assert_eq!(
        answers.get(&200).copied(),
        Some(total),
        "every request answered 200 across the rotation: {answers:?}"
    );
    assert!(kid_count(&old_kid) > 0 && kid_count(new.kid()) > at_retirement);

    // The retired key is gone from the upstream's set: an assertion it
    // signs is now refused.
    verifier.refresh().await?;
    let old = &stack.gateway().signer;
    let c = claims_of(&dev, "workers")?;
    let mut headers = http::HeaderMap::new();
    for (name, value) in gateway_headers(old, &c) {
        headers.insert(name, value.parse()?);
    }
    assert_eq!(
        verifier.verify(&headers).await,
        Err(oneprotect_upstream::Refusal::Assertion(
            oneprotect_identity::AssertionError::UnknownKey
        ))
    );
    for (name, value) in gateway_headers(&new, &c) {
        headers.insert(name, value.parse()?);
    }
    assert!(verifier.verify(&headers).await.is_ok());
    eprintln!(
        "rotation under traffic: {total} requests, {answers:?}; verified by kid: {:?}",
        seen.lock().unwrap()
    );
    Ok(())
}
