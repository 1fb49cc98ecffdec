//! enroll-api lifecycle end to end, on real PostgreSQL and Redis: the
//! revocation projection the gateway reads, its announcements, the outbox
//! relay to the event stream (with a crash between commit and publish),
//! `projection rebuild` after a flush, an agent's audit history, and the
//! tenant CRL checked by `openssl crl -verify`. Each test has its own PostgreSQL
//! schema and Redis key prefix.
//!
//! `cargo test -p oneprotect-tests --test suite lifecycle::`
//! Revoke-to-announcement latency (not a test; prints figures):
//! `cargo test --release -p oneprotect-tests --test suite lifecycle::bench -- --ignored --nocapture`

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use futures_util::StreamExt;
use redis::AsyncCommands;
use serde_json::{json, Value};

use crate::support::enroll::{openssl_csr, outbox_pending_after_drain, Client, Reply};
use crate::support::stack::{redis_conn, Stack};
use oneprotect_enroll_api::store::Store;
use oneprotect_enroll_api::{cli, service};
use oneprotect_identity::revocation::Change;
use oneprotect_identity::{AgentStatus, Announcement, CertStatus, TenantId};

/// Poll attempts (50 ms apart) before a wait gives up.
const POLLS: usize = 400;

async fn delete_keys(redis_url: &str, pattern: &str) -> Result<usize> {
    let mut c = redis_conn(redis_url).await?;
    let keys: Vec<String> = {
        let mut it = c.scan_match::<_, String>(pattern).await?;
        let mut v = Vec::new();
        while let Some(k) = it.next().await {
            v.push(k?);
        }
        v
    };
    if !keys.is_empty() {
        let _: () = c.del(&keys).await?;
    }
    Ok(keys.len())
}

/// `redis_down`, the service is pointed at a closed loopback port instead.
async fn start(label: &str, redis_down: bool) -> Result<Stack> {
    let dead = format!("redis://127.0.0.1:{}", oneprotect_tests::free_port());
    Stack::builder(label)
        .config(move |c| {
            if redis_down {
                c.redis.url = Some(dead);
            }
        })
        .start()
        .await
}

impl Stack {
    /// Restarts the service in place (same store, same CA), with `redis_url`.
    async fn restart(&mut self, redis_url: &str) -> Result<()> {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
        self.cfg.redis.url = Some(redis_url.to_owned());
        let state = service::build_state(&self.cfg, service::system_clock()).await?;
        let running = service::start(&self.cfg, state).await?;
        let addr = running.https_addr.context("no https listener")?;
        self.client = Client::new(addr, &self.dir.join("tls/dev-cert.pem"))?;
        self.running = Some(running);
        Ok(())
    }

    /// Waits until `key` holds `want`.
    async fn wait_for(&self, key: &str, want: &str) -> Result<()> {
        let mut last = None;
        for _ in 0..POLLS {
            last = self.redis_get(key).await?;
            if last.as_deref() == Some(want) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("{key}: wanted {want}, have {last:?}")
    }

    /// Enrolls one agent; returns (agent_id, serial, not_after unix seconds).
    async fn enroll(&self, csr: &str) -> Result<(String, String, i64)> {
        let body = self.client.enroll(&self.key, "e2e-host", csr).await?;
        let not_after = time::OffsetDateTime::parse(
            body["not_after"].as_str().context("not_after")?,
            &time::format_description::well_known::Rfc3339,
        )?;
        Ok((
            body["agent_id"].as_str().context("agent_id")?.to_owned(),
            body["serial"].as_str().context("serial")?.to_owned(),
            not_after.unix_timestamp(),
        ))
    }

    async fn revoke(&self, key: &str, agent: &str) -> Result<Reply> {
        self.client
            .send(
                "POST",
                &format!("/api/v1/agents/{agent}/revoke"),
                Some(key),
                Some(json!({"reason": "device lost"})),
            )
            .await
    }

    fn cert_key(&self, serial: &str) -> Result<String> {
        Ok(self.keys.cert_status(&self.tenant, &serial.parse()?))
    }

    fn agent_key(&self, agent: &str) -> Result<String> {
        Ok(self.keys.agent_status(&self.tenant, &agent.parse()?))
    }

    /// Every entry of the event stream as (event_id, type, data).
    async fn stream(&self) -> Result<Vec<(String, String, Value)>> {
        let mut c = redis_conn(&self.redis_url).await?;
        let reply: redis::streams::StreamRangeReply =
            c.xrange_all(self.keys.events_stream()).await?;
        reply
            .ids
            .iter()
            .map(|e| {
                let field = |name: &str| -> Result<String> {
                    e.get::<String>(name)
                        .with_context(|| format!("stream entry without {name}"))
                };
                Ok((
                    field("event_id")?,
                    field("type")?,
                    serde_json::from_str(&field("data")?)?,
                ))
            })
            .collect()
    }
}

/// A subscriber on the revocation channel.
struct Subscriber {
    stream: std::pin::Pin<Box<dyn futures_util::Stream<Item = redis::Msg> + Send>>,
}

impl Subscriber {
    async fn new(env: &Stack) -> Result<Self> {
        let mut ps = redis::Client::open(env.redis_url.as_str())?
            .get_async_pubsub()
            .await?;
        ps.subscribe(env.keys.revocation_channel()).await?;
        Ok(Self {
            stream: Box::pin(ps.into_on_message()),
        })
    }

