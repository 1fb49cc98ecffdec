//! Two-phase certificate rotation end to end, through the real parts: the
//! enroll-api on PostgreSQL (own schema) writing the Redis projection (own
//! prefix), the pingora gateway in front of it verifying client
//! certificates and signing identity assertions, and the agent library
//! acting as the device.
//!
//! `cargo test -p oneprotect-tests --test suite rotation::`

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::support::gateway::TD;
use crate::support::metrics::value as metric;
use crate::support::stack::{Stack, GATEWAY_KID};
use oneprotect_agent::client::Endpoint;
use oneprotect_agent::enroll::Enrolled;
use oneprotect_agent::rotate::{confirm, rotate};
use oneprotect_agent::AgentError;
use oneprotect_identity::headers::IDENTITY_ASSERTION;
use oneprotect_identity::{AgentId, AssertionClaims, AssertionSigner, SerialNumber};

/// Poll attempts (50 ms apart) before a wait gives up.
const POLLS: usize = 600;

impl Stack {
    async fn wait_cert(&self, serial: SerialNumber, want: &str) -> Result<()> {
        let key = self.keys.cert_status(&self.tenant, &serial);
        let mut last = None;
        for _ in 0..POLLS {
            last = self.redis_get(&key).await?;
            if last.as_deref() == Some(want) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("{key}: wanted {want}, have {last:?}")
    }

    async fn agent(&self, agent: AgentId) -> Result<Value> {
        let r = self
            .client
            .send(
                "GET",
                &format!("/api/v1/agents/{agent}"),
                Some(&self.key),
                None,
            )
            .await?;
        ensure!(r.status == 200, "agent: {} {}", r.status, r.body);
        Ok(r.body)
    }

    /// The agent's audit events, oldest first (the admin API).
    async fn events(&self, agent: AgentId) -> Result<Vec<Value>> {
        let mut r = self
            .client
            .send(
                "GET",
                &format!("/api/v1/agents/{agent}/events"),
                Some(&self.key),
                None,
            )
            .await?;
        ensure!(r.status == 200, "events: {} {}", r.status, r.body);
        match r.body["items"].take() {
            Value::Array(items) => Ok(items),
            _ => anyhow::bail!("items"),
        }
    }

    async fn event_types(&self, agent: AgentId) -> Result<Vec<String>> {
        Ok(self
            .events(agent)
            .await?
            .iter()
            .map(|e| e["type"].as_str().unwrap_or("").to_owned())
            .collect())
    }

    /// Waits (bounded) for the agent's one `agent.certificate.reuse_detected`
    /// event and returns it.
    async fn wait_reuse_event(&self, agent: AgentId) -> Result<Value> {
        for _ in 0..200 {
            let found: Vec<Value> = self
                .events(agent)
                .await?
                .into_iter()
                .filter(|e| e["type"] == "agent.certificate.reuse_detected")
                .collect();
            ensure!(found.len() <= 1, "more than one reuse event: {:?}", found);
            if let Some(e) = found.into_iter().next() {
                return Ok(e);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("no agent.certificate.reuse_detected within 10 s")
    }

    /// What a gateway would assert for `serial` of `agent` (as one whose
    /// cache still thought it active would).
    fn assertion(&self, agent: AgentId, serial: SerialNumber) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.gateway().signer.sign(&AssertionClaims {
            iss: "oneprotect-gateway".into(),
            sub: format!("spiffe://{TD}/tenant/{}/agent/{agent}", self.tenant)
                .parse()
                .expect("uri"),
            aud: "enroll-api".into(),
            iat: now,
            exp: now + 30,
            tenant_id: self.tenant,
            agent_id: agent,
            serial,
            cert_sha256: oneprotect_identity::CertFingerprint::of_der(b"not the certificate"),
            cert_not_after: now + 3600,
        })
    }

    /// A request straight to the enroll-api's loopback listener.
    async fn direct(
        &self,
        path: &str,
        headers: &[(&str, String)],
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        self.plain(self.gateway().upstream, path, headers, body)
            .await
    }

    /// A plain-HTTP request to a loopback listener (`/metrics` etc.): a
    /// POST when there is a body or the path confirms, else a GET.
    async fn plain(
        &self,
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, String)],
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let method = if body.is_some() || path.ends_with("confirm") {
            "POST"
        } else {
            "GET"
        };
        crate::support::stack::plain(addr, method, path, headers, body).await
    }
}

