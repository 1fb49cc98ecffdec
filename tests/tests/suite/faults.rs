//! Faults under load, each test with its own `redis-server` on a free port,
//! the in-process enroll-api on PostgreSQL and real `oneprotect-gateway`
//! processes (the [`Fleet`] fixture of `support::fleet`).
//!
//! `cargo test -p oneprotect-tests --test suite faults::`

// Helpers run only inside tests, where a panic with its message is the
// failure report.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::support::enroll_proc::EnrollFixture;
use crate::support::fleet::{admin_status, Fleet, GwTuning, Load, Sample, Sender, POLLS};
use crate::support::redis::RedisChild;

const TUNING: GwTuning = GwTuning {
    max_staleness_ms: 2000,
    heartbeat_ms: 200,
};

/// Polls `agent` through `addr` (one keep-alive sender) until the answer is
/// `want`; bounded by [`POLLS`] attempts 25 ms apart.
async fn until_answer(sender: &mut Sender, want: (u16, &str)) -> bool {
    for _ in 0..POLLS {
        let (status, code) = sender.send("/api/poll").await;
        if status == want.0 && code == want.1 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// Redis is killed (SIGKILL) mid-load and restarted empty on the same port.
/// The gateways serve cached answers up to `max_staleness`, then fail closed
/// (503 `revocation_unavailable`); an agent revoked before the outage is
/// never accepted, one revoked during the outage not after the bound; the
/// enroll-api's relay rebuilds the projection by itself once Redis is back,
/// and every status returns. Wrongly accepted must be 0; wrongly refused
/// (the good agent's 503s) is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_redis_killed_mid_load_and_restarted_empty() -> Result<()> {
    let port = oneprotect_tests::free_port();
    let redis = RedisChild::start(port).await;
    let url = format!("redis://127.0.0.1:{port}");
    let mut fleet = Fleet::start("faults_redis", &url).await?;
    for _ in 0..2 {
        fleet.add_gateway(TUNING).await?;
    }
    let mut agents = Vec::new();
    for i in 0..3 {
        let a = fleet.enroll(&format!("agent{i}")).await?;
        fleet.wait_projection(&a, "active").await?;
        agents.push(a);
    }
    let (before, during, good) = (0, 1, 2);
    assert_eq!(fleet.revoke(&agents[before]).await?.status, 200);
    let before_visible = fleet.wait_projection(&agents[before], "revoked").await?;
    let addrs: Vec<SocketAddr> = fleet.gateways.iter().map(|g| g.addr).collect();
    let load = Load::start(&agents, &addrs, Duration::from_millis(20), 10_000);
    load.more(agents.len() * addrs.len() * 5).await;

    redis.stop().await;
    let killed = Instant::now();
    // Revoked while Redis is down: committed to the store, relayed later.
    let r = fleet.revoke(&agents[during]).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    // The answer says the gateways could not be told (ADR-0022), within
    // the enforcement deadline, not after Redis' connect timeout.
    assert_eq!(
        r.body["enforcement"]["outcome"], "unconfirmed",
        "{}",
        r.body
    );
    assert!(r.body["enforcement"]["seq"].is_null(), "{}", r.body);
    let during_revoked = Instant::now();
    // Every gateway fails closed for the good agent, and says it is not ready.
    for (g, addr) in addrs.iter().enumerate() {
        let mut s = Sender::new(&agents[good], *addr);
        assert!(
            until_answer(&mut s, (503, "revocation_unavailable")).await,
            "gateway {g} never failed closed"
        );
        assert_eq!(
            admin_status(fleet.gateways[g].admin, "/readyz").await,
            Some(503)
        );
    }
    load.more(agents.len() * addrs.len() * 3).await;

    let redis = RedisChild::start(port).await;
    let restarted = Instant::now();
    // No command: the relay notices the missing projection and rebuilds it.
    fleet.wait_projection(&agents[good], "active").await?;
    fleet.wait_projection(&agents[before], "revoked").await?;
    fleet.wait_projection(&agents[during], "revoked").await?;
    let rebuilt = Instant::now();
    for (g, addr) in addrs.iter().enumerate() {
        let mut s = Sender::new(&agents[good], *addr);
        assert!(
            until_answer(&mut s, (200, "")).await,
            "gateway {g} never recovered"
        );
        fleet.wait_ready(g).await?;
    }
    let recovered = Instant::now();
    load.more(agents.len() * addrs.len() * 5).await;
    let samples = load.finish().await;

    let bound = Duration::from_millis(TUNING.max_staleness_ms);
    let accepted = |agent: usize, after: Instant| {
        samples
            .iter()
            .filter(|s: &&Sample| s.agent == agent && s.sent > after && s.status == 200)
            .count()
    };
    let wrongly_accepted =
        accepted(before, before_visible) + accepted(during, during_revoked + bound);
    let good_samples: Vec<&Sample> = samples.iter().filter(|s| s.agent == good).collect();
    let wrongly_refused: Vec<&&Sample> = good_samples.iter().filter(|s| s.status != 200).collect();
    for s in &wrongly_refused {
        // Fail closed is the documented answer; never a 403 for a good agent.
        assert!(
            (s.status, s.code.as_str()) == (503, "revocation_unavailable") || s.status == 0,
            "{s:?}"
        );
        assert!(
            s.sent > killed && s.sent < recovered,
            "refused outside the outage: {s:?}"
        );
    }
    let after_recovery: Vec<&&Sample> =
        good_samples.iter().filter(|s| s.sent > recovered).collect();
    assert!(!after_recovery.is_empty());
    assert!(after_recovery.iter().all(|s| s.status == 200));
    for agent in [before, during] {
        let late: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.agent == agent && s.sent > recovered)
            .collect();
        assert!(!late.is_empty());
        assert!(
            late.iter()
                .all(|s| (s.status, s.code.as_str()) == (403, "agent_revoked")),
            "{late:?}"
        );
    }
    println!(
        "faults redis: {} requests; wrongly accepted {wrongly_accepted}; good agent wrongly refused \
         {} of {} (503 revocation_unavailable while Redis was down or empty); outage {:?}, \
         restart to rebuilt projection {:?}, restart to all gateways serving {:?}",
        samples.len(),
        wrongly_refused.len(),
        good_samples.len(),
        restarted - killed,
        rebuilt - restarted,
        recovered - restarted,
    );
    assert_eq!(wrongly_accepted, 0);
    if let Some(r) = fleet.running.take() {
        r.shutdown().await;
    }
    drop(fleet);
    redis.stop().await;
    Ok(())
}