    /// The next announcement satisfying `pred` (skipping others).
    async fn until(&mut self, pred: impl Fn(&Announcement) -> bool) -> Result<Announcement> {
        for _ in 0..10_000 {
            let msg = tokio::time::timeout(Duration::from_secs(20), self.stream.next())
                .await
                .context("no announcement within 20 s")?
                .context("subscription ended")?;
            let a: Announcement = serde_json::from_str(&msg.get_payload::<String>()?)?;
            if pred(&a) {
                return Ok(a);
            }
        }
        anyhow::bail!("no matching announcement")
    }
}

/// Validators for every event schema in `specs/events/`, by event type.
fn event_validator(event_type: &str) -> jsonschema::Validator {
    static REGISTRY: std::sync::OnceLock<jsonschema::Registry<'static>> =
        std::sync::OnceLock::new();
    let registry = REGISTRY.get_or_init(|| {
        let events = oneprotect_tests::workspace_root().join("specs/events");
        let resources: Vec<(String, Value)> = std::fs::read_dir(&events)
            .expect("specs/events")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.to_string_lossy().ends_with(".schema.json"))
            .map(|p| {
                let v: Value =
                    serde_json::from_str(&std::fs::read_to_string(&p).expect("read schema"))
                        .expect("schema is JSON");
                (v["$id"].as_str().expect("$id").to_owned(), v)
            })
            .collect();
        jsonschema::Registry::new()
            .extend(resources)
            .expect("resource URIs parse")
            .prepare()
            .expect("registry of event schemas")
    });
    let path = oneprotect_tests::workspace_root()
        .join("specs/events")
        .join(format!("{event_type}.v1.schema.json"));
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read schema")).expect("JSON");
    jsonschema::options()
        .with_registry(registry)
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{event_type} schema does not compile: {e}"))
}

/// Every stream entry's `data` validates against its type's schema, and the
/// entry's `event_id`/`type` fields agree with it.
fn assert_stream_valid(entries: &[(String, String, Value)]) {
    for (id, ty, data) in entries {
        assert_eq!(data["event_id"], id.as_str());
        assert_eq!(data["type"], ty.as_str());
        let v = event_validator(ty);
        let errs: Vec<String> = v.iter_errors(data).map(|e| e.to_string()).collect();
        assert!(errs.is_empty(), "{ty}: {errs:?}\n{data:#}");
        let text = data.to_string();
        assert!(
            !text.contains("opet_") && !text.contains("opak_"),
            "secret in {text}"
        );
    }
}

/// `GET /api/v1/tenants/{tenant}/crl?format=pem` verifies against the tenant
/// CA with `openssl crl -verify` and lists `revoked`, not `active`.
async fn check_crl(env: &Stack, revoked: &str, active: &str) -> Result<()> {
    let path = format!("/api/v1/tenants/{}/crl", env.tenant);
    let der = env.client.send("GET", &path, None, None).await?;
    assert_eq!(der.status, 200);
    let r = env
        .client
        .send("GET", &format!("{path}?format=pem"), None, None)
        .await?;
    assert_eq!(r.status, 200);
    let pem = r.body.as_str().context("PEM text")?;
    std::fs::write(env.dir.join("crl.pem"), pem)?;
    let ca = env
        .running
        .as_ref()
        .context("running")?
        .state
        .ca
        .tenant_ca_pem(env.tenant)?;
    std::fs::write(env.dir.join("tenant-ca.pem"), ca)?;
    let out = Command::new("openssl")
        .args([
            "crl",
            "-in",
            "crl.pem",
            "-CAfile",
            "tenant-ca.pem",
            "-verify",
            "-noout",
            "-text",
        ])
        .current_dir(&env.dir)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "openssl crl: {text}");
    assert!(text.contains("verify OK"), "{text}");
    let hex = |s: &str| s.trim_start_matches('0').to_uppercase();
    assert!(
        text.contains(&hex(revoked)),
        "revoked serial listed: {text}"
    );
    assert!(
        !text.contains(&hex(active)),
        "active serial not listed: {text}"
    );
    let bad = env
        .client
        .send("GET", &format!("{path}?format=xml"), None, None)
        .await?;
    assert_eq!(bad.status, 422);
    let unknown = env
        .client
        .send(
            "GET",
            &format!("/api/v1/tenants/{}/crl", TenantId::random()),
            None,
            None,
        )
        .await?;
    assert_eq!(unknown.status, 404);
    Ok(())
}

