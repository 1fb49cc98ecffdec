//! No secret leaves: a whole lifecycle through the real binaries at `debug`
//! log level — token, exchange through the gateway, requests, rotation and
//! confirmation through the gateway, revocation — and then every captured
//! log line (enroll-api and gateway), every HTTP answer the clients got
//! (except the one that must carry the token: its creation), every Redis
//! value under the test's prefix (status keys, sequence, stream entries) and
//! every event is searched for the token secret, the admin key and the
//! agent's two private keys (and the gateway's signing key).
//!
//! `cargo test --workspace --test suite -- secrets::`

// Helpers run only inside tests, where a panic with its message is the
// failure report.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use oneprotect_agent::client::Endpoint;
use oneprotect_agent::enroll::{enroll, AgentMetadata, Enrolled};
use oneprotect_identity::{AgentId, AssertionSigner, TokenSecret};
use oneprotect_testpki::TestPki;
use serde_json::json;

use crate::support::enroll::Reply;
use crate::support::enroll_proc::EnrollFixture;
use crate::support::fleet::{admin_status, POLLS};
use crate::support::gateway::{start_echo, write, TD};
use crate::support::gateway_toml::{GatewayToml, RouteToml};

/// The base64 body of a PEM block, on one line: how a key would show up if
/// it were logged or stored as text.
fn pem_body(pem: &str) -> String {
    pem.lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<String>()
}

/// An mTLS client config from an enrollment's certificate, chain and key.
fn mtls(
    e: &Enrolled,
    roots: &rustls::RootCertStore,
) -> Result<std::sync::Arc<rustls::ClientConfig>> {
    let mut chain = oneprotect_agent::tls::certs_from_pem(e.issued.certificate_pem.as_bytes())?;
    chain.extend(oneprotect_agent::tls::certs_from_pem(
        e.issued.chain_pem.as_bytes(),
    )?);
    let key = oneprotect_agent::tls::key_from_pem(e.key_pem.as_bytes())?;
    Ok(oneprotect_agent::tls::mutual(roots.clone(), chain, key)?)
}