/// The status of `GET /healthz` through the gateway with `ep`'s certificate,
/// waiting out 503s while the projection catches up with a new certificate.
async fn health(ep: &Endpoint) -> Result<(u16, Value)> {
    for _ in 0..POLLS {
        let r = ep.request(http::Method::GET, "/healthz", &[], None).await?;
        let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        if r.status.as_u16() != 503 {
            return Ok((r.status.as_u16(), body));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("still 503")
}

/// Confirms through the gateway, waiting out 503s (projection catching up).
async fn confirm_new(
    ep: &Endpoint,
    agent: AgentId,
) -> Result<oneprotect_agent::rotate::Confirmation> {
    for _ in 0..POLLS {
        match confirm(ep, agent).await {
            Err(AgentError::Api(p)) if p.status == 503 => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => return Ok(other?),
        }
    }
    anyhow::bail!("confirm: still 503")
}

fn code(e: AgentError) -> String {
    match e {
        AgentError::Api(p) => p.code,
        other => format!("not a problem answer: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_is_two_phase_through_the_gateway_and_flags_reuse() -> Result<()> {
    let stack = Stack::builder("rotation")
        .gateway()
        .grace_secs(3600)
        .start()
        .await?;
    let dir = tempfile::tempdir()?;
    let dev = stack.device(dir.path()).await?;
    let first = dev.identity()?;
    let agent = first.issued.agent_id;
    let s0 = first.issued.serial;
    let old = dev.endpoint()?;
    assert_eq!(health(&old).await?.0, 200);

    // Phase one: a new certificate; the old one stays accepted.
    let new: Enrolled = rotate(&old, agent).await?;
    let s1 = new.issued.serial;
    assert_ne!(s0, s1);
    stack.wait_cert(s1, "active").await?;
    assert_eq!(
        stack
            .redis_get(&stack.keys.cert_status(&stack.tenant, &s0))
            .await?
            .as_deref(),
        Some("active")
    );
    let a = stack.agent(agent).await?;
    assert_eq!(a["current_serial"], s1.to_string());
    assert_eq!(a["previous_serial"], s0.to_string());
    assert!(a["previous_valid_until"].is_string());
    assert_eq!(
        health(&old).await?.0,
        200,
        "the previous certificate is accepted until the new one is seen"
    );

    // Phase two: the agent stores and confirms with the new certificate.
    dev.state.store(&new)?;
    let fresh = dev.endpoint()?;
    let c = confirm_new(&fresh, agent).await?;
    assert_eq!((c.serial, c.superseded_serial), (s1, Some(s0)));
    stack.wait_cert(s0, "superseded").await?;
    let (status, body) = health(&old).await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("certificate_superseded"))
    );
    assert_eq!(health(&fresh).await?.0, 200);
    let a = stack.agent(agent).await?;
    assert_eq!(
        (a["current_serial"].clone(), a["previous_serial"].clone()),
        (json!(s1.to_string()), Value::Null)
    );

    // The old key again: the gateway refuses it before the enroll-api sees it…
    assert_eq!(
        code(rotate(&old, agent).await.unwrap_err()),
        "certificate_superseded"
    );
    // …and reports both refusals (health, rotate): the enroll-api records
    // possible key theft once for the attempt window, with the route and
    // the source address the gateway saw.
    let reuse = stack.wait_reuse_event(agent).await?;
    assert_eq!(reuse["actor"]["type"], "agent");
    let p = &reuse["payload"];
    assert_eq!(
        (
            p["operation"].as_str(),
            p["serial"].as_str(),
            p["current_serial"].as_str()
        ),
        (
            Some("request"),
            Some(s0.to_string().as_str()),
            Some(s1.to_string().as_str())
        )
    );
    assert!(
        p["route"].as_str().is_some_and(|r| r.starts_with('/')),
        "{reuse}"
    );
    assert_eq!(p["source_ip"], "127.0.0.1");
    let (_, gw_metrics) = stack
        .plain(stack.gateway().admin, "/metrics", &[], None)
        .await?;
    let gw_metrics = gw_metrics.as_str().unwrap_or("").to_owned();
    let queued = metric(
        &gw_metrics,
        "oneprotect_gateway_superseded_reports_total{outcome=\"queued\"}",
    );
    assert!(queued >= 2, "{gw_metrics}");
    // A gateway with a stale cache would be caught by the enroll-api itself:
    // refused and counted, the window's event already written.
    let (status, body) = stack
        .direct(
            &format!("/api/v1/agents/{agent}/certificate/rotate"),
            &[(IDENTITY_ASSERTION, stack.assertion(agent, s0))],
            Some(json!({"csr_pem": crate::support::enroll::openssl_csr(dir.path(), "stolen")?})),
        )
        .await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("certificate_superseded"))
    );
    let (status, metrics) = stack.direct("/metrics", &[], None).await?;
    assert_eq!(status, 200);
    let metrics = metrics.as_str().unwrap_or("");
    let use_of = |op: &str| {
        metric(
            metrics,
            &format!("oneprotect_enroll_superseded_certificate_use_total{{operation=\"{op}\"}}"),
        )
    };
    assert_eq!(use_of("rotate"), 1, "{metrics}");
    assert_eq!(
        use_of("request"),
        queued,
        "every reported use counted: {metrics}"
    );
    assert!(
        metric(
            metrics,
            "oneprotect_enroll_reuse_reports_total{outcome=\"recorded\"}"
        ) >= 1,
        "{metrics}"
    );

    // Without an assertion, with a forged one, or for another agent's path.
    let path = format!("/api/v1/agents/{agent}/certificate/confirm");
    let (status, body) = stack
        .direct(&path, &[("x-oneprotect-agent-id", agent.to_string())], None)
        .await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("identity_required"))
    );
    let (forger, _) = AssertionSigner::generate(GATEWAY_KID).map_err(|_| anyhow::anyhow!("key"))?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let forged = forger.sign(&AssertionClaims {
        iss: "oneprotect-gateway".into(),
        sub: format!("spiffe://{TD}/tenant/{}/agent/{agent}", stack.tenant).parse()?,
        aud: "enroll-api".into(),
        iat: now,
        exp: now + 30,
        tenant_id: stack.tenant,
        agent_id: agent,
        serial: s1,
        cert_sha256: oneprotect_identity::CertFingerprint::of_der(b"x"),
        cert_not_after: now + 3600,
    });
    let (status, _) = stack
        .direct(&path, &[(IDENTITY_ASSERTION, forged)], None)
        .await?;
    assert_eq!(
        status, 401,
        "an assertion signed by an unknown key is refused"
    );
    let other_agent = AgentId::random();
    let (status, body) = stack
        .direct(
            &format!("/api/v1/agents/{other_agent}/certificate/confirm"),
            &[(IDENTITY_ASSERTION, stack.assertion(agent, s1))],
            None,
        )
        .await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("identity_mismatch"))
    );

    // A lost answer: rotating twice with the same certificate replaces the
    // unused one; the previous stays.
    let lost = rotate(&fresh, agent).await?;
    let kept = rotate(&fresh, agent).await?;
    stack.wait_cert(lost.issued.serial, "superseded").await?;
    stack.wait_cert(kept.issued.serial, "active").await?;
    assert_eq!(stack.agent(agent).await?["previous_serial"], s1.to_string());
    // Confirming with the previous certificate is a conflict.
    assert_eq!(code(confirm(&fresh, agent).await.unwrap_err()), "conflict");

    // Revoked: nothing rotates any more, by any path.
    let r = stack
        .client
        .send(
            "POST",
            &format!("/api/v1/agents/{agent}/revoke"),
            Some(&stack.key),
            Some(json!({"reason": "device lost"})),
        )
        .await?;
    ensure!(r.status == 200, "revoke: {} {}", r.status, r.body);
    stack.wait_cert(kept.issued.serial, "revoked").await?;
    let after = dev.endpoint_of(&dev.identity()?)?;
    let refused = code(rotate(&after, agent).await.unwrap_err());
    assert!(
        refused == "agent_revoked" || refused == "certificate_revoked",
        "{refused}"
    );
    let (status, body) = stack
        .direct(
            &format!("/api/v1/agents/{agent}/certificate/rotate"),
            &[(IDENTITY_ASSERTION, stack.assertion(agent, s1))],
            Some(json!({"csr_pem": crate::support::enroll::openssl_csr(dir.path(), "late")?})),
        )
        .await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("agent_revoked"))
    );

    assert_eq!(
        stack.event_types(agent).await?,
        vec![
            "agent.enrolled",
            "agent.certificate.rotated",
            "agent.certificate.superseded",
            "agent.certificate.reuse_detected",
            "agent.certificate.rotated",
            "agent.certificate.superseded",
            "agent.certificate.rotated",
            "agent.revoked",
        ]
    );
    Ok(())
}