/// Enroll → both keys active (certificate key expiring at NotAfter) →
/// revoke → statuses flip and a subscriber sees the announcements;
/// idempotent and tenant-scoped revoke; every streamed event valid; flush
/// then `projection rebuild` restores every status and announces a resync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_projection_revoke_and_rebuild_postgres() -> Result<()> {
    let mut env = start("lc_proj", false).await?;
    let csr = openssl_csr(&env.dir, "agent")?;
    let (a1, s1, not_after) = env.enroll(&csr).await?;
    let (a2, s2, _) = env.enroll(&csr).await?;
    for (k, want) in [
        (env.cert_key(&s1)?, "active"),
        (env.agent_key(&a1)?, "active"),
        (env.cert_key(&s2)?, "active"),
        (env.agent_key(&a2)?, "active"),
    ] {
        env.wait_for(&k, want).await?;
    }
    let mut c = redis_conn(&env.redis_url).await?;
    let exat: i64 = redis::cmd("EXPIRETIME")
        .arg(env.cert_key(&s1)?)
        .query_async(&mut c)
        .await?;
    assert_eq!(exat, not_after, "certificate key expires at NotAfter");
    let agent_ttl: i64 = c.ttl(env.agent_key(&a1)?).await?;
    assert_eq!(agent_ttl, -1, "agent key does not expire");

    // Another tenant's admin cannot revoke it (404, nothing changes).
    let other = cli::tenant_create(&env.cfg, "other", Some(3600)).await?;
    let other_key = cli::admin_key_create(&env.cfg, other, "x").await?;
    let r = env.revoke(other_key.expose_secret(), &a1).await?;
    assert_eq!(r.status, 404, "{}", r.body);

    let mut sub = Subscriber::new(&env).await?;
    let r = env.revoke(&env.key, &a1).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "revoked");
    let agent_id = a1.parse()?;
    let tenant = env.tenant;
    let ann = sub
        .until(|a| {
            a.change
                == Change::Agent {
                    tenant_id: tenant,
                    agent_id,
                    status: AgentStatus::Revoked,
                }
        })
        .await?;
    let serial = s1.parse()?;
    let cert_ann = sub
        .until(|a| {
            a.change
                == Change::Cert {
                    serial,
                    status: CertStatus::Revoked,
                }
        })
        .await?;
    assert!(
        cert_ann.seq > ann.seq,
        "seq increases: {ann:?} {cert_ann:?}"
    );
    assert_eq!(
        env.redis_get(&env.agent_key(&a1)?).await?.as_deref(),
        Some("revoked")
    );
    assert_eq!(
        env.redis_get(&env.cert_key(&s1)?).await?.as_deref(),
        Some("revoked")
    );
    assert_eq!(
        env.redis_get(&env.agent_key(&a2)?).await?.as_deref(),
        Some("active")
    );
    let again = env.revoke(&env.key, &a1).await?;
    assert_eq!(again.status, 200);
    // The agent is the same; `enforcement` is each call's own wait.
    let agent_only = |v: &serde_json::Value| {
        let mut v = v.clone();
        v.as_object_mut().map(|o| o.remove("enforcement"));
        v
    };
    assert_eq!(
        agent_only(&again.body),
        agent_only(&r.body),
        "revoking twice is idempotent"
    );
    assert_eq!(again.body["enforcement"]["outcome"], "confirmed");

    // The agent's audit history, tenant-scoped, each event valid.
    let h = env
        .client
        .send(
            "GET",
            &format!("/api/v1/agents/{a1}/events"),
            Some(&env.key),
            None,
        )
        .await?;
    assert_eq!(h.status, 200, "{}", h.body);
    let items = h.body["items"].as_array().context("items")?;
    let types: Vec<&str> = items.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(types, vec!["agent.enrolled", "agent.revoked"]);
    for e in items {
        let ty = e["type"].as_str().context("type")?;
        let errs: Vec<String> = event_validator(ty)
            .iter_errors(e)
            .map(|x| x.to_string())
            .collect();
        assert!(errs.is_empty(), "{errs:?}");
    }
    let h = env
        .client
        .send(
            "GET",
            &format!("/api/v1/agents/{a1}/events"),
            Some(other_key.expose_secret()),
            None,
        )
        .await?;
    assert_eq!(h.status, 404, "another tenant's agent");

    // The tenant CA's CRL lists the revoked serial; openssl verifies it.
    check_crl(&env, &s1, &s2).await?;

    // The stream carries every event, each valid against its schema.
    let mut entries = Vec::new();
    for _ in 0..POLLS {
        entries = env.stream().await?;
        if entries.iter().any(|(_, t, _)| t == "agent.revoked") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let types: Vec<&str> = entries.iter().map(|(_, t, _)| t.as_str()).collect();
    for t in [
        "agent.enrollment_token.issued",
        "agent.enrolled",
        "agent.revoked",
    ] {
        assert!(types.contains(&t), "{t} in {types:?}");
    }
    assert_stream_valid(&entries);
    let store = &env.running.as_ref().context("running")?.state.store;
    assert!(store.list_pending_events(10).await?.is_empty(), "all sent");

    // Flush this test's keys, rebuild from the store.
    let n = delete_keys(&env.redis_url, &env.keys.all_keys_pattern()).await?;
    assert!(n >= 4, "deleted {n}");
    // (No check that the keys are gone: the running relay rebuilds a missing
    // projection within one poll interval, racing the command below.)
    let stats = cli::projection_rebuild(&env.cfg).await?;
    assert_eq!((stats.agents, stats.certificates), (2, 2), "{stats:?}");
    // The command's own resync (the relay may announce one of its own too).
    let want_seq = u64::try_from(stats.seq)?;
    sub.until(|a| a.change == Change::Resync && a.seq == want_seq)
        .await?;
    for (k, want) in [
        (env.cert_key(&s1)?, "revoked"),
        (env.agent_key(&a1)?, "revoked"),
        (env.cert_key(&s2)?, "active"),
        (env.agent_key(&a2)?, "active"),
    ] {
        assert_eq!(env.redis_get(&k).await?.as_deref(), Some(want), "{k}");
    }
    assert!(env
        .redis_get(&env.keys.projection_built_at())
        .await?
        .is_some());
    let exat: i64 = redis::cmd("EXPIRETIME")
        .arg(env.cert_key(&s2)?)
        .query_async(&mut c)
        .await?;
    assert!(exat > 0, "rebuilt certificate key expires");
    if let Some(r) = env.running.take() {
        r.shutdown().await;
    }
    Ok(())
}

