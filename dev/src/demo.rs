//! `oneprotect-dev demo`: the whole agent lifecycle against a running `up`,
//! driven through the agent library, as a readable transcript with timings.
//!
//! Steps: create an enrollment token (admin API) → enroll an agent (token +
//! CSR through the gateway) → call through the gateway (the upstream shows
//! the identity headers it saw and that the signed assertion verified) →
//! send spoofed identity headers (the upstream shows them stripped) → rotate
//! the certificate (and confirm; the old one is then refused) → revoke the agent (admin API) → the next call is refused
//! with 403, and how long that took.
//!
//! Every step checks its outcome; the first failure ends the demo with an
//! error (exit status 1).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use http::Method;
use oneprotect_agent::client::Endpoint;
use oneprotect_agent::enroll::{self, AgentMetadata, Enrolled};
use oneprotect_agent::tls;
use oneprotect_identity::headers as h;
use oneprotect_identity::TokenSecret;
use serde_json::json;

use crate::stack::StackInfo;
use crate::upstream::Echo;

/// How long the demo waits for a revocation to reach the gateway.
const REVOCATION_WAIT: Duration = Duration::from_secs(15);
/// Per-request timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

struct Demo {
    info: StackInfo,
    admin: Endpoint,
    gateway_anon: Endpoint,
    roots_pem: Vec<u8>,
    step: usize,
    total: usize,
    started: Instant,
}

fn mtls(roots_pem: &[u8], e: &Enrolled) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut chain = tls::certs_from_pem(e.issued.certificate_pem.as_bytes())?;
    chain.extend(tls::certs_from_pem(e.issued.chain_pem.as_bytes())?);
    let key = tls::key_from_pem(e.key_pem.as_bytes())?;
    Ok(tls::mutual(tls::roots_from_pem(roots_pem)?, chain, key)?)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

impl Demo {
    fn begin(&mut self, title: &str) -> Instant {
        self.step += 1;
        println!("\n[{}/{}] {title}", self.step, self.total);
        Instant::now()
    }

    fn ok(&self, t: Instant, what: &str) {
        println!("      ok: {what} ({})", ms(t.elapsed()));
    }

    async fn admin_post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<oneprotect_agent::client::Response> {
        let auth = format!("Bearer {}", self.info.admin_key);
        Ok(self
            .admin
            .request(
                Method::POST,
                path,
                &[
                    ("authorization", auth.as_str()),
                    ("content-type", "application/json"),
                ],
                Some(serde_json::to_vec(&body)?),
            )
            .await?)
    }