/// The grace period: an agent that never confirms loses its previous
/// certificate when the grace ends (sweep), and the gateway refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_previous_certificate_is_superseded_when_the_grace_ends() -> Result<()> {
    let stack = Stack::builder("rotgrace")
        .gateway()
        .grace_secs(10)
        .start()
        .await?;
    let dir = tempfile::tempdir()?;
    let dev = stack.device(dir.path()).await?;
    let first = dev.identity()?;
    let agent = first.issued.agent_id;
    let old = dev.endpoint()?;
    assert_eq!(health(&old).await?.0, 200);
    let new = rotate(&old, agent).await?;
    stack.wait_cert(new.issued.serial, "active").await?;
    // Not confirmed: after the 10 s grace the sweep supersedes the old one.
    stack.wait_cert(first.issued.serial, "superseded").await?;
    let (status, body) = health(&old).await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("certificate_superseded"))
    );
    dev.state.store(&new)?;
    assert_eq!(health(&dev.endpoint()?).await?.0, 200);
    let superseded = stack
        .events(agent)
        .await?
        .into_iter()
        .find(|e| e["type"] == "agent.certificate.superseded")
        .context("no superseded event")?;
    assert_eq!(superseded["payload"]["reason"], "grace_expired");
    assert_eq!(superseded["actor"]["type"], "system");
    Ok(())
}