/// The relay rebuilds a missing projection on start: flush, restart, and
/// the statuses are back without any command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_startup_rebuilds_a_flushed_projection_postgres() -> Result<()> {
    let mut env = start("lc_boot", false).await?;
    let csr = openssl_csr(&env.dir, "agent")?;
    let (a1, s1, _) = env.enroll(&csr).await?;
    env.wait_for(&env.agent_key(&a1)?, "active").await?;
    delete_keys(&env.redis_url, &env.keys.all_keys_pattern()).await?;
    let url = env.redis_url.clone();
    env.restart(&url).await?;
    env.wait_for(&env.cert_key(&s1)?, "active").await?;
    env.wait_for(&env.agent_key(&a1)?, "active").await?;
    if let Some(r) = env.running.take() {
        r.shutdown().await;
    }
    Ok(())
}

/// With `redis.wait_replicas = 1` the relay marks an event sent only once a
/// replica has its writes: on a master without replicas the projection is
/// written but the events stay pending (retried); once a replica attaches,
/// they are marked sent. So a failover cannot lose an event already marked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_relay_waits_for_a_replica_before_marking_events_sent_postgres() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let master = crate::support::redis::RedisProc::start(tmp.path(), None, &[]).await?;
    let master_url = format!("redis://127.0.0.1:{}", master.port);
    let mut env = Stack::builder("lc_wait")
        .redis_url(&master_url)
        .config(|c| {
            c.redis.wait_replicas = 1;
            c.redis.wait_timeout_ms = 100;
        })
        .start()
        .await?;
    let csr = openssl_csr(&env.dir, "agent")?;
    let (a1, _, _) = env.enroll(&csr).await?;
    // The master has the projection...
    env.wait_for(&env.agent_key(&a1)?, "active").await?;
    // ... but with no replica to confirm it, nothing is marked sent.
    let store = env.running.as_ref().context("running")?.state.store.clone();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pending: Vec<String> = store
        .list_pending_events(100)
        .await?
        .iter()
        .map(|p| p.event.payload.event_type().to_owned())
        .collect();
    assert!(
        pending.iter().any(|t| t == "agent.enrolled"),
        "events must stay pending without a replica: {pending:?}"
    );

    let replica_of = master.port.to_string();
    let _replica = crate::support::redis::RedisProc::start(
        tmp.path(),
        None,
        &["--replicaof", "127.0.0.1", &replica_of],
    )
    .await?;
    assert_eq!(
        outbox_pending_after_drain(&store).await?,
        0,
        "events are marked sent once a replica confirms"
    );
    if let Some(r) = env.running.take() {
        r.shutdown().await;
    }
    Ok(())
}