/// One answer as text: status, headers and body.
fn reply_text(r: &Reply) -> String {
    let mut t = format!("{}\n", r.status);
    for (k, v) in &r.headers {
        t.push_str(&format!("{k}: {}\n", v.to_str().unwrap_or("?")));
    }
    t.push_str(&r.body.to_string());
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs_answers_redis_or_events() -> Result<()> {
    // The gateway's assertion key, pinned by the enroll-api.
    let (signer, pkcs8) =
        AssertionSigner::generate("gw-secrets").map_err(|_| anyhow::anyhow!("generate key"))?;
    let public = {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signer.public_key())
    };
    let http = SocketAddr::from(([127, 0, 0, 1], oneprotect_tests::free_port()));
    let mut fx = EnrollFixture::new(
        "secrets",
        &http.to_string(),
        &format!(
            r#"[rotation]
grace_secs = 3600
[[rotation.assertion.keys]]
kid = "gw-secrets"
public_key = "{public}"
"#
        ),
        "debug",
    )
    .await?;
    let dir = fx.dir.clone();
    let key_file = dir.join("assertion.pk8");
    std::fs::write(&key_file, &pkcs8)?;
    let (keys, redis_url, admin_key) =
        (fx.keys.clone(), fx.redis_url.clone(), fx.admin_key.clone());
    let prefix = keys.prefix().to_owned();
    fx.proc.start().await?;
    let client = fx.client()?;
    let mut answers: Vec<String> = Vec::new();

    // The gateway process, at debug level, in front of the enroll-api.
    let echo = start_echo().await;
    let bundle = client
        .send("GET", "/api/v1/trust-bundle", None, None)
        .await?;
    write(&dir, "bundle.pem", bundle.body.as_str().context("bundle")?);
    let pki = TestPki::new(TD);
    let server = pki.server_cert(&["localhost", "127.0.0.1"]);
    write(&dir, "server.pem", &server.cert_pem);
    write(&dir, "server.key", &server.key_pem);
    let port = oneprotect_tests::free_port();
    let admin = SocketAddr::from(([127, 0, 0, 1], oneprotect_tests::free_port()));
    let mut conf = GatewayToml::new(
        SocketAddr::from(([127, 0, 0, 1], port)),
        admin,
        (
            dir.join("server.pem"),
            dir.join("server.key"),
            dir.join("bundle.pem"),
        ),
        &redis_url,
        &prefix,
    )
    .route(RouteToml::new("/api/v1/agent-enrollment/exchange", http).without_identity())
    .route(RouteToml::new("/api/v1/agents", http).named("enroll-api"))
    .route(RouteToml::new("/api", echo));
    conf.assertion = Some((key_file, "gw-secrets".to_owned()));
    let gw_conf = write(&dir, "gateway.toml", &conf.render());
    let gw_log = dir.join("gateway.log");
    let _gateway = tokio::process::Command::new(oneprotect_tests::ensure_binary(
        "oneprotect-gateway",
        "oneprotect-gateway",
    ))
    .arg("--config")
    .arg(&gw_conf)
    // The gateway logs JSON here (the log shippers' format); the enroll-api
    // logs text. Both go to files, so neither may carry ANSI colour.
    .args(["--log-format", "json"])
    .env("RUST_LOG", "debug")
    .stdout({
        let f = std::fs::File::create(&gw_log)?;
        f.try_clone()?
    })
    .stderr(std::fs::OpenOptions::new().append(true).open(&gw_log)?)
    .kill_on_drop(true)
    .spawn()?;
    let mut ready = false;
    for _ in 0..POLLS {
        if admin_status(admin, "/readyz").await == Some(200)
            && tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    ensure!(
        ready,
        "gateway not ready: {}",
        std::fs::read_to_string(&gw_log)?
    );

    // The lifecycle.
    let r = client
        .send(
            "POST",
            "/api/v1/agent-enrollment/tokens",
            Some(&admin_key),
            Some(json!({"ttl_seconds": 600})),
        )
        .await?;
    ensure!(r.status == 201, "token: {}", r.status);
    // This answer carries the token by design; it is not scanned.
    let token = r.body["token"].as_str().context("token")?.to_owned();
    let roots = oneprotect_agent::tls::roots_from_pem(pki.root_pem().as_bytes())?;
    let url = format!("https://127.0.0.1:{port}");
    let plain = Endpoint::new(&url, oneprotect_agent::tls::server_only(roots.clone())?)?;
    let first = enroll(
        &plain,
        &TokenSecret::new(token.clone()),
        &AgentMetadata::this_host(),
    )
    .await?;
    let agent: AgentId = first.issued.agent_id;
    // A replay of the token and a wrong admin key: their answers are scanned.
    let replay = plain
        .post_json(
            "/api/v1/agent-enrollment/exchange",
            &json!({"token": token, "csr_pem": "x", "agent": {"hostname": "h", "os": "linux", "agent_version": "1"}}),
        )
        .await?;
    answers.push(String::from_utf8_lossy(&replay.body).into_owned());
    let wrong = client
        .send(
            "GET",
            "/api/v1/agents",
            Some(&format!("{admin_key}x")),
            None,
        )
        .await?;
    answers.push(reply_text(&wrong));

    let ep1 = Endpoint::new(&url, mtls(&first, &roots)?)?;
    let get = |ep: Endpoint, path: &'static str, want: u16| async move {
        for _ in 0..POLLS {
            let r = ep.request(http::Method::GET, path, &[], None).await?;
            if r.status.as_u16() == want {
                return anyhow::Ok(format!(
                    "{}\n{:?}\n{}",
                    r.status,
                    r.headers,
                    String::from_utf8_lossy(&r.body)
                ));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!("{path} never answered {want}")
    };
    answers.push(get(ep1.clone(), "/api/hello", 200).await?);
    let second = oneprotect_agent::rotate::rotate(&ep1, agent).await?;
    let ep2 = Endpoint::new(&url, mtls(&second, &roots)?)?;
    let mut confirmed = None;
    for _ in 0..POLLS {
        if let Ok(c) = oneprotect_agent::rotate::confirm(&ep2, agent).await {
            confirmed = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    ensure!(confirmed.is_some(), "confirm never succeeded");
    answers.push(get(ep2.clone(), "/api/after-rotation", 200).await?);
    let r = client
        .send(
            "POST",
            &format!("/api/v1/agents/{agent}/revoke"),
            Some(&admin_key),
            Some(json!({"reason": "secrets test"})),
        )
        .await?;
    ensure!(r.status == 200, "revoke: {}", r.status);
    answers.push(reply_text(&r));
    answers.push(get(ep2.clone(), "/api/after-revocation", 403).await?);
    for path in [
        format!("/api/v1/agents/{agent}"),
        format!("/api/v1/agents/{agent}/events"),
        "/api/v1/agent-enrollment/tokens".to_owned(),
        "/api/v1/agents".to_owned(),
    ] {
        let r = client.send("GET", &path, Some(&admin_key), None).await?;
        ensure!(r.status == 200, "{path}: {}", r.status);
        answers.push(reply_text(&r));
    }
    let events = client
        .send(
            "GET",
            &format!("/api/v1/agents/{agent}/events"),
            Some(&admin_key),
            None,
        )
        .await?;
    let n_events = events.body["items"].as_array().map_or(0, Vec::len);
    ensure!(
        n_events >= 4,
        "enrolled, rotated, superseded, revoked: {}",
        events.body
    );

    // Redis: every value under the prefix, and the event stream.
    let mut redis = redis::Client::open(redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let mut values = Vec::new();
    let names: Vec<String> = redis::cmd("KEYS")
        .arg(keys.all_keys_pattern())
        .query_async(&mut redis)
        .await?;
    for k in &names {
        let kind: String = redis::cmd("TYPE").arg(k).query_async(&mut redis).await?;
        if kind == "stream" {
            let v: redis::Value = redis::cmd("XRANGE")
                .arg(k)
                .arg("-")
                .arg("+")
                .query_async(&mut redis)
                .await?;
            values.push(format!("{k} {v:?}"));
        } else if kind == "string" {
            let v: String = redis::cmd("GET").arg(k).query_async(&mut redis).await?;
            values.push(format!("{k} {v}"));
        }
    }
    // Let the last log lines reach the files.
    tokio::time::sleep(Duration::from_millis(300)).await;
    fx.proc.kill().await;
    let api_log = std::fs::read_to_string(&fx.proc.log)?;
    let gateway_log = std::fs::read_to_string(&gw_log)?;

    // The haystacks must hold the lifecycle, or the search proves nothing.
    let agent_s = agent.to_string();
    ensure!(
        api_log.lines().count() > 10 && api_log.contains("DEBUG"),
        "enroll-api log too thin"
    );
    ensure!(
        gateway_log.contains("DEBUG"),
        "gateway log has no debug lines"
    );
    // Logs written to a file carry no colour escapes (issue 14), and the
    // JSON format is one object per line.
    ensure!(
        !api_log.contains('\u{1b}'),
        "ANSI escape in the enroll-api log file"
    );
    ensure!(
        !gateway_log.contains('\u{1b}'),
        "ANSI escape in the gateway log file"
    );
    for line in gateway_log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("gateway --log-format json wrote a non-JSON line: {line}"))?;
        ensure!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{line}"
        );
    }
    ensure!(
        values.iter().any(|v| v.contains(&agent_s)),
        "no Redis value names the agent"
    );
    ensure!(
        values.iter().any(|v| v.contains("agent.revoked")),
        "no revocation event in the stream"
    );

    let secrets = [
        ("token secret", token.clone()),
        ("admin key", admin_key.clone()),
        ("first private key", pem_body(&first.key_pem)),
        ("second private key", pem_body(&second.key_pem)),
        ("gateway signing key", {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(&pkcs8)
        }),
    ];
    let haystacks = [
        ("enroll-api log", api_log),
        ("gateway log", gateway_log),
        ("answers", answers.join("\n")),
        ("Redis", values.join("\n")),
        ("events", events.body.to_string()),
    ];
    let mut leaks = Vec::new();
    for (what, secret) in &secrets {
        assert!(secret.len() >= 20, "{what} too short to search for");
        // The whole secret, and a piece from its middle (a truncated copy;
        // the start is a shared prefix such as `opet_` or a PKCS#8 header).
        let mid = secret.len() / 2;
        let piece = &secret[mid - 10..mid + 10];
        for (place, text) in &haystacks {
            if text.contains(secret.as_str()) || text.contains(piece) {
                leaks.push(format!("{what} in {place}"));
            }
        }
    }
    println!(
        "secrets: searched {} log lines, {} answers, {} Redis values and {n_events} events for \
         {} secrets; leaks: {leaks:?}",
        haystacks[0].1.lines().count() + haystacks[1].1.lines().count(),
        answers.len(),
        values.len(),
        secrets.len()
    );
    assert!(leaks.is_empty(), "{leaks:?}");
    Ok(())
}