    async fn call(
        &self,
        gw: &Endpoint,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<oneprotect_agent::client::Response> {
        Ok(gw.request(Method::GET, "/hello", headers, None).await?)
    }
}

fn echo_of(resp: &oneprotect_agent::client::Response) -> anyhow::Result<Echo> {
    ensure!(
        resp.status.is_success(),
        "the gateway answered {}: {}",
        resp.status,
        String::from_utf8_lossy(&resp.body)
    );
    serde_json::from_slice(&resp.body).context("the upstream's answer is not its echo JSON")
}

fn check_identity(echo: &Echo, e: &Enrolled) -> anyhow::Result<()> {
    let i = &e.issued;
    let hdr = |n: &str| echo.identity_headers.get(n).map(String::as_str);
    ensure!(
        hdr(h::TENANT_ID) == Some(&i.tenant_id.to_string()),
        "upstream saw tenant {:?}, expected {}",
        hdr(h::TENANT_ID),
        i.tenant_id
    );
    ensure!(
        hdr(h::AGENT_ID) == Some(&i.agent_id.to_string()),
        "upstream saw agent {:?}, expected {}",
        hdr(h::AGENT_ID),
        i.agent_id
    );
    ensure!(
        hdr(h::CERT_SERIAL) == Some(&i.serial.to_string()),
        "upstream saw serial {:?}, expected {}",
        hdr(h::CERT_SERIAL),
        i.serial
    );
    let a = &echo.assertion;
    ensure!(
        a.present,
        "no signed identity assertion reached the upstream"
    );
    ensure!(
        a.verified,
        "the assertion did not verify: {}",
        a.error.as_deref().unwrap_or("?")
    );
    ensure!(
        a.matches_headers,
        "the assertion's claims differ from the identity headers"
    );
    Ok(())
}

fn print_echo(echo: &Echo) {
    println!("      upstream saw:");
    for (k, v) in &echo.identity_headers {
        println!("        {k}: {v}");
    }
    let a = &echo.assertion;
    match &a.agent {
        Some(agent) if a.verified => println!(
            "      assertion: verified with published gateway key {} (sub {}, expires in {}s)",
            agent.kid, agent.spiffe_id, agent.expires_in
        ),
        _ => println!(
            "      assertion: NOT verified ({})",
            a.error.as_deref().unwrap_or("absent")
        ),
    }
}

/// Runs the demo against the stack described in `<data_dir>/stack.json`.
/// Prints the transcript to stdout; returns an error at the first failed
/// step.
pub async fn run(data_dir: &Path) -> anyhow::Result<()> {
    let info = StackInfo::load(data_dir)?;
    let roots_pem = std::fs::read(&info.server_ca)
        .with_context(|| format!("read the server CA {}", info.server_ca.display()))?;
    let server_only = tls::server_only(tls::roots_from_pem(&roots_pem)?)?;
    let admin =
        Endpoint::new(&info.enroll_api_url, server_only.clone())?.with_timeout(REQUEST_TIMEOUT);
    let gateway_anon = Endpoint::new(&info.gateway_url, server_only)?.with_timeout(REQUEST_TIMEOUT);
    println!(
        "OneProtect demo against {} (tenant {}, {} store, revocation via {})",
        info.gateway_url, info.tenant_id, info.database, info.revocation_bus
    );
    let mut d = Demo {
        info,
        admin,
        gateway_anon,
        roots_pem,
        step: 0,
        total: 7,
        started: Instant::now(),
    };

    // 1. Token.
    let t = d.begin("create a one-use enrollment token (admin API, admin key)");
    let resp = d
        .admin_post(
            "/api/v1/agent-enrollment/tokens",
            json!({"ttl_seconds": 600, "max_uses": 1, "description": "oneprotect-dev demo"}),
        )
        .await?;
    ensure!(
        resp.status.as_u16() == 201 || resp.status.is_success(),
        "token creation answered {}: {}",
        resp.status,
        String::from_utf8_lossy(&resp.body)
    );
    let created: serde_json::Value = resp.json()?;
    let token = created["token"]
        .as_str()
        .context("no `token` in the answer")?
        .to_owned();
    println!(
        "      token {} (secret shown once; expires {})",
        created["token_id"].as_str().unwrap_or("?"),
        created["expires_at"].as_str().unwrap_or("?")
    );
    d.ok(t, &format!("{} Created", resp.status.as_u16()));

    // 2. Enroll.
    let t =
        d.begin("enroll an agent: local P-256 key + CSR + token → certificate (via the gateway)");
    let enrolled = enroll::enroll(
        &d.gateway_anon,
        &TokenSecret::new(token),
        &AgentMetadata::this_host(),
    )
    .await
    .context("enrollment")?;
    let i = &enrolled.issued;
    println!("      agent    {}", i.agent_id);
    println!("      identity {}", i.spiffe_id);
    println!("      serial   {}  valid until {}", i.serial, i.not_after);
    ensure!(
        i.tenant_id.to_string() == d.info.tenant_id,
        "enrolled into tenant {}, expected {}",
        i.tenant_id,
        d.info.tenant_id
    );
    d.ok(t, "certificate issued for the agent's own key");
    let agent = i.agent_id;
    let gw = d.gateway_anon.with_tls(mtls(&d.roots_pem, &enrolled)?);

    // 3. Call.
    let t = d.begin("call GET /hello through the gateway with mTLS");
    let echo = echo_of(&call_when_projected(&gw).await?)?;
    print_echo(&echo);
    check_identity(&echo, &enrolled)?;
    d.ok(t, "200; identity headers injected, assertion verified");

    // 4. Spoof.
    let t = d.begin("send spoofed identity headers (another tenant, a forged XFCC)");
    let other_tenant = oneprotect_identity::TenantId::random();
    let other = other_tenant.to_string();
    let echo = echo_of(
        &d.call(
            &gw,
            &[
                (h::TENANT_ID, other.as_str()),
                // CGI/WSGI/PHP/Rack applications read `_` as `-`.
                ("x_oneprotect_tenant_id", other.as_str()),
                ("x-oneprotect-role", "admin"),
                (h::XFCC, "By=spiffe://evil;URI=spiffe://evil/agent"),
                (h::IDENTITY_ASSERTION, "forged.assertion.value"),
            ],
        )
        .await?,
    )?;
    println!("      sent: {}: {other}, x_oneprotect_tenant_id: {other}, x-oneprotect-role: admin, x-forwarded-client-cert: By=spiffe://evil…, a forged assertion", h::TENANT_ID);
    print_echo(&echo);
    ensure!(
        !echo.identity_headers.contains_key("x-oneprotect-role"),
        "a client-sent x-oneprotect-role header reached the upstream"
    );
    ensure!(
        !echo.identity_headers.contains_key(h::XFCC),
        "a client-sent x-forwarded-client-cert reached the upstream"
    );
    ensure!(
        !echo.identity_headers.contains_key("x_oneprotect_tenant_id"),
        "a client-sent x_oneprotect_tenant_id (underscore spelling) reached the upstream"
    );
    check_identity(&echo, &enrolled)?;
    d.ok(
        t,
        "every client-sent identity header stripped; only the verified identity arrived",
    );

    // 5. Rotate (two phases: rotate with the current certificate, confirm
    // with the new one; the old one is then superseded).
    let t = d.begin(
        "rotate the certificate: new key, authenticated by the current certificate, then confirmed",
    );
    let rotated = oneprotect_agent::rotate::rotate(&gw, agent)
        .await
        .context("rotation")?;
    let r = &rotated.issued;
    ensure!(r.agent_id == agent, "rotation changed the agent id");
    ensure!(
        r.serial != enrolled.issued.serial,
        "rotation kept the serial"
    );
    println!("      new serial {}  valid until {}", r.serial, r.not_after);
    let new_gw = d.gateway_anon.with_tls(mtls(&d.roots_pem, &rotated)?);
    let echo = echo_of(&call_when_projected(&new_gw).await?)?;
    check_identity(&echo, &rotated)?;
    println!("      a call with the new certificate: 200, assertion verified");
    let c = oneprotect_agent::rotate::confirm(&new_gw, agent)
        .await
        .context("rotation confirmation")?;
    ensure!(
        c.serial == r.serial && c.superseded_serial == Some(enrolled.issued.serial),
        "confirmation answered serial {} superseding {:?}",
        c.serial,
        c.superseded_serial
    );
    println!("      confirmed; {} superseded", enrolled.issued.serial);
    let (status, code, waited) = wait_refused(&gw, REVOCATION_WAIT).await?;
    ensure!(
        status == 403 && code == "certificate_superseded",
        "the old certificate got {status} {code}, expected 403 certificate_superseded"
    );
    println!(
        "      a call with the old certificate: {status} {code} ({} after confirming)",
        ms(waited)
    );
    d.ok(t, "rotated; the old certificate is refused");
    let gw = new_gw;

    // 6. Revoke.
    let t = d.begin("revoke the agent (admin API)");
    let resp = d
        .admin_post(
            &format!("/api/v1/agents/{agent}/revoke"),
            json!({"reason": "oneprotect-dev demo"}),
        )
        .await?;
    let view: serde_json::Value = resp.json().context("revocation")?;
    ensure!(
        view["status"] == "revoked",
        "the admin API answered status {}",
        view["status"]
    );
    let revoked_at = Instant::now();
    let e = &view["enforcement"];
    ensure!(
        e["outcome"] == "confirmed",
        "the gateway did not confirm the revocation: {e}"
    );
    d.ok(
        t,
        &format!(
            "{} agent status revoked; {} of {} live gateway(s) applied it {} ms after the commit",
            resp.status.as_u16(),
            e["gateways_confirmed"],
            e["gateways_live"],
            e["elapsed_ms"]
        ),
    );

    // 7. Refused.
    let t = d.begin("call again with the revoked agent's certificate");
    let (status, code, _) = wait_refused(&gw, REVOCATION_WAIT).await?;
    let since_revoke = revoked_at.elapsed();
    ensure!(
        status == 403 && code == "agent_revoked",
        "expected 403 agent_revoked, got {status} {code}"
    );
    println!(
        "      {status} {code}: refused within {} of the admin API's answer",
        ms(since_revoke)
    );
    d.ok(t, "the gateway refuses the revoked agent");

    println!(
        "\nAll {} steps passed in {}.",
        d.total,
        ms(d.started.elapsed())
    );
    Ok(())
}

/// Calls `GET /hello`, retrying while the gateway answers the retryable 503
/// `revocation_unavailable`: right after an enrollment or a rotation the
/// enroll-api's relay may not have written the new certificate's status
/// yet, and an unknown status is never admitted. Gives up after
/// [`REVOCATION_WAIT`].
async fn call_when_projected(gw: &Endpoint) -> anyhow::Result<oneprotect_agent::client::Response> {
    let start = Instant::now();
    let mut retried = false;
    loop {
        let r = gw.request(Method::GET, "/hello", &[], None).await?;
        let pending = r.status.as_u16() == 503
            && r.problem()
                .is_some_and(|p| p.code == "revocation_unavailable");
        if !pending || start.elapsed() > REVOCATION_WAIT {
            if pending {
                println!("      (gave up waiting for the projection)");
            } else if retried && r.status.is_success() {
                println!(
                    "      (the new certificate's status reached the gateway {} after issuance)",
                    ms(start.elapsed())
                );
            }
            return Ok(r);
        }
        retried = true;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Calls until the gateway refuses for good (403) or `limit` passes; returns
/// the status, the problem code and how long it took.
async fn wait_refused(gw: &Endpoint, limit: Duration) -> anyhow::Result<(u16, String, Duration)> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < limit {
        match gw.request(Method::GET, "/hello", &[], None).await {
            Ok(r) if r.status.as_u16() == 403 => {
                let code = r.problem().map(|p| p.code).unwrap_or_default();
                return Ok((403, code, start.elapsed()));
            }
            Ok(r) => last = format!("{}", r.status),
            // A refused handshake or closed connection: keep trying.
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!(
        "still not refused after {}s (last answer: {last})",
        limit.as_secs()
    )
}