/// Commit with Redis unreachable (the relay cannot publish), kill the
/// service, restart it with Redis: the committed events are delivered and
/// the projection written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_outbox_survives_crash_between_commit_and_publish_postgres() -> Result<()> {
    let mut env = start("lc_crash", true).await?;
    let csr = openssl_csr(&env.dir, "agent")?;
    let (a1, s1, _) = env.enroll(&csr).await?;
    let r = env.revoke(&env.key, &a1).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    let running = env.running.take().context("running")?;
    let pending = running.state.store.list_pending_events(100).await?;
    let pending_types: Vec<&str> = pending
        .iter()
        .map(|p| p.event.payload.event_type())
        .collect();
    assert_eq!(
        pending_types,
        vec![
            "agent.enrollment_token.issued",
            "agent.enrolled",
            "agent.revoked"
        ]
    );
    // "Kill": drop the service without a graceful shutdown.
    drop(running);
    assert!(env.stream().await?.is_empty(), "nothing was published");
    assert_eq!(env.redis_get(&env.agent_key(&a1)?).await?, None);

    let url = env.redis_url.clone();
    env.restart(&url).await?;
    env.wait_for(&env.agent_key(&a1)?, "revoked").await?;
    env.wait_for(&env.cert_key(&s1)?, "revoked").await?;
    let mut entries = Vec::new();
    for _ in 0..POLLS {
        entries = env.stream().await?;
        if entries.len() >= pending.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids: Vec<String> = entries.iter().map(|(id, _, _)| id.clone()).collect();
    for p in &pending {
        assert!(
            ids.contains(&p.event.event_id.to_string()),
            "{} delivered",
            p.event.payload.event_type()
        );
    }
    assert_stream_valid(&entries);
    let store = &env.running.as_ref().context("running")?.state.store;
    assert_eq!(outbox_pending_after_drain(store).await?, 0);
    if let Some(r) = env.running.take() {
        r.shutdown().await;
    }
    Ok(())
}

/// Time from the revoke API's 200 to the agent's `revoked` announcement on
/// the channel, over 200 revocations (PostgreSQL, Redis, TLS per request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn bench_revoke_to_announcement() -> Result<()> {
    const N: usize = 200;
    let mut env = start("lc_bench", false).await?;
    let csr = openssl_csr(&env.dir, "agent")?;
    let mut agents = Vec::with_capacity(N);
    for _ in 0..N {
        agents.push(env.enroll(&csr).await?.0);
    }
    for a in &agents {
        env.wait_for(&env.agent_key(a)?, "active").await?;
    }
    let mut sub = Subscriber::new(&env).await?;
    let tenant = env.tenant;
    let mut micros = Vec::with_capacity(N);
    for a in &agents {
        let r = env.revoke(&env.key, a).await?;
        ensure!(r.status == 200, "revoke: {}", r.status);
        let answered = Instant::now();
        let agent_id = a.parse()?;
        sub.until(|x| {
            x.change
                == Change::Agent {
                    tenant_id: tenant,
                    agent_id,
                    status: AgentStatus::Revoked,
                }
        })
        .await?;
        micros.push(answered.elapsed().as_micros());
    }
    micros.sort_unstable();
    let pct = |p: usize| micros[(micros.len() * p / 100).min(micros.len() - 1)];
    println!(
        "revoke response -> announcement over {N} revocations: p50 {} us, p99 {} us, max {} us",
        pct(50),
        pct(99),
        micros[micros.len() - 1]
    );
    if let Some(r) = env.running.take() {
        r.shutdown().await;
    }
    Ok(())
}