/// The gateway's pub/sub connection is cut (`CLIENT KILL TYPE pubsub`)
/// while its data connection stays: it resubscribes, and a revocation made
/// right after the cut is enforced well before `max_staleness` (30 s here)
/// could have expired the cached `active`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_pubsub_connection_cut_is_detected() -> Result<()> {
    let port = oneprotect_tests::free_port();
    let redis = RedisChild::start(port).await;
    let url = format!("redis://127.0.0.1:{port}");
    let mut fleet = Fleet::start("faults_pubsub", &url).await?;
    let tuning = GwTuning {
        max_staleness_ms: 30_000,
        heartbeat_ms: 500,
    };
    fleet.add_gateway(tuning).await?;
    let victim = fleet.enroll("victim").await?;
    let other = fleet.enroll("other").await?;
    fleet.wait_projection(&victim, "active").await?;
    fleet.wait_projection(&other, "active").await?;
    let addr = fleet.gateways[0].addr;
    let mut v = Sender::new(&victim, addr);
    let mut o = Sender::new(&other, addr);
    // Both cached as active.
    assert_eq!(v.send("/api/warm").await.0, 200);
    assert_eq!(o.send("/api/warm").await.0, 200);

    let mut c = redis::Client::open(url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let channel = fleet.keys.revocation_channel();
    let subs = |c: &mut redis::aio::MultiplexedConnection| {
        let channel = channel.clone();
        let mut c = c.clone();
        async move {
            let v: (String, u64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channel)
                .query_async(&mut c)
                .await
                .unwrap();
            v.1
        }
    };
    assert_eq!(subs(&mut c).await, 1, "the gateway is subscribed");
    let killed: u64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut c)
        .await?;
    assert!(killed >= 1, "killed {killed}");
    let r = fleet.revoke(&victim).await?;
    assert_eq!(r.status, 200, "{}", r.body);
    fleet.wait_projection(&victim, "revoked").await?;
    // 20 s of polling (POLLS x 25 ms) < max_staleness: only detection passes.
    assert!(
        until_answer(&mut v, (403, "agent_revoked")).await,
        "revocation after the pub/sub cut never enforced"
    );
    let mut resubscribed = false;
    for _ in 0..POLLS {
        if subs(&mut c).await == 1 {
            resubscribed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(resubscribed, "the gateway did not resubscribe");
    // The other agent is confirmed again (refilled) and still served.
    assert_eq!(o.send("/api/after").await.0, 200);
    // A later revocation travels over the new subscription.
    assert_eq!(fleet.revoke(&other).await?.status, 200);
    assert!(until_answer(&mut o, (403, "agent_revoked")).await);
    if let Some(r) = fleet.running.take() {
        r.shutdown().await;
    }
    drop(fleet);
    redis.stop().await;
    Ok(())
}

/// PostgreSQL backends of the service are terminated
/// (`pg_terminate_backend`) again and again during concurrent exchanges:
/// each exchange answers 201 or 503 `storage_unavailable` (problem+json,
/// Retry-After); a 503 leaves no half-written agent (the same token then
/// enrolls); at the end there is exactly one agent, one token use and one
/// `agent.enrolled` outbox event per token, and the stream carries every
/// event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_postgres_backends_terminated_mid_exchange() -> Result<()> {
    use crate::support::enroll::exchange_body;
    use oneprotect_enroll_api::store::Store;
    use serde_json::json;
    use sqlx::Connection;

    const N: usize = 30;
    let app = oneprotect_tests::unique_name("faults_pg");
    let base = oneprotect_tests::require_postgres();
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}application_name={app}");
    let fleet = Fleet::start_with_db("faults_pg", &oneprotect_tests::require_redis(), &url).await?;
    let csr = crate::support::enroll::openssl_csr(&fleet.dir, "agent")?;
    let mut tokens = Vec::new();
    for _ in 0..N {
        let r = fleet
            .client
            .send(
                "POST",
                "/api/v1/agent-enrollment/tokens",
                Some(&fleet.key),
                Some(json!({"max_uses": 1})),
            )
            .await?;
        assert_eq!(r.status, 201, "{}", r.body);
        tokens.push((
            r.body["token_id"].as_str().unwrap().to_owned(),
            r.body["token"].as_str().unwrap().to_owned(),
        ));
    }

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killer = {
        let stop = stop.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let mut c = sqlx::PgConnection::connect(&oneprotect_tests::require_postgres())
                .await
                .unwrap();
            let mut terminated = 0u64;
            for _ in 0..2000 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE application_name = $1 AND pid <> pg_backend_pid()) t",
                )
                .bind(&app)
                .fetch_one(&mut c)
                .await
                .unwrap();
                terminated += u64::try_from(n).unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            terminated
        })
    };

    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(4));
    let mut set = tokio::task::JoinSet::new();
    for (i, (_, token)) in tokens.iter().enumerate() {
        let client = fleet.client.clone();
        let body = exchange_body(token, &csr);
        let permit = sem.clone().acquire_owned().await?;
        set.spawn(async move {
            let r = client
                .send(
                    "POST",
                    "/api/v1/agent-enrollment/exchange",
                    None,
                    Some(body),
                )
                .await;
            drop(permit);
            (i, r)
        });
    }
    let mut unavailable = Vec::new();
    let mut created = 0;
    while let Some(j) = set.join_next().await {
        let (i, r) = j?;
        let r = r?;
        match r.status {
            201 => created += 1,
            503 => {
                assert_eq!(r.body["code"], "storage_unavailable", "{}", r.body);
                assert_eq!(
                    r.headers["content-type"],
                    oneprotect_identity::problem::CONTENT_TYPE
                );
                assert!(r.headers.get("retry-after").is_some());
                unavailable.push(i);
            }
            other => panic!("exchange {i}: unexpected {other}: {}", r.body),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let terminated = killer.await?;
    assert!(terminated > 0, "no backend was terminated");

    // A 503 wrote nothing: the same single-use token enrolls now.
    for &i in &unavailable {
        let mut last = None;
        for _ in 0..20 {
            let r = fleet
                .client
                .send(
                    "POST",
                    "/api/v1/agent-enrollment/exchange",
                    None,
                    Some(exchange_body(&tokens[i].1, &csr)),
                )
                .await?;
            if r.status != 503 {
                last = Some(r);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let r = last.expect("storage came back");
        assert_eq!(r.status, 201, "token {i} after a 503: {}", r.body);
    }
    let store = &fleet.running.as_ref().unwrap().state.store;
    let agents = fleet
        .client
        .send("GET", "/api/v1/agents?limit=500", Some(&fleet.key), None)
        .await?;
    assert_eq!(agents.body["items"].as_array().map(Vec::len), Some(N));
    for (id, _) in &tokens {
        let t = fleet
            .client
            .send(
                "GET",
                &format!("/api/v1/agent-enrollment/tokens/{id}"),
                Some(&fleet.key),
                None,
            )
            .await?;
        assert_eq!(t.body["uses"], 1, "{}", t.body);
    }
    let events = store.list_events(fleet.tenant, 10_000).await?;
    let enrolled: Vec<String> = events
        .iter()
        .filter(|e| e.event.payload.event_type() == "agent.enrolled")
        .map(|e| e.event.event_id.to_string())
        .collect();
    assert_eq!(enrolled.len(), N, "one agent.enrolled per agent");
    // Every outbox event reaches the stream (at least once).
    let mut c = redis::Client::open(fleet.redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    let mut streamed: Vec<String> = Vec::new();
    for _ in 0..POLLS {
        let reply: redis::streams::StreamRangeReply =
            redis::AsyncCommands::xrange_all(&mut c, fleet.keys.events_stream()).await?;
        streamed = reply
            .ids
            .iter()
            .filter_map(|e| e.get::<String>("event_id"))
            .collect();
        if enrolled.iter().all(|id| streamed.contains(id)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let missing = enrolled.iter().filter(|id| !streamed.contains(id)).count();
    let mut unique = streamed.clone();
    unique.sort();
    unique.dedup();
    println!(
        "faults postgres: {terminated} backends terminated; {created} of {N} exchanges 201 at once, \
         {} answered 503 storage_unavailable and enrolled on retry; stream entries {} ({} duplicates, \
         at-least-once), missing {missing}",
        unavailable.len(),
        streamed.len(),
        streamed.len() - unique.len()
    );
    assert_eq!(missing, 0, "an outbox event never reached the stream");
    Ok(())
}

#[derive(Debug, Default)]
struct Outcome {
    /// 201 / 200 on some attempt.
    done: bool,
    /// The token was spent by an attempt whose answer was lost with the
    /// process (a retry got 401 `invalid_token` after a connection error).
    lost_answer: bool,
    /// Attempts that ended without an HTTP answer (the process was gone).
    broken: u32,
    /// 503 answers (e.g. while the restarted service reconnects).
    unavailable: u32,
    agent_id: Option<String>,
}

/// The enroll-api process is killed (SIGKILL) twice while exchanges and
/// revocations are in flight, and started again. Clients retry what got no
/// answer. Afterwards store, Redis and the event stream agree: every token
/// is spent exactly once and every spent token made exactly one agent with a
/// certificate; every revocation is in the store and in Redis; the outbox
/// holds one `agent.enrolled` per agent and one `agent.revoked` per revoked
/// agent, all published, and the stream carries nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_enroll_api_killed_and_restarted() -> Result<()> {
    use crate::support::enroll::exchange_body;
    use oneprotect_enroll_api::store::Store;
    use serde_json::json;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    const EXCHANGES: usize = 48;
    const REVOCATIONS: usize = 16;
    let mut fx = EnrollFixture::new("faults_kill", "", "", "warn").await?;
    let (tenant, keys, redis_url) = (fx.tenant, fx.keys.clone(), fx.redis_url.clone());
    let key = fx.admin_key.clone();
    let dir = fx.dir.clone();
    fx.proc.start().await?;
    let client = Arc::new(fx.client()?);
    let csr = crate::support::enroll::openssl_csr(&dir, "agent")?;

    let new_token = || async {
        let r = client
            .send(
                "POST",
                "/api/v1/agent-enrollment/tokens",
                Some(&key),
                Some(json!({"max_uses": 1})),
            )
            .await?;
        anyhow::ensure!(r.status == 201, "token: {} {}", r.status, r.body);
        anyhow::Ok((
            r.body["token_id"].as_str().context("token_id")?.to_owned(),
            r.body["token"].as_str().context("token")?.to_owned(),
        ))
    };
    // Agents to revoke during the kills, enrolled beforehand.
    let mut victims = Vec::new();
    for i in 0..REVOCATIONS {
        let (_, token) = new_token().await?;
        let mut body = exchange_body(&token, &csr);
        body["agent"]["hostname"] = json!(format!("victim-{i}"));
        let r = client
            .send(
                "POST",
                "/api/v1/agent-enrollment/exchange",
                None,
                Some(body),
            )
            .await?;
        anyhow::ensure!(r.status == 201, "exchange: {} {}", r.status, r.body);
        victims.push(r.body["agent_id"].as_str().context("agent_id")?.to_owned());
    }
    let mut tokens = Vec::new();
    for _ in 0..EXCHANGES {
        tokens.push(new_token().await?);
    }

    // Retrying clients: an attempt without an HTTP answer (connection
    // refused or reset) or with a 503 is tried again, 50 ms apart, bounded.
    let finished = Arc::new(AtomicUsize::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(4));
    let mut set = tokio::task::JoinSet::new();
    for (i, (_, token)) in tokens.iter().enumerate() {
        let (client, finished, sem) = (client.clone(), finished.clone(), sem.clone());
        let mut body = exchange_body(token, &csr);
        body["agent"]["hostname"] = json!(format!("kill-{i}"));
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.unwrap();
            let mut o = Outcome::default();
            for _ in 0..600 {
                let r = client
                    .send(
                        "POST",
                        "/api/v1/agent-enrollment/exchange",
                        None,
                        Some(body.clone()),
                    )
                    .await;
                match r {
                    Err(_) => o.broken += 1,
                    Ok(r) if r.status == 201 => {
                        o.done = true;
                        o.agent_id = r.body["agent_id"].as_str().map(str::to_owned);
                        break;
                    }
                    Ok(r) if r.status == 503 => o.unavailable += 1,
                    Ok(r) if r.status == 401 && o.broken > 0 => {
                        assert_eq!(r.body["code"], "invalid_token", "{}", r.body);
                        o.lost_answer = true;
                        break;
                    }
                    Ok(r) => panic!("exchange {i}: {} {}", r.status, r.body),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            finished.fetch_add(1, Ordering::Relaxed);
            (false, i, o)
        });
    }
    for (i, agent) in victims.iter().enumerate() {
        let (client, finished, sem) = (client.clone(), finished.clone(), sem.clone());
        let path = format!("/api/v1/agents/{agent}/revoke");
        let key = key.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await.unwrap();
            let mut o = Outcome::default();
            for _ in 0..600 {
                let body = json!({"reason": "killed mid-revocation"});
                match client.send("POST", &path, Some(&key), Some(body)).await {
                    Err(_) => o.broken += 1,
                    Ok(r) if r.status == 200 => {
                        assert_eq!(r.body["status"], "revoked", "{}", r.body);
                        o.done = true;
                        break;
                    }
                    Ok(r) if r.status == 503 => o.unavailable += 1,
                    Ok(r) => panic!("revoke {i}: {} {}", r.status, r.body),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            finished.fetch_add(1, Ordering::Relaxed);
            (true, i, o)
        });
    }

    // Kill twice: once a quarter and once two thirds of the work is done,
    // so requests of both kinds are in flight each time.
    let total = EXCHANGES + REVOCATIONS;
    let mut restarts = Vec::new();
    for at in [total / 4, total * 2 / 3] {
        for _ in 0..POLLS * 4 {
            if finished.load(Ordering::Relaxed) >= at {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        fx.proc.kill().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        restarts.push(fx.proc.start().await?);
    }
    let mut exchanges = Vec::new();
    let mut revocations = Vec::new();
    while let Some(j) = set.join_next().await {
        let (is_revocation, i, o) = j?;
        assert!(
            o.done || o.lost_answer,
            "request {i} never completed: {o:?}"
        );
        if is_revocation {
            revocations.push(o);
        } else {
            exchanges.push((i, o));
        }
    }
    let broken: u32 = exchanges
        .iter()
        .map(|(_, o)| o.broken)
        .chain(revocations.iter().map(|o| o.broken))
        .sum();
    assert!(
        broken > 0,
        "no request was cut by the kills; the test proved nothing"
    );

    // The store, read through the service's own store code.
    let cfg =
        oneprotect_enroll_api::config::Config::load(Some(fx.proc.conf.as_path()))?.validate()?;
    let store = oneprotect_enroll_api::service::open_store(&cfg).await?;
    // The relay of the restarted process drains the outbox.
    let drained_from = Instant::now();
    let pending = crate::support::enroll::outbox_pending_after_drain(&store).await?;
    assert_eq!(pending, 0, "the outbox was not drained after the restart");
    let drained = drained_from.elapsed();

    let agents = client
        .send("GET", "/api/v1/agents?limit=500", Some(&key), None)
        .await?;
    assert_eq!(agents.status, 200, "{}", agents.body);
    let agents = agents.body["items"].as_array().context("items")?.clone();
    assert_eq!(
        agents.len(),
        REVOCATIONS + EXCHANGES,
        "one agent per spent token, none half-written"
    );
    // Every token spent once, by exactly one agent (matched by hostname).
    for (i, o) in &exchanges {
        let host = format!("kill-{i}");
        let made: Vec<&serde_json::Value> =
            agents.iter().filter(|a| a["hostname"] == host).collect();
        assert_eq!(made.len(), 1, "token {i}: {o:?}");
        if let Some(id) = &o.agent_id {
            assert_eq!(made[0]["agent_id"], id.as_str());
        }
        let t = client
            .send(
                "GET",
                &format!("/api/v1/agent-enrollment/tokens/{}", tokens[*i].0),
                Some(&key),
                None,
            )
            .await?;
        assert_eq!(t.body["uses"], 1, "{}", t.body);
    }
    // Every agent has its certificate, and Redis agrees with the store.
    let mut c = redis::Client::open(redis_url.as_str())?
        .get_multiplexed_async_connection()
        .await?;
    for a in &agents {
        let status = a["status"].as_str().context("status")?;
        let want = if victims.iter().any(|v| a["agent_id"] == v.as_str()) {
            "revoked"
        } else {
            "active"
        };
        assert_eq!(status, want, "{a}");
        let agent: oneprotect_identity::AgentId = a["agent_id"].as_str().context("id")?.parse()?;
        let serial: oneprotect_identity::SerialNumber =
            a["current_serial"].as_str().context("serial")?.parse()?;
        let certs = store.list_agent_certificates(tenant, agent).await?;
        assert_eq!(certs.len(), 1, "{a}");
        for key in [
            keys.agent_status(&tenant, &agent),
            keys.cert_status(&tenant, &serial),
        ] {
            let v: Option<String> = redis::AsyncCommands::get(&mut c, &key).await?;
            assert_eq!(v.as_deref(), Some(want), "{key} disagrees with the store");
        }
    }
    // The outbox: one event per fact, no duplicate; the stream: all of them
    // (at least once) and nothing else.
    let events = store.list_events(tenant, 10_000).await?;
    let count = |t: &str| {
        events
            .iter()
            .filter(|e| e.event.payload.event_type() == t)
            .count()
    };
    assert_eq!(count("agent.enrolled"), REVOCATIONS + EXCHANGES);
    assert_eq!(count("agent.revoked"), REVOCATIONS);
    let mut ids: Vec<String> = events
        .iter()
        .map(|e| e.event.event_id.to_string())
        .collect();
    ids.sort();
    let n = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), n, "duplicate event in the outbox");
    let reply: redis::streams::StreamRangeReply =
        redis::AsyncCommands::xrange_all(&mut c, keys.events_stream()).await?;
    let mut streamed: Vec<String> = reply
        .ids
        .iter()
        .filter_map(|e| e.get::<String>("event_id"))
        .collect();
    let entries = streamed.len();
    streamed.sort();
    streamed.dedup();
    assert_eq!(streamed, ids, "the stream and the outbox disagree");
    let lost = exchanges.iter().filter(|(_, o)| o.lost_answer).count();
    println!(
        "faults enroll-api kill: 2 SIGKILLs during {EXCHANGES} exchanges and {REVOCATIONS} \
         revocations; {broken} attempts cut, {} answered 503, {lost} exchange answers lost with \
         the process (token spent, agent made); restart to listening {restarts:?}; outbox drained \
         {drained:?} after the last request; {} events, {} stream entries ({} redelivered)",
        exchanges
            .iter()
            .map(|(_, o)| o.unavailable)
            .chain(revocations.iter().map(|o| o.unavailable))
            .sum::<u32>(),
        ids.len(),
        entries,
        entries - ids.len(),
    );
    fx.proc.kill().await;
    Ok(())
}