/// The agent's own `run` loop keeps a short-lived identity fresh: with a
/// 60 s lifetime it rotates twice (each time confirming the new
/// certificate) while heartbeating through the gateway every 500 ms, and
/// not one heartbeat is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_rotates_a_short_lived_certificate_twice_without_a_failed_request() -> Result<()> {
    use oneprotect_agent::run::{run, RunExit, RunPolicy};
    let stack = Stack::builder("rotrun")
        .gateway()
        .grace_secs(3600)
        .leaf_lifetime_secs(60)
        .start()
        .await?;
    let dir = tempfile::tempdir()?;
    let dev = stack.device(dir.path()).await?;
    let first = dev.identity()?.issued;
    let due = first.rotate_after - time::OffsetDateTime::now_utc();
    assert!(
        due > time::Duration::seconds(20),
        "a 60 s certificate is not due at once: {due}"
    );
    let policy = RunPolicy {
        jitter: 0.0,
        backoff_initial: Duration::from_millis(200),
        backoff_max: Duration::from_secs(2),
        max_rotations: Some(2),
        heartbeat_path: Some("/healthz".into()),
        heartbeat_interval: Duration::from_millis(500),
    };
    let exit = tokio::time::timeout(
        Duration::from_secs(240),
        run(&dev.state, &policy, std::future::pending()),
    )
    .await
    .context("run did not rotate twice within 240 s")??;
    assert!(matches!(exit, RunExit::RotationsDone(2)), "{exit:?}");
    let last = dev.identity()?.issued;
    assert_ne!(last.serial, first.serial);
    let a = stack.agent(first.agent_id).await?;
    assert_eq!(a["current_serial"], last.serial.to_string());
    assert_eq!(
        a["previous_serial"],
        Value::Null,
        "both rotations were confirmed"
    );
    let types = stack.event_types(first.agent_id).await?;
    assert_eq!(
        types
            .iter()
            .filter(|t| *t == "agent.certificate.rotated")
            .count(),
        2
    );
    // The gateway's own count of the heartbeats: many, all 200.
    let (status, metrics) = stack
        .plain(stack.gateway().admin, "/metrics", &[], None)
        .await?;
    assert_eq!(status, 200);
    let text = metrics.as_str().unwrap_or("");
    let healthz: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("oneprotect_gateway_requests_total") && l.contains("route=\"/healthz\"")
        })
        .collect();
    let ok: u64 = healthz
        .iter()
        .filter(|l| l.contains("status=\"200\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(ok >= 60, "heartbeats answered 200: {ok}\n{healthz:?}");
    assert!(
        healthz.iter().all(|l| l.contains("status=\"200\"")),
        "a heartbeat was refused: {healthz:?}"
    );
    Ok(())
}
